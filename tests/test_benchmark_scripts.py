"""The standalone scripts of benchmarks/ run (on CPU, at small sizes): a GPU session has no time to
find out that one has rotted."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_python
from shared_data import VERDICT_PATH

import fusedemb
from fusedemb.bench.gate import GateResult
from fusedemb.bench.timing import CpuTimer
from fusedemb.ops import TRITON_AVAILABLE

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: Dynamo looks a compiled function's module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif("triton" not in fusedemb.available_backends("cpu"), reason="Triton unavailable")
def test_sort_crossover_times_both_sorts(capsys):
    load_script("sort_crossover").main(["--device", "cpu", "--quick", "--vocab", "7", "--tokens", "300", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [row[:3] for row in rows] == [["7", "300", "14"], ["7", "1", "7"]]  # V, N, V * ceil(N / 256)
    for row in rows:
        counting_us, sort_us, ratio = map(float, row[3:])
        assert counting_us > 0 and sort_us > 0 and ratio == pytest.approx(counting_us / sort_us, rel=0.05, abs=0.01)


def test_profile_backward_reports_both_modes(capsys, monkeypatch):
    """On CPU both rows profile the C++ backward (it has one mode); the GPU run differs only in
    what the profiler records and in holding the GPU busy for the host profile. The script
    switches the id range check off while it runs, and back on after."""
    monkeypatch.setattr(fusedemb.validation, "_bounds_check", True)  # (FUSEDEMB_BOUNDS_CHECK=0 may be set)
    load_script("profile_backward").main(["--device", "cpu", "--preset", "gpt2-124M", "--batch", "1", "--ids", "same"])
    assert fusedemb.bounds_check_enabled()
    out = capsys.readouterr().out
    for mode in ("fast", "deterministic"):
        assert f"== gpt2-124M B1 float32 same ids, {mode} mode:" in out
    assert out.count("host time per step") == 2
    assert out.count("fusedemb::cpu_backward") >= 2  # the kernels show in both modes' tables


def test_range_check_cost_times_all_three(capsys, monkeypatch):
    script = load_script("range_check_cost")
    steps = []  # (fused first layer, range check on) of every training step, in order
    training_step = script.training_step

    def recording_step(model, *args):
        steps.append((isinstance(model.embedding, fusedemb.FusedEmbedding), fusedemb.bounds_check_enabled()))
        return training_step(model, *args)

    monkeypatch.setattr(script, "training_step", recording_step)
    was_on = fusedemb.bounds_check_enabled()
    with torch.random.fork_rng():
        script.main(["--device", "cpu", "--config", "tiny", "--rounds", "2", "--queued", "3", "--round-trips", "2",
                     "--round-trip-config", "tiny"])  # fmt: skip
    assert fusedemb.bounds_check_enabled() == was_on  # the script puts the switch back
    # 3 rounds (one of warm-up), each contender once per round, starting one later each round;
    # each turn is one synced step and 3 queued ones, with the contender's model and switch.
    nn_embedding, check_on, check_off = (False, True), (True, True), (True, False)
    turns = [nn_embedding, check_on, check_off, check_on, check_off, nn_embedding, check_off, nn_embedding, check_on]
    assert steps == [turn for turn in turns for _ in range(4)]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("forward alone, tiny B8 float32")
    round_trips = [line.split() for line in lines[1:9]]
    assert [row[:-2] for row in round_trips] == [[label, "check", state] for label in ("eager", "torch.compile")
                                                 for state in ("on", "off", "on", "off")]  # fmt: skip
    assert all(float(row[-2]) > 0 for row in round_trips)
    assert lines[9].startswith("tiny, batch 4 x 32, cpu, 2 rounds")
    rows = [line.split() for line in lines[10:]]
    assert [" ".join(row[:-7]) for row in rows] == ["nn.Embedding", "fusedemb check on", "fusedemb check off"]
    for *_, synced, synced_ms, synced_spread, queued, times, queued_ms, queued_spread in rows:
        assert (synced, queued, times) == ("synced", "queued", "x3")
        assert float(synced_ms) > 0 and float(queued_ms) > 0
        assert synced_spread.startswith("±") and queued_spread.startswith("±")


@pytest.mark.parametrize("backend", fusedemb.available_backends("cpu"))
def test_host_overhead_times_every_row(capsys, backend, monkeypatch):
    """Every row on CPU; the Triton backend (the interpreter) also replays its recorded launch.
    The backward's rows take the path of autograd's engine, never the registered operator's
    (the double backward's, with grad mode on)."""
    def not_the_operator(*args, **kwargs):
        raise AssertionError("a backward row went through the registered operator")

    monkeypatch.setattr(fusedemb.ops, "fused_embedding_backward_op", not_the_operator)
    was_on = fusedemb.bounds_check_enabled()
    load_script("host_overhead").main(["--device", "cpu", "--backend", backend, "--calls", "1", "--rounds", "2"])
    assert fusedemb.bounds_check_enabled() == was_on  # the script puts the switch back
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"host time per call, cpu, backend {backend}, float32")
    labels = [line.rsplit(maxsplit=3)[0].strip() for line in lines[1:]]
    layers = {"reference": [], "cpp": ["prepare_inputs", "FusedEmbeddingFunction"]}
    layers["triton"] = layers["cpp"] + ["kernel launch"]
    modes = [f"{mode}: {impl}" for mode in ("forward", "forward+backward") for impl in
             ("eager", "fusedemb, check on", "fusedemb, check off")]  # fmt: skip
    backward_layers = {"reference": [], "cpp": ["FusedEmbeddingFunction.backward"]}
    backward_layers["triton"] = backward_layers["cpp"] + ["first kernel launch"]
    if backend == "triton":  # the one backend with two token-gradient modes
        backward = ["backward: eager", "backward: fusedemb, fast", *backward_layers[backend],
                    "backward: fusedemb, deterministic"]  # fmt: skip
    else:
        backward = ["backward: eager", "backward: fusedemb", *backward_layers[backend]]
    inference = ["inference: eager", "inference: fusedemb, check on", "inference: fusedemb, check off"]
    assert labels == modes[:3] + inference + layers[backend] + backward + modes[3:]
    for line in lines[1:]:
        median, spread, unit = line.split()[-3:]
        assert float(median) > 0 and spread.startswith("±") and unit == "us"


TRITON_ON_CPU = pytest.mark.skipif("triton" not in fusedemb.available_backends("cpu"), reason="Triton unavailable")


def tile_rows(out: str) -> list[list[str]]:
    """tile_sweep's rows of rows, columns, warps, us, % copy, / chosen (and a marker)."""
    return [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]


@TRITON_ON_CPU
def test_tile_sweep_launches_each_candidate_after_the_gate(capsys, monkeypatch):
    """Each candidate reaches its kernel's launch (and only the token-adding sweep's), the chosen
    tile's first: the launches are recorded. (That the gate runs each one is the next test's.)"""
    from fusedemb.kernels import backward, forward

    launched = []  # (kernel name, rows, warps) of every launch of a tiled kernel
    for module, kernel, rows_name in ((forward, "fused_embedding_forward_kernel", "BLOCK_TOKENS"),
                                      (backward, "sweep_batch_kernel", "BLOCK_ROWS")):  # fmt: skip
        def recording(jit, grid, *args, real=module.launch, kernel=kernel, rows_name=rows_name, **kwargs):
            if jit.__name__ == kernel and kwargs.get("ADD_TO_TABLE", True):
                launched.append((kernel, kwargs[rows_name], kwargs["num_warps"]))
            real(jit, grid, *args, **kwargs)

        monkeypatch.setattr(module, "launch", recording)
    load_script("tile_sweep").main(["--device", "cpu", "--quick", "--preset", "tiny", "--batch", "2", "--dtype",
                                    "float32", "--row-factors", "1", "0.5", "--warps", "2", "4"])  # fmt: skip
    out = capsys.readouterr().out
    forward_tile = forward.forward_tile(64)  # tiny's D
    sweep_tile = backward.sweep_tile(64, True, torch.float32)
    expected = {}
    for kernel, chosen in (("fused_embedding_forward_kernel", forward_tile), ("sweep_batch_kernel", sweep_tile)):
        others = [(rows, warps) for rows in (chosen.rows, chosen.rows // 2) for warps in (2, 4)]
        first = (chosen.rows, chosen.warps)
        expected[kernel] = [first] + [tile for tile in others if tile != first]
    rows = tile_rows(out)
    assert [(int(row[0]), int(row[2])) for row in rows] == expected["fused_embedding_forward_kernel"] + expected[
        "sweep_batch_kernel"
    ]
    assert all(int(row[1]) == 64 for row in rows)
    assert [row[6:] for row in rows] == [["(chosen)"], [], [], [], ["(chosen)"], [], [], []]
    for row in rows:
        assert float(row[3]) > 0 and row[4].endswith("%")
    assert [float(row[5]) for row in rows][::4] == [1.0, 1.0]
    for kernel, tiles in expected.items():  # every tile launched, in order (the gate's run first)
        seen = [(rows, warps) for name, rows, warps in launched if name == kernel]
        assert list(dict.fromkeys(seen)) == tiles
    assert "== forward, tiny B2 float32 uniform ids (forward pass" in out
    assert "== sweep, tiny B2 float32 uniform ids (backward pass" in out


def test_tile_sweep_times_an_empty_kernel_first_on_a_gpu(capsys, monkeypatch):
    """The floor under its rows: a 0-cycle spin kernel, timed by the rows' timer (here a CPU one
    standing in, with the spin recorded: no GPU on CI)."""
    script = load_script("tile_sweep")
    spins, swept = [], []
    monkeypatch.setattr(script, "check_device", lambda parser, device: None)
    monkeypatch.setattr(script, "make_timer", lambda device, quick: CpuTimer(0.0, 1, 1, 1))
    monkeypatch.setattr(script, "copy_bandwidth", lambda timer, device, size: 4e12)
    monkeypatch.setattr(script.torch.cuda, "_sleep", lambda cycles: spins.append(cycles))
    monkeypatch.setattr(script, "sweep_tiles", lambda kernel, problem, *args: swept.append(kernel) or 0)
    script.main(["--device", "cuda", "--kernel", "forward", "--dtype", "float32"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "copy bandwidth: 4000.0 GB/s (bytes read + written)"
    assert re.fullmatch(r"an empty kernel, timed the same way: \d+\.\d us", lines[1])
    assert spins and set(spins) == {0} and swept == ["forward"]


@TRITON_ON_CPU
def test_tile_sweep_reports_a_candidate_that_fails_the_gate_and_fails(capsys, monkeypatch):
    script = load_script("tile_sweep")
    real_gate = script.check_against_reference
    calls = []

    def failing_second(*args, **kwargs):
        calls.append(1)
        result = real_gate(*args, **kwargs)
        return GateResult(False, "grad tok_weight off") if len(calls) == 2 else result

    monkeypatch.setattr(script, "check_against_reference", failing_second)
    monkeypatch.setattr(script.backward, "fast_mode_sorts", lambda *args: True)
    with pytest.raises(SystemExit, match="1 candidate tiles computed wrong results"):
        script.main(["--device", "cpu", "--quick", "--preset", "tiny", "--batch", "1", "--dtype", "bfloat16",
                     "--row-factors", "1", "2", "--warps", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert tile_rows(out)[1][3:] == ["mismatch:", "grad", "tok_weight", "off"]
    assert "== sweep, tiny B1 bfloat16 uniform ids: the fast mode sorts here, no sweep adds the token gradient" in out


def test_func_transforms_cost_times_every_transform(capsys):
    load_script("func_transforms_cost").main(["--device", "cpu", "--quick", "--batch", "2", "--vocab", "9"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("torch.func, cpu, float32, batch 2, V 9")
    labels = ["ensemble outputs", "ensemble gradients", "per-model gradients", "per-sample gradients", "jacobian (jacrev)",
              "compiled batches"]  # fmt: skip
    assert [line[2:38].strip() for line in lines[1:]] == labels + [f"{label}, padding_idx" for label in labels]
    for line in lines[1:]:
        fused_ms, _, reference_ms, _, ratio = line[38:].split()
        assert float(fused_ms) > 0 and float(reference_ms) > 0 and ratio.endswith("x")


# A graph traced at T 7 (B 3, D 16, V 50, P 12: test_ops' dynamic test) must serve every other
# length of that test, 2 and 12: the guards of each mode hold there. The deterministic mode's
# trace needs a CUDA build of torch (the script's docstring), so a CPU build checks the fast mode.
DYNAMIC_GUARDS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from dynamic_shape_guards import B, T, traced_guards
for deterministic in (False, True) if torch.backends.cuda.is_built() else (False,):
    guards = traced_guards(3, 7, 16, 50, 12, torch.float32, deterministic)
    for seq_len in (2, 12, 13):
        held = [bool(guard.subs({B: 3, T: seq_len})) for guard, _ in guards]
        print(deterministic, seq_len, len(guards), all(held))
"""


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton unavailable")
def test_dynamic_shape_guards_of_one_graph_hold_for_every_length_that_fits():
    """The launchers' guards, traced with symbolic B and T on fake CUDA tensors (no GPU): one
    graph for every sequence length from 2 to the position table's 12, and not 13."""
    result = run_python("-c", DYNAMIC_GUARDS, str(BENCHMARKS))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    modes = ["False", "True"] if torch.backends.cuda.is_built() else ["False"]
    assert [(row[0], row[1], row[3]) for row in rows] == [
        (mode, seq_len, held) for mode in modes for seq_len, held in (("2", "True"), ("12", "True"), ("13", "False"))
    ]
    assert all(int(row[2]) > 0 for row in rows)  # (guards were recorded at all)


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("range_check_cost", ["--round-trips", "-1"], "--round-trips: must be at least 0, got -1"),
        ("range_check_cost", ["--batch", "0"], "--batch: must be at least 1, got 0"),
        ("profile_backward", ["--batch", "0"], "--batch: must be at least 1, got 0"),
        ("sort_crossover", ["--vocab", "0"], "--vocab: must be at least 1, got 0"),
        ("sort_crossover", ["--tokens", "-8"], "--tokens: must be at least 1, got -8"),
        ("profile_backward", ["--ids", "zipf:x"], "--ids: zipf needs a numeric exponent, as in zipf:1.1, got 'zipf:x'"),
        ("tile_sweep", ["--warps", "4", "6"], "--warps: invalid choice: 6"),
        ("tile_sweep", ["--row-factors", "1.5"], "--row-factors: must be a power of two from 1/256 to 64"),
        ("tile_sweep", ["--row-factors", "0"], "--row-factors: must be a power of two from 1/256 to 64"),
        ("tile_sweep", ["--row-factors", "128"], "--row-factors: must be a power of two from 1/256 to 64"),
        ("tile_sweep", ["--warps", "64"], "--warps: invalid choice: 64"),
    ],
)
def test_scripts_refuse_arguments_out_of_range(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script", ["cpu_session.sh", "gpu_session.sh"])
def test_session_scripts_answer_help_and_refuse_an_option_for_their_folder(script, tmp_path):
    """--help prints the script's header; no OUT_DIR, or another option where it goes, is a usage
    error (the scripts would otherwise make a folder of that name, or pass it on to mkdir as an
    option; with none, bash's own message named a line of the script)."""
    def run(*arguments):
        return subprocess.run(["bash", str(BENCHMARKS / script), *arguments], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)  # fmt: skip

    shown = run("--help")
    assert shown.returncode == 0 and re.search(rf"Usage, from the repo root.*: bash benchmarks/{script} OUT_DIR", shown.stdout)
    for refused in (run("--out"), run()):
        assert refused.returncode == 2 and refused.stderr == f"usage: {script} OUT_DIR [DATA_DIR] (--help for more)\n"
    assert list(tmp_path.iterdir()) == []


def run_gpu_session_on_stubs(tmp_path, python3_script: str, steps: str, data: bool = True, **env: str
                             ) -> tuple[int, str]:  # fmt: skip
    """gpu_session.sh with `python3` and `nvidia-smi` replaced by shell stubs (no GPU here), a
    DATA_DIR with the text and a tiktoken folder (or none: data False), env's variables set: its
    exit status and tables.txt."""
    stubs = tmp_path / "bin"
    stubs.mkdir(parents=True)
    for name, body in (("nvidia-smi", "echo 'Stub GPU'"), ("python3", python3_script)):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    if data:
        (tmp_path / "data" / "tiktoken").mkdir(parents=True)
        (tmp_path / "data" / "the-verdict.txt").write_text("A story.")
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "GPU_SESSION_STEPS": steps, **env}
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_session.sh"), str(tmp_path / "out"), str(tmp_path / "data")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    return result.returncode, (tmp_path / "out" / "tables.txt").read_text()


def test_gpu_session_records_each_failing_command_and_goes_on(tmp_path):
    """A step's exit status is lost in its pipe to tables.txt unless kept: each failure is written
    there, the later commands still run, and the script exits 1."""
    fail_some = 'echo "ran $*"; case "$*" in *sort_crossover*) exit 3 ;; *"--batch 8") exit 124 ;; esac'
    status, tables = run_gpu_session_on_stubs(tmp_path, fail_some, "sortcross host profile")
    assert status == 1
    assert "exit 3: python3 benchmarks/sort_crossover.py" in tables
    assert "exit 124: python3 benchmarks/profile_backward.py --preset gpt2-124M --batch 8" in tables
    assert "ran benchmarks/host_overhead.py --device cuda" in tables
    assert tables.count("ran benchmarks/profile_backward.py") == 4
    assert tables.count("exit ") == 2


def test_gpu_session_stops_at_a_failed_smoke_check(tmp_path):
    fail_the_bench = 'echo "ran $*"; case "$*" in *fusedemb.bench*) exit 1 ;; esac'
    status, tables = run_gpu_session_on_stubs(tmp_path, fail_the_bench, "smoke sortcross")
    assert status == 1
    assert "exit 1: python3 -m fusedemb.bench --device cuda --quick" in tables
    assert "smoke check failed: stopping" in tables
    assert "sort_crossover" not in tables


def test_gpu_session_goes_on_after_a_smoke_check_that_timed_out(tmp_path):
    """A timeout (a slow first compile) is not a failed check: the later steps still run."""
    time_out_the_smoke = 'echo "ran $*"; case "$*" in *--quick*) exit 124 ;; esac'
    status, tables = run_gpu_session_on_stubs(tmp_path, time_out_the_smoke, "smoke sortcross")
    assert status == 1
    assert "smoke check timed out: going on" in tables and "ran benchmarks/sort_crossover.py" in tables


def test_gpu_session_without_its_data_leaves_the_text_rows_out(tmp_path):
    """A lent machine gets the checkout only: without DATA_DIR's files the text-id rows and
    profile are left out (the bench would refuse the whole command), and said so."""
    for data in (True, False):
        status, tables = run_gpu_session_on_stubs(tmp_path / str(data), 'echo "ran $*"', "bench profile", data=data)
        assert status == 0
        text_ids = f"text:{tmp_path / str(data) / 'data' / 'the-verdict.txt'}"
        assert tables.count(text_ids) == (3 if data else 0)  # both gpt2-124M dtypes, one profile
        assert tables.count("ran benchmarks/profile_backward.py") == (4 if data else 3)
        assert ("the text-id rows and profile are left out" in tables) != data


def test_gpu_session_skips_what_its_budget_cannot_fit(tmp_path):
    """GPU_SESSION_BUDGET_S: a command needs 20 s of it left (and 10 for a kill): with 31 s, the
    first command runs (bash's SECONDS may already read 1, at a second's boundary), takes two
    and more, and the rest are skipped, each written down."""
    slow_profile = 'case "$*" in *profile_backward*) sleep 2.1 ;; esac; echo "ran $*"'
    status, tables = run_gpu_session_on_stubs(
        tmp_path, slow_profile, "sortcross host profile", GPU_SESSION_BUDGET_S="31"
    )
    assert status == 0
    assert tables.count("ran benchmarks/") == 1 and "ran benchmarks/profile_backward.py" in tables  # the first
    assert tables.count("skipped, the 31 s budget spent: python3 benchmarks/") == 5  # 3 profiles, sort, host


def test_gpu_session_exits_0_when_every_command_does(tmp_path):
    steps = "smoke sortcross rangecheck host profile tiles"
    status, tables = run_gpu_session_on_stubs(tmp_path, 'echo "ran $*"', steps)
    assert status == 0 and "exit " not in tables
    # each command's wall time, for the next session's budget: smoke, sort, 4 range check, host, 4 profiles, 4 tiles
    assert len(re.findall(r"\(took \d+ s of its \d+; \d+ s of the 580 s budget gone\)", tables)) == 15
    assert tables.count("ran benchmarks/tile_sweep.py") == 3 and tables.count("--cache-flush read") == 1
    assert tables.count("ran -m fusedemb.bench") == 4 and tables.count("ran benchmarks/range_check_cost.py") == 2


def test_gpu_session_times_each_variant_against_the_checkout(tmp_path):
    """Each folder of .variants with a fusedemb package gets the checkout's bench cases, in a
    process that imports it first (PYTHONSAFEPATH: not the working directory's); the runs that
    wrote their JSON are then compared, the checkout's first. Other folders are not variants."""
    for name in ("fast1", "wider"):
        (tmp_path / ".variants" / name / "fusedemb").mkdir(parents=True)
        (tmp_path / ".variants" / name / "fusedemb" / "__init__.py").write_text("")
    (tmp_path / ".variants" / "notes").mkdir()
    # the stub writes each --json file, but not wider's (as a bench that crashed at its import)
    stub = ('echo "ran $* SAFE=${PYTHONSAFEPATH:-} FIRST=${PYTHONPATH%%:*}"; previous=; for arg in "$@"; do '
            '[ "$previous" = --json ] && case "$arg" in *wider*) ;; *) : > "$arg" ;; esac; previous=$arg; done')
    status, tables = run_gpu_session_on_stubs(tmp_path, stub, "variants")
    assert status == 0
    out = tmp_path / "out"
    benches = [line for line in tables.splitlines() if line.startswith("ran -m fusedemb.bench")]
    assert [line.split("--json ")[1].split()[0] for line in benches] == [
        str(out / f"variant_{name}.json") for name in ("checkout", "fast1", "wider")
    ]
    assert [line.split("FIRST=")[1] for line in benches] == [
        str(tmp_path), str(tmp_path / ".variants" / "fast1"), str(tmp_path / ".variants" / "wider")
    ]
    assert all("SAFE=1" in line and "--impl fusedemb-fast fusedemb-deterministic" in line for line in benches)
    assert (f"ran benchmarks/compare_runs.py {out / 'variant_checkout.json'} {out / 'variant_fast1.json'} "
            "--labels checkout fast1") in tables  # fmt: skip
    status, tables = run_gpu_session_on_stubs(tmp_path / "none", stub, "variants")
    assert status == 0 and "no kernel variants in .variants" in tables and "ran -m fusedemb.bench" not in tables


def bench_report(path, commit: str, medians: dict) -> Path:
    """A bench --json report of gpt2-124M B8 float32 uniform rows: impl -> median seconds (None:
    not timed, a mismatch)."""
    results = [{"config": "gpt2-124M", "batch": 8, "dtype": "float32", "ids": "uniform", "impl": impl,
                "pass": "forward", "status": "ok" if median is not None else "mismatch", "median_s": median}
               for impl, median in medians.items()]  # fmt: skip
    report = {"schema_version": 1, "environment": {"fusedemb_commit": commit}, "copy_bandwidth_gbps": 4232.0,
              "results": results}  # fmt: skip
    path.write_text(json.dumps(report))
    return path


def test_compare_runs_puts_each_case_of_the_first_run_beside_the_others(tmp_path, capsys):
    base = bench_report(tmp_path / "base.json", "abc1234", {"fusedemb-fast": 100e-6, "fusedemb-deterministic": 120e-6})
    variant = bench_report(tmp_path / "v.json", None, {"fusedemb-fast": 90e-6, "fusedemb-deterministic": None})
    load_script("compare_runs").main([str(base), str(variant), "--labels", "main", "tiles"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["main: copy bandwidth 4232.0 GB/s, fusedemb abc1234",
                         "tiles: copy bandwidth 4232.0 GB/s, fusedemb commit unknown"]  # fmt: skip
    assert lines[3] == "| config | batch | dtype | ids | impl | pass | main us | tiles us | tiles / main |"
    assert lines[5:] == [
        "| gpt2-124M | 8 | float32 | uniform | fusedemb-fast | forward | 100.0 | 90.0 | 0.900 |",
        "| gpt2-124M | 8 | float32 | uniform | fusedemb-deterministic | forward | 120.0 | - | - |",
    ]


@pytest.mark.parametrize(
    "content, message",
    [("{", "cannot read a bench report"), ('{"results": []}', "not a report of python -m fusedemb.bench --json")],
)
def test_compare_runs_refuses_a_file_that_is_no_bench_report(tmp_path, capsys, content, message):
    (tmp_path / "bad.json").write_text(content)
    base = bench_report(tmp_path / "base.json", "abc1234", {"fusedemb-fast": 1e-4})
    with pytest.raises(SystemExit) as exit_info:
        load_script("compare_runs").main([str(base), str(tmp_path / "bad.json")])
    assert exit_info.value.code == 2 and f"{tmp_path / 'bad.json'}: {message}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_script("compare_runs").main([str(base), "--labels", "a", "b"])
    assert "--labels: 2 names for 1 runs" in capsys.readouterr().err


def test_the_pytest_benchmark_suite_times_skewed_ids_and_real_text():
    """DESIGN.md: benchmarks must include skewed distributions and real tokenized text, not only
    uniform random ids; the suite CI runs in its quick mode is one of them."""
    suite = load_script("bench_fused_embedding")
    kinds = {spec.partition(":")[0] for spec in suite.IDS_SPECS}
    assert {"zipf", "text"} <= kinds, suite.IDS_SPECS
    assert suite.VERDICT == VERDICT_PATH  # the text the tests read, not a path whose cases all skip
