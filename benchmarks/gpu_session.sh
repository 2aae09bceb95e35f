#!/usr/bin/env bash
# Everything one lent GPU session checks, in one command (device time is scarce):
#   0. a smoke check of both modes against the reference, which ends the session if it fails
#      (not if it times out);
#   1. the parity, stream, operator, validation, module and sort tests on CUDA;
#   2. kernel variants prepared without a GPU, if any (VARIANTS_DIR, below): the same bench cases
#      for this checkout and for each variant, side by side (benchmarks/compare_runs.py);
#   3. per-kernel profiles of both backward modes (benchmarks/profile_backward.py): gpt2-124M
#      B32 float32 with one id and with text ids, then uniform ids at B32 and B8;
#   4. candidate tiles of the forward and of the fast mode's sweep (benchmarks/tile_sweep.py),
#      where goals are missed: the bfloat16 forward at 32k tokens, float32 forward+backward
#      against torch.compile; and the forward after a cache flush that only reads;
#   5. the benchmark cases of the Triton issue: gpt2-124M at B 8 and 32, gpt2-1.5B at B 16 and
#      the large-vocab preset at B 8, float32 and bfloat16, uniform / Zipf(1.1) ids (gpt2-124M
#      also with one id everywhere and with real text), id range check off; every
#      implementation passes the benchmark's correctness gate before it is timed;
#   6. the two ways of sorting the ids (benchmarks/sort_crossover.py), for the threshold between them;
#   7. what the id range check costs: fusedemb with it on and off, eager beside, in the benchmark,
#      alone (called eagerly and compiled) and in GPT training steps (benchmarks/range_check_cost.py);
#   8. host time per call at small sizes, eager beside (benchmarks/host_overhead.py).
# Most important first: GPU_SESSION_BUDGET_S (default 580) bounds the script's wall time, so that
# one command of a lent machine (600 s at most) is not killed mid-step: each command's timeout is
# cut to what is left of it (cut short, it exits 124 and fails the script, as any timeout does),
# and a command with under 20 s left is skipped (written down as such; no failure).
# Usage, from the repo root on a CUDA machine: bash benchmarks/gpu_session.sh OUT_DIR [DATA_DIR]
# DATA_DIR holds the-verdict.txt and tiktoken/ (../shared/data beside a checkout). A lent machine
# gets the checkout only: copy them into the ignored .data/ (cp -r ../shared/data .data), carry
# .data with the run, and pass .data; without them the text-id rows and profile are left out.
# VARIANTS_DIR (default .variants, ignored by git) holds one folder per variant, each with a
# fusedemb package: say a git worktree of a branch (git worktree add .variants/NAME BRANCH). A lent
# machine gets it only when carried with the run, like .data.
# GPU_SESSION_STEPS picks steps by name (default: all of "smoke tests variants profile tiles bench sortcross rangecheck host"),
# for a session that splits its device time between calls.
# OUT_DIR/tables.txt gets every step's output, each command's wall time, and the exit status of
# each command that failed; the script exits 1 if any did (the smoke check's stops it at once),
# else 0.
set -u
case ${1:-} in  # the header above for --help; no OUT_DIR, or an option where it goes, is a mistake
  -h | --help) sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; exit 0 ;;
  -* | "") echo "usage: gpu_session.sh OUT_DIR [DATA_DIR] (--help for more)" >&2; exit 2 ;;
esac
out=$1
data=${2:-../shared/data}
steps=" ${GPU_SESSION_STEPS:-smoke tests variants profile tiles bench sortcross rangecheck host} "
step() { [[ $steps == *" $1 "* ]]; }
budget=${GPU_SESSION_BUDGET_S:-580}
# fitted LIMIT: LIMIT, or less where the budget has less left (less the 10 s a kill may wait);
# fails when under 20 s are left. ($SECONDS: the script's seconds so far, in subshells too.)
fitted() {
  local left=$((budget - SECONDS - 10))
  ((left >= 20)) && echo $(($1 < left ? $1 : left))
}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$data/tiktoken
tables=$out/tables.txt
failed=0  # the script's exit status: 1 if any step's command failed
# logged LIMIT CMD...: CMD under a timeout of LIMIT seconds (killed 10 s later if it cannot stop),
# its output appended to the tables and shown (its last $shown lines where shown is set). An exit
# status other than 0, lost in the pipe unless kept, is written there too and fails the script:
# for the bench, 1 is a mismatch or an implementation that could not run or raised; 124 is a run
# cut short by its timeout (the bench and the scripts still print what they finished). Each
# command's wall time is written down after its output, for the next session's budget.
logged() {
  local limit start=$SECONDS
  limit=$(fitted "$1") || { echo "skipped, the ${budget} s budget spent: ${*:2}" | tee -a "$tables"; status=skipped; return; }
  timeout -k 10 "$limit" "${@:2}" 2>&1 | tee -a "$tables" | tail -n "${shown:-+1}"
  status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || { echo "exit $status: ${*:2}" | tee -a "$tables"; failed=1; }
  echo "(took $((SECONDS - start)) s of its ${limit}; $SECONDS s of the ${budget} s budget gone)" >> "$tables"
}
bench() { shown=3 logged "$1" python3 -m fusedemb.bench --device cuda --pass forward forward+backward "${@:2}"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, fusedemb; print('torch', torch.__version__, 'triton', triton.__version__, fusedemb.available_backends('cuda'))"
} 2>&1 | tee "$tables"
if [ -f "$data/the-verdict.txt" ] && [ -d "$data/tiktoken" ]; then
  text_ids=("text:$data/the-verdict.txt")
else  # (the bench refuses a missing text file before it runs anything)
  text_ids=()
  echo "no $data/the-verdict.txt or $data/tiktoken: the text-id rows and profile are left out" | tee -a "$tables"
fi

# First a smoke check that stops the session early if any kernel fails to compile here or
# disagrees with the reference (the bench's gate) in either mode, at small gpt2-124M sizes. A
# timeout (a slow first compile) does not stop it: the later steps tell more.
step smoke && {
  shown=20 logged 90 python3 -m fusedemb.bench --device cuda --quick --preset gpt2-124M --batch 2 --seq 300 \
    --dtype float32 bfloat16 float16 --ids uniform same --impl fusedemb-fast fusedemb-deterministic \
    --pass forward+backward
  case $status in
    0 | skipped) ;;
    124 | 137) echo "smoke check timed out: going on" | tee -a "$tables" ;;
    *) echo "smoke check failed: stopping" | tee -a "$tables"; exit 1 ;;
  esac
}

# Compiling the Triton kernels for every tested shape is most of this step's time: spread it
# over the cores with pytest-xdist where the machine has it (100 s with 8 workers was not enough
# on an H200 machine), else one process (slower: the timeout may cut it short).
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 14")
# Up to 30 failures, not the first only: one failing test must not hide the others from a
# session that may not see a GPU again soon (a poisoned CUDA context fails the rest fast; 10
# stopped the thirtieth session's run one test short, on 11 failures, 10 of them torch 2.11's).
# The AOTInductor packages are left out: a C++ build per backend, not a test of the kernels. The
# dynamic-shape guards' test is in: there torch is a CUDA build, which traces both modes.
step tests && if limit=$(fitted 180); then
  timeout -k 10 "$limit" python3 -m pytest tests/test_functional.py tests/test_streams.py tests/test_ops.py \
    tests/test_validation.py tests/test_module.py tests/test_sorted_scatter.py \
    tests/test_benchmark_scripts.py::test_dynamic_shape_guards_of_one_graph_hold_for_every_length_that_fits \
    -k "not aot_inductor_package" \
    -q --maxfail=30 $workers -p no:cacheprovider > "$out/tests.log" 2>&1
  status=$?
  echo "tests exit $status: $(tail -1 "$out/tests.log") (at $SECONDS s of the ${budget} s budget)" | tee -a "$tables"
  [ "$status" = 0 ] || failed=1
else
  echo "skipped, the ${budget} s budget spent: the tests" | tee -a "$tables"
fi

# Kernel variants (VARIANTS_DIR): the same cases for this checkout and then for each variant, each
# bench in a process that imports the variant's fusedemb (first on PYTHONPATH; PYTHONSAFEPATH, of
# Python 3.11 on, keeps python -m from putting the working directory, this checkout, before it),
# every one gated against the reference before it is timed; then each case's times side by side.
# Nothing to do (and no time spent) without variants.
variants_dir=${VARIANTS_DIR:-.variants}
step variants && {
  variant_dirs=()
  for dir in "$variants_dir"/*/; do [ -f "$dir/fusedemb/__init__.py" ] && variant_dirs+=("${dir%/}"); done
  if ((${#variant_dirs[@]})); then
    echo "== kernel variants: ${variant_dirs[*]}, against this checkout ==" >> "$tables"
    runs=() labels=()
    for dir in . "${variant_dirs[@]}"; do
      name=$([ "$dir" = . ] && echo checkout || basename "$dir")
      PYTHONSAFEPATH=1 PYTHONPATH=$(cd "$dir" && pwd):$PYTHONPATH bench 60 --no-bounds-check --preset gpt2-124M \
        --batch 8 32 --dtype float32 bfloat16 --ids uniform zipf:1.1 same \
        --impl fusedemb-fast fusedemb-deterministic --json "$out/variant_$name.json"
      [ -f "$out/variant_$name.json" ] && runs+=("$out/variant_$name.json") labels+=("$name")
    done
    ((${#runs[@]} > 1)) && logged 30 python3 benchmarks/compare_runs.py "${runs[@]}" --labels "${labels[@]}"
  else
    echo "no kernel variants in $variants_dir" >> "$tables"
  fi
}
# The profiles and the tiles come before the bench, which the thirtieth session ran (f246bb4; the
# kernels have not changed since but for the deterministic mode's flat partial sums): no session
# has had them yet (the thirtieth session's budget ran out before the profiles, the tiles are new).
step profile && {
  echo "== where the backward's time goes ==" >> "$tables"
  # First the rows where the deterministic mode misses 1.3x of the fast one (gpt2-124M B32 float32
  # with one id everywhere, 1.45 on the eleventh session's H100 and 1.33 on the thirtieth's H200,
  # and with real text, 1.45 and 1.47); then uniform ids at B32 and B8 float32, the baseline that
  # docs/benchmarks.md's per-kernel figures (eighth session) come from, for comparison on this card.
  logged 40 python3 benchmarks/profile_backward.py --preset gpt2-124M --batch 32 --ids same > /dev/null
  ((${#text_ids[@]})) && logged 40 python3 benchmarks/profile_backward.py --preset gpt2-124M --batch 32 \
    --ids "${text_ids[0]}" > /dev/null
  logged 40 python3 benchmarks/profile_backward.py --preset gpt2-124M --batch 32 > /dev/null
  logged 30 python3 benchmarks/profile_backward.py --preset gpt2-124M --batch 8 > /dev/null
}
# The tiles around the chosen ones (each candidate checked against the reference, then timed):
# the forward in both dtypes at gpt2-124M B8 and B32 (bfloat16 reached 84% of copy bandwidth at
# B32 on the thirtieth session's H200, against the 90% wanted; float32 92%), and the fast mode's
# sweep at the same sizes (torch.compile tied with it at B32 in float32; the bfloat16 B32 rows
# sort, and are left out) and with Zipf ids where torch.compile won in float32 (gpt2-1.5B,
# large-vocab). Never run on a GPU yet.
step tiles && {
  # 56 candidates (7 kernel, dtype and batch rows of 8), 32 kernels to compile (a second each?).
  logged 150 python3 benchmarks/tile_sweep.py --preset gpt2-124M --batch 8 32
  logged 45 python3 benchmarks/tile_sweep.py --preset gpt2-1.5B --batch 16 --dtype float32 --kernel sweep \
    --ids zipf:1.1
  logged 60 python3 benchmarks/tile_sweep.py --preset large-vocab --batch 8 --dtype float32 --kernel sweep \
    --ids zipf:1.1
  # The forward's fixed part per call (docs/benchmarks.md): how much of it is the write-back of the
  # dirty lines that the default flush leaves in L2.
  echo "== forward after a flush that only reads ==" >> "$tables"
  bench 40 --no-bounds-check --preset gpt2-124M --batch 8 32 --dtype float32 bfloat16 --ids uniform \
    --impl fusedemb-fast eager --pass forward --cache-flush read
}
# A bench cut short by its timeout (SIGTERM) still prints and writes what it finished;
# -k 10 kills it if it cannot stop. gpt2-124M's sweep, the longest, runs one command per dtype,
# so that a timeout loses less of it.
step bench && {
  for dtype in float32 bfloat16; do
    bench 120 --no-bounds-check --preset gpt2-124M --batch 8 32 --dtype $dtype \
      --ids uniform zipf:1.1 same ${text_ids[@]+"${text_ids[@]}"} --json "$out/bench_gpt2_$dtype.json" \
      $([ $dtype = float32 ] && echo --plot "$out/bench_gpt2_$dtype.png")
  done
  # 50 s sufficed on one H200 machine and not on another (torch.compile's compile time varies).
  bench 90 --no-bounds-check --preset gpt2-1.5B --batch 16 --dtype float32 bfloat16 --ids uniform zipf:1.1 \
    --json "$out/bench_gpt2_1.5b.json"
  bench 60 --no-bounds-check --preset large-vocab --batch 8 --dtype float32 bfloat16 --ids uniform zipf:1.1 \
    --json "$out/bench_large_vocab.json"
}
# Where torch.sort overtakes the counting sort (COUNTING_SORT_MAX_CELLS): both, alone, V x N.
step sortcross && logged 60 python3 benchmarks/sort_crossover.py
# The check's cost: the same cases with it on and off, back to back on the same machine.
step rangecheck && {
  echo "== id range check on ==" >> "$tables"
  bench 25 --preset gpt2-124M --batch 8 32 --ids uniform --impl fusedemb-fast eager
  echo "== id range check off ==" >> "$tables"
  bench 25 --no-bounds-check --preset gpt2-124M --batch 8 32 --ids uniform --impl fusedemb-fast
  logged 120 python3 benchmarks/range_check_cost.py --config tiny --rounds 30 --queued 10
  logged 90 python3 benchmarks/range_check_cost.py --config gpt2-124M --batch 4 8 --round-trips 0
}
step host && logged 90 python3 benchmarks/host_overhead.py --device cuda
exit $failed
