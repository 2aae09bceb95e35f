#!/usr/bin/env bash
# The CPU measurements quoted in the README and in the core issue: gpt2-124M's tables
# (V 50257, D 768, T 1024), float32, B 8, fusedemb's C++ kernels against eager PyTorch and
# torch.compile, side by side in one process, for uniform, Zipf(1.1), one-id and real-text ids.
# Usage, from the repo root: bash benchmarks/cpu_session.sh OUT_DIR [DATA_DIR]
# DATA_DIR holds the-verdict.txt and tiktoken/ (../shared/data beside a checkout).
set -euo pipefail
case ${1:-} in  # the header above for --help; no OUT_DIR, or an option where it goes, is a mistake
  -h | --help) sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; exit 0 ;;
  -* | "") echo "usage: cpu_session.sh OUT_DIR [DATA_DIR] (--help for more)" >&2; exit 2 ;;
esac
out=$1
data=${2:-../shared/data}
mkdir -p "$out"
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$data/tiktoken}
python -m fusedemb.bench --device cpu --preset gpt2-124M --batch 8 \
  --ids uniform zipf:1.1 same "text:$data/the-verdict.txt" \
  --json "$out/cpu.json" --plot "$out/cpu.png" | tee "$out/cpu_table.txt"
