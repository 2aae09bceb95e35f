"""Tests of the benchmark CLI (fusedemb.bench): arguments, id distributions, the bytes model, the
correctness gate, the JSON report and a tiny end-to-end CPU run. Nothing here asserts a timing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from shared_data import use_shared_tiktoken_cache, verdict_path

from fusedemb.bench import cli, environment, timing
from fusedemb.bench.bytes_model import PASSES, backward_bytes, forward_bytes, pass_bytes
from fusedemb.bench.configs import PRESETS, ModelConfig, Problem, resolve_configs, sweep
from fusedemb.bench.gate import GateResult, check_against_reference, gate
from fusedemb.bench.ids import Same, Text, Uniform, Zipf, parse_distribution
from fusedemb.bench.implementations import Implementation, build_implementations, eager_embedding
from fusedemb.bench.memory import peak_extra_bytes
from fusedemb.bench.passes import bytes_moved, make_inputs, make_pass
from fusedemb.bench.plot import plot_report
from fusedemb.bench.report import Report, format_table
from fusedemb.bench.runner import Result, Runner
from fusedemb.bench.timing import (
    CACHE_FLUSHES,
    CacheFlush,
    CpuTimer,
    Timer,
    TimingStats,
    copy_bandwidth,
    format_median_and_spread,
    last_level_cache_bytes,
)

TINY = ModelConfig("tiny", vocab=97, dim=16, seq=8)
TINY_ARGS = ["--device", "cpu", "--vocab", "97", "--dim", "16", "--seq", "8", "--quick"]


def tiny_problem(ids: str = "uniform", batch: int = 3, dtype: torch.dtype = torch.float32) -> Problem:
    return Problem(TINY, batch, dtype, parse_distribution(ids))


def quick_runner(passes=PASSES, copy_bandwidth: float = 1e10) -> Runner:
    timer = CpuTimer(budget_s=0.0, min_reps=2, max_reps=2, warmup_reps=1)
    return Runner("cpu", timer, copy_bandwidth=copy_bandwidth, passes=list(passes))


# --- arguments and configurations -------------------------------------------------------------


def test_defaults_on_cpu():
    args = cli.parse_args(["--device", "cpu"])
    assert [config.name for config in args.configs] == ["gpt2-124M"]
    assert args.batch == cli.DEFAULT_BATCHES["cpu"]
    assert args.impl == ["fusedemb", "eager", "compile"]
    assert args.passes == list(PASSES)
    assert args.dtype == ["float32"]
    assert [distribution.label for distribution in args.ids] == ["uniform", "zipf:1.1"]


def test_lists_of_presets_dtypes_ids_impls_and_passes():
    args = cli.parse_args([
        "--device", "cpu", "--preset", "gpt2-355M", "large-vocab", "--batch", "2", "8",
        "--dtype", "bfloat16", "float16", "--ids", "same", "zipf:1.3",
        "--impl", "eager", "reference", "--pass", "backward",
    ])
    assert args.configs == [PRESETS["gpt2-355M"], PRESETS["large-vocab"]]
    assert PRESETS["large-vocab"] == ModelConfig("large-vocab", vocab=128256, dim=4096, seq=2048)
    assert args.batch == [2, 8]
    assert args.dtype == ["bfloat16", "float16"]
    assert args.ids == [Same(), Zipf(1.3)]
    assert args.impl == ["eager", "reference"]
    assert args.passes == ["backward"]


def test_values_given_twice_are_swept_once():
    """Otherwise each is run twice, and a baseline named twice divides its own first rows."""
    args = cli.parse_args([
        "--device", "cpu", "--preset", "tiny", "tiny", "--batch", "2", "1", "2", "--dtype", "float16", "float16",
        "--ids", "same", "zipf:1.3", "same", "--impl", "eager", "compile", "eager", "--pass", "forward", "forward",
    ])
    assert args.configs == [PRESETS["tiny"]]
    assert args.batch == [2, 1]
    assert args.dtype == ["float16"]
    assert args.ids == [Same(), Zipf(1.3)]
    assert args.impl == ["eager", "compile"]
    assert args.passes == ["forward"]


def test_size_flags_make_a_custom_config_or_rename_overridden_presets():
    assert resolve_configs(None, vocab=1000, dim=None, seq=64) == [
        ModelConfig("custom[V=1000 D=768 T=64]", vocab=1000, dim=768, seq=64)
    ]
    (overridden,) = resolve_configs(["gpt2-774M"], seq=256)
    assert overridden == ModelConfig("gpt2-774M[T=256]", vocab=50257, dim=1280, seq=256)
    with pytest.raises(ValueError, match="positive"):
        resolve_configs(None, dim=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ids", "zipf:x"], "argument --ids: zipf needs a numeric exponent, as in zipf:1.1, got 'zipf:x'"),
        (["--ids", "zipf:0"], "argument --ids: the zipf exponent must be positive and finite, got 'zipf:0'"),
        (["--ids", "zipf:inf"], "argument --ids: the zipf exponent must be positive and finite, got 'zipf:inf'"),
        (["--ids", "poisson"], "argument --ids: unknown id distribution 'poisson'"),
        (["--ids", "text:/no/such/file.txt"], "argument --ids: no such text file: /no/such/file.txt"),
        (["--preset", "gpt5"], "argument --preset: invalid choice: 'gpt5'"),
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--impl", "numpy"], "argument --impl: invalid choice: 'numpy'"),
        (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--vocab", "-3"], "--vocab must be positive, got -3"),
        (["--seq", str(2**63)], f"--seq must fit in 64 bits (at most 2**63 - 1), got {2**63}"),
        (["--seed", str(2**64)], f"argument --seed: must be from -2**63 to 2**64 - 1 (a 64-bit seed), got {2**64}"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    ],
)
def test_bad_arguments_exit_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_text_files_are_swept_once_and_told_apart_by_name(tmp_path, monkeypatch, capsys):
    """One file named two ways is one distribution; two files of one name would share a row
    label in the table and the plot, and are refused."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.txt").write_text("Hello, world. " * 20)
    monkeypatch.chdir(tmp_path)
    args = cli.parse_args(["--device", "cpu", "--ids", "text:a/x.txt", f"text:{tmp_path}/a/x.txt", "uniform"])
    assert [distribution.label for distribution in args.ids] == ["text:x.txt", "uniform"]
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--device", "cpu", "--ids", "text:a/x.txt", "text:b/x.txt"])
    assert exit_info.value.code == 2
    assert "error: --ids: two values would both read text:x.txt" in capsys.readouterr().err


def test_seeds_take_the_range_of_torch_generators():
    """Both ends of manual_seed's range are seeds; a bad one is refused by the parser above."""
    for value in cli.SEED_RANGE:
        assert cli.parse_args(["--device", "cpu", "--seed", str(value)]).seed == value
        torch.Generator().manual_seed(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_output_paths_are_checked_before_the_sweep(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([*TINY_ARGS, flag, str(tmp_path / "missing" / "out")])
    assert exit_info.value.code == 2
    assert f"{flag} {tmp_path / 'missing' / 'out'}: the folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args([*TINY_ARGS, flag, str(tmp_path)])
    assert f"{flag} {tmp_path}: a folder, not a file" in capsys.readouterr().err


def test_json_and_plot_to_the_same_file_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """The plot, written second, would silently replace the JSON (both end .png, say)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([*TINY_ARGS, "--json", "bench.png", "--plot", str(tmp_path / "bench.png")])
    assert exit_info.value.code == 2
    assert "--json and --plot name the same file, bench.png" in capsys.readouterr().err


def test_output_paths_are_checked_for_writing_and_left_as_they_were(tmp_path, capsys):
    """Whether the file can be written is also known before the sweep (procfs refuses a new
    file even to root, whom permissions would not stop); the check leaves no file behind and
    an existing one as it was."""
    if Path("/proc/self").is_dir():  # Linux
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_args([*TINY_ARGS, "--json", "/proc/bench.json"])
        assert exit_info.value.code == 2
        assert "--json /proc/bench.json: cannot be written" in capsys.readouterr().err
    new, existing = tmp_path / "new.json", tmp_path / "existing.json"
    existing.write_text("earlier results")
    cli.parse_args([*TINY_ARGS, "--json", str(new)])
    cli.parse_args([*TINY_ARGS, "--json", str(existing)])
    assert not new.exists() and existing.read_text() == "earlier results"


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_sweep(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli.parse_args([*TINY_ARGS, "--plot", str(tmp_path / "plot.xyz")])
    error = capsys.readouterr().err
    assert "the file name must end in one of" in error and ".png" in error and ".svg" in error

    def no_matplotlib():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(cli, "plot_suffixes", no_matplotlib)
    with pytest.raises(SystemExit):
        cli.parse_args([*TINY_ARGS, "--plot", str(tmp_path / "plot.png")])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_sweep_keeps_each_shape_together():
    distributions = [Uniform(), Zipf(1.1)]
    problems = sweep([TINY], [1, 2], [torch.float32, torch.bfloat16], distributions)
    assert len(problems) == 8
    shapes = [(problem.dtype, problem.batch) for problem in problems]
    # each (dtype, batch) shape appears in one run of consecutive problems
    runs = [shape for index, shape in enumerate(shapes) if index == 0 or shapes[index - 1] != shape]
    assert len(runs) == len(set(shapes)) == 4


def test_presets_have_the_models_sizes():
    """GPT-2's four sizes (Radford et al. 2019) and a Llama-3-like large vocabulary: the sizes
    every figure of the README names."""
    sizes = {name: (config.vocab, config.dim, config.seq) for name, config in PRESETS.items()}
    assert sizes == {
        "gpt2-124M": (50257, 768, 1024), "gpt2-355M": (50257, 1024, 1024), "gpt2-774M": (50257, 1280, 1024),
        "gpt2-1.5B": (50257, 1600, 1024), "large-vocab": (128256, 4096, 2048), "tiny": (512, 64, 32),
    }  # fmt: skip


# --- id distributions -------------------------------------------------------------------------


def draw(distribution, batch=4, seq=512, vocab=1000, seed=0) -> torch.Tensor:
    return distribution.sample(batch, seq, vocab, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", ["uniform", "zipf:1.1", "same"])
def test_ids_have_the_batch_shape_and_stay_in_the_vocabulary(spec):
    ids = draw(parse_distribution(spec), batch=3, seq=50, vocab=40)
    assert ids.shape == (3, 50) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < 40


def test_zipf_is_skewed_like_its_law_and_scatters_the_frequent_ids():
    vocab, exponent = 1000, 1.1
    counts = torch.bincount(draw(Zipf(exponent), vocab=vocab).flatten(), minlength=vocab).sort(descending=True).values
    expected_top_share = 1 / torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent).sum().item()
    top_share = counts[0].item() / counts.sum().item()
    assert top_share == pytest.approx(expected_top_share, rel=0.15)  # ~0.16 here, 0.001 if uniform
    assert counts[:10].sum() > 0.4 * counts.sum()
    uniform_counts = torch.bincount(draw(Uniform(), vocab=vocab).flatten(), minlength=vocab)
    assert uniform_counts.max() < 10 * uniform_counts.float().mean()
    # the most frequent id is not simply id 0: ranks are permuted over the table
    most_frequent = {torch.bincount(draw(Zipf(exponent), seed=seed).flatten()).argmax().item() for seed in range(5)}
    assert len(most_frequent) > 1


def test_larger_zipf_exponent_is_more_skewed():
    def distinct(exponent):
        return draw(Zipf(exponent)).unique().numel()

    assert distinct(2.0) < distinct(1.1) < draw(Uniform()).unique().numel()


def test_same_puts_one_id_everywhere():
    ids = draw(Same())
    assert (ids == ids[0, 0]).all()


def test_same_seed_same_ids():
    assert torch.equal(draw(Zipf(1.1), seed=3), draw(Zipf(1.1), seed=3))


def test_text_ids_are_the_tokenized_file_tiled_over_the_batch(tmp_path):
    use_shared_tiktoken_cache()
    from fusedemb.data import load_gpt2_tokenizer

    path = tmp_path / "short.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.")
    stream = torch.tensor(load_gpt2_tokenizer().encode(path.read_text()))
    batch, seq = 3, 7  # 21 ids from a stream of 10: the text is repeated end to end
    ids = Text(path).sample(batch, seq, 50257, torch.Generator())
    assert torch.equal(ids.flatten(), stream.repeat(3)[: batch * seq])
    folded = Text(path).sample(batch, seq, 1000, torch.Generator())
    assert torch.equal(folded, ids % 1000)


def test_text_that_gives_no_ids_is_refused_before_the_sweep(tmp_path, capsys):
    """Tokenized when the argument is parsed: an empty or undecodable file is a usage error
    (exit 2) before anything is timed, not an error row on its turn in the sweep."""
    use_shared_tiktoken_cache()
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("")
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    for path, message in ((empty, "holds no tokens"), (latin1, "can't decode byte")):
        with pytest.raises(ValueError, match=message):
            parse_distribution(f"text:{path}")
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_args([*TINY_ARGS, "--ids", f"text:{path}"])
        assert exit_info.value.code == 2
        assert "argument --ids: " in capsys.readouterr().err


def test_text_of_the_shared_story_is_real_skewed_text():
    use_shared_tiktoken_cache()
    distribution = parse_distribution(f"text:{verdict_path()}")
    assert distribution.label == "text:the-verdict.txt"
    ids = draw(distribution, batch=2, seq=4096, vocab=50257)
    counts = torch.bincount(ids.flatten())
    assert counts.max() > 100 * counts[counts > 0].float().median()


def test_uniform_ids_reach_both_ends_of_the_vocabulary():
    ids = Uniform().sample(4, 512, 10, torch.Generator().manual_seed(0))
    assert ids.min() == 0 and ids.max() == 9


# --- bytes model ------------------------------------------------------------------------------


def test_bytes_model_at_gpt2_124m():
    tokens, seq, vocab, dim, elt, ids = 8 * 1024, 1024, 50257, 768, 4, 8
    forward = forward_bytes(tokens=tokens, seq=seq, dim=dim, element_size=elt, id_size=ids)
    assert forward == tokens * ids + tokens * dim * elt + seq * dim * elt + tokens * dim * elt
    assert forward == pytest.approx(2 * tokens * dim * elt, rel=0.07)  # "about 2*N*D*elt"
    backward = backward_bytes(tokens=tokens, vocab=vocab, positions=seq, dim=dim, element_size=elt, id_size=ids)
    assert backward == tokens * ids + tokens * dim * elt + vocab * dim * elt + seq * dim * elt
    sizes = dict(tokens=tokens, seq=seq, vocab=vocab, positions=seq, dim=dim, element_size=elt, id_size=ids)
    assert pass_bytes("forward", **sizes) == forward
    assert pass_bytes("backward", **sizes) == backward
    assert pass_bytes("forward+backward", **sizes) == forward + backward
    with pytest.raises(ValueError):
        pass_bytes("sideways", **sizes)


def test_bytes_model_scales_with_the_element_size():
    sizes = dict(tokens=64, seq=8, vocab=100, positions=8, dim=32, id_size=8)
    fp32, bf16 = pass_bytes("forward", element_size=4, **sizes), pass_bytes("forward", element_size=2, **sizes)
    assert fp32 - 64 * 8 == 2 * (bf16 - 64 * 8)


def test_bytes_moved_reads_the_sizes_off_the_inputs():
    """The bytes model applied to the tensors a run times: their shapes and element sizes."""
    inputs = make_inputs(Problem(TINY, 3, torch.bfloat16, Uniform()), "cpu", seed=0)
    sizes = {"tokens": 24, "seq": 8, "vocab": 97, "positions": 8, "dim": 16, "element_size": 2, "id_size": 8}
    for name in PASSES:
        assert bytes_moved(name, inputs) == pass_bytes(name, **sizes)


# --- correctness gate -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids", ["uniform", "zipf:1.1", "same"])
@pytest.mark.parametrize("name", ["eager", "fusedemb", "reference"])
def test_gate_passes_the_correct_implementations(name, dtype, ids):
    available, skipped = build_implementations([name], "cpu")
    if skipped:
        pytest.skip(skipped[name])
    result = gate(available[0], make_inputs(tiny_problem(ids, dtype=dtype), "cpu", seed=1))
    assert result.passed, result.detail


def forgets_positions(ids, tok_weight, pos_weight):
    return torch.nn.functional.embedding(ids, tok_weight) + 0 * pos_weight.sum()


def doubles_token_gradient(ids, tok_weight, pos_weight):
    # the value of tok_weight with twice its gradient: the output is right, the backward is not
    return eager_embedding(ids, tok_weight + (tok_weight - tok_weight.detach()), pos_weight)


def returns_nan(ids, tok_weight, pos_weight):
    out = eager_embedding(ids, tok_weight, pos_weight)
    return out.index_fill(-1, torch.tensor([0]), float("nan"))


@pytest.mark.parametrize(
    "wrong, complaint",
    [(forgets_positions, "output"), (doubles_token_gradient, "grad tok_weight"), (returns_nan, "output")],
)
def test_gate_catches_a_wrong_implementation(wrong, complaint):
    result = check_against_reference(wrong, make_inputs(tiny_problem(), "cpu", seed=0))
    assert not result.passed
    assert complaint in result.detail


def ulps_up(values: torch.Tensor, count: int) -> torch.Tensor:
    for _ in range(count):
        values = torch.nextafter(values, torch.full_like(values, float("inf")))
    return values


def output_ulps_off(count: int):
    """An implementation whose every output element is `count` ulps above the right one."""

    def forward(ids, tok_weight, pos_weight):
        out = eager_embedding(ids, tok_weight, pos_weight)
        return out + (ulps_up(out.detach(), count) - out.detach())

    return forward


def token_gradient_3_ulps_off_in_one_row(ids, tok_weight, pos_weight):
    # right output; the first id's row of the token gradient 3 ulps high, 2x the error bound of
    # a sum of its few terms: too little for the norm-wise check to see
    row = int(ids.flatten()[0])

    def nudge(grad):
        grad = grad.clone()
        grad[row] = ulps_up(grad[row], 3)
        return grad

    tok = tok_weight.view_as(tok_weight)
    tok.register_hook(nudge)
    return eager_embedding(ids, tok, pos_weight)


def test_gate_allows_one_ulp_of_output_and_no_more():
    inputs = make_inputs(tiny_problem(), "cpu", seed=0)
    assert check_against_reference(output_ulps_off(1), inputs).passed
    result = check_against_reference(output_ulps_off(2), inputs)
    assert not result.passed and "output off by up to 2 ulps" in result.detail


def test_gate_checks_each_gradient_element_against_its_bound():
    result = check_against_reference(token_gradient_3_ulps_off_in_one_row, make_inputs(tiny_problem(), "cpu", seed=0))
    assert not result.passed and "grad tok_weight off by" in result.detail and "error bound" in result.detail


def test_float32_sums_is_the_stricter_bound():
    """PyTorch's CPU backward sums bfloat16 rows in bfloat16: it fails float32 accumulation's
    bound with Zipf ids (rows of many terms) and meets its own precision's."""
    inputs = make_inputs(tiny_problem("zipf:1.1", dtype=torch.bfloat16), "cpu", seed=1)
    assert not check_against_reference(eager_embedding, inputs, float32_sums=True).passed
    assert check_against_reference(eager_embedding, inputs, float32_sums=False).passed


def test_the_sixteen_bit_note_is_only_for_sixteen_bit_sums():
    """A wrong implementation held to float32 sums fails without the note on PyTorch's 16-bit
    CPU sums, which is about implementations whose sums are 16-bit."""
    wrong = Implementation("wrong", doubles_token_gradient, float32_sums=True)
    result = gate(wrong, make_inputs(tiny_problem(dtype=torch.bfloat16), "cpu", seed=0))
    assert not result.passed and "16-bit" not in result.detail


def test_on_cuda_every_implementation_is_held_to_float32_sums(monkeypatch):
    """PyTorch's CUDA embedding backward accumulates in float32, so on CUDA the gate asks
    float32's bound of eager and torch.compile too (only their CPU backward sums in 16 bits)."""
    asked = []

    def record(forward, inputs, float32_sums, gradients):
        asked.append(float32_sums)
        return GateResult(passed=True, detail="")

    monkeypatch.setattr("fusedemb.bench.gate.check_against_reference", record)
    (eager,), _ = build_implementations(["eager"], "cpu")
    for on_cuda in (False, True):
        gate(eager, SimpleNamespace(ids=SimpleNamespace(is_cuda=on_cuda)))
    assert asked == [False, True]


def loses_one_update(ids, tok_weight, pos_weight):
    # right output; the first token's gradient reaches neither table
    out = eager_embedding(ids, tok_weight, pos_weight).clone()
    out[0, 0] = out[0, 0].detach()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_catches_one_lost_update_among_32k_tokens(dtype):
    # At benchmark sizes a norm-wise error averages one missing token away; the per-element
    # bound does not where the row has few terms, as token rows do with uniform ids. (Position
    # rows sum 32 terms here, which in bfloat16 may lose one within the bound.)
    problem = Problem(ModelConfig("gpt2-124M[D=16]", vocab=50257, dim=16, seq=1024), 32, dtype, Uniform())
    result = check_against_reference(loses_one_update, make_inputs(problem, "cpu", seed=0))
    assert not result.passed
    assert "grad tok_weight" in result.detail


def halves_the_hottest_row(ids, tok_weight, pos_weight):
    # right output; the most frequent id's rows get half their gradient
    hottest = torch.mode(ids.flatten()).values
    scale = torch.where(ids == hottest, 0.5, 1.0).to(tok_weight.dtype)[..., None]
    out = eager_embedding(ids, tok_weight, pos_weight)
    return out.detach() + (out - out.detach()) * scale


def one_wrong_output_row(ids, tok_weight, pos_weight):
    out = eager_embedding(ids, tok_weight, pos_weight).clone()
    out[0, 0] += 1
    return out


@pytest.mark.parametrize("wrong", [halves_the_hottest_row, one_wrong_output_row])
@pytest.mark.parametrize("ids", ["same", "zipf:1.1"])
def test_gate_catches_faults_on_hot_rows_in_bfloat16(wrong, ids):
    """Rows of thousands of tokens, where the per-element bound is loose (in bfloat16 sums,
    infinite): the norm-wise check of the gradients and the per-element check of the output
    still catch a fault, at 16k tokens."""
    problem = Problem(ModelConfig("gpt2-124M[D=8]", vocab=50257, dim=8, seq=1024), 16, torch.bfloat16, parse_distribution(ids))
    result = check_against_reference(wrong, make_inputs(problem, "cpu", seed=0), float32_sums=False)
    assert not result.passed


@pytest.mark.parametrize("name", ["eager", "reference"])
def test_sixteen_bit_cpu_backward_on_one_id_is_a_mismatch_that_says_why(name):
    """PyTorch's CPU backward of bfloat16 tables adds in bfloat16: 8k gradients of one row drift
    past the norm bound. The gate reports it, and says it is that backward's precision."""
    problem = Problem(ModelConfig("gpt2-124M[D=16]", vocab=50257, dim=16, seq=1024), 8, torch.bfloat16, parse_distribution("same"))
    (implementation,), _ = build_implementations([name], "cpu")
    inputs = make_inputs(problem, "cpu", seed=0)
    result = gate(implementation, inputs)
    assert not result.passed and "adds 16-bit gradients in 16 bits" in result.detail
    # Its forward is exact: a run that times the forward only checks the output only.
    assert gate(implementation, inputs, gradients=False).passed


def test_a_forward_only_run_does_not_check_gradients():
    results = quick_runner(["forward"]).run_problem(tiny_problem(), [Implementation("wrong-backward", doubles_token_gradient)])
    assert [result.status for result in results] == ["ok"]
    results = quick_runner(["forward", "backward"]).run_problem(tiny_problem(), [Implementation("wrong-backward", doubles_token_gradient)])
    assert [result.status for result in results] == ["mismatch", "mismatch"]


def test_a_mismatch_is_reported_and_not_timed():
    timed = []

    def wrong(ids, tok_weight, pos_weight):
        timed.append(1)
        return doubles_token_gradient(ids, tok_weight, pos_weight)

    results = quick_runner().run_problem(
        tiny_problem(), [Implementation("wrong", wrong), Implementation("eager", eager_embedding)]
    )
    wrong_results = [result for result in results if result.impl == "wrong"]
    assert [result.status for result in wrong_results] == ["mismatch"] * 3
    assert all(result.timing is None and result.gbps is None for result in wrong_results)
    assert len(timed) == 1  # the gate's own call, nothing after it
    assert all(result.status == "ok" for result in results if result.impl == "eager")


def test_an_implementation_that_raises_is_an_error_row():
    def broken(ids, tok_weight, pos_weight):
        raise RuntimeError("kernel exploded\nsecond line")

    (result, *_) = quick_runner().run_problem(tiny_problem(), [Implementation("broken", broken)])
    assert result.status == "error"
    assert result.note == "RuntimeError: kernel exploded"


def test_inputs_that_cannot_be_made_are_error_rows(tmp_path):
    """A text file that cannot be read (or memory that runs out) fails one problem's rows, not
    the sweep: the problems before and after it are still measured."""
    missing = Problem(TINY, 2, torch.float32, Text(tmp_path / "missing.txt"))
    runner = quick_runner(passes=["forward"])
    rows = [result for problem in (tiny_problem(), missing, tiny_problem("same"))
            for result in runner.run_problem(problem, [Implementation("eager", eager_embedding)])]  # fmt: skip
    assert [row.status for row in rows] == ["ok", "error", "ok"]
    assert rows[1].note.startswith("inputs: ")


def test_unavailable_implementations_are_skipped_with_a_reason():
    available, skipped = build_implementations(["fusedemb-fast", "fusedemb-deterministic", "eager"], "cpu")
    assert [implementation.name for implementation in available] == ["eager"]
    assert set(skipped) == {"fusedemb-fast", "fusedemb-deterministic"}
    assert all("CUDA" in reason for reason in skipped.values())


# --- passes, timing, memory, speedups ---------------------------------------------------------


def test_backward_pass_gets_a_fresh_forward_from_its_untimed_setup():
    inputs = make_inputs(tiny_problem(), "cpu", seed=0)
    work = make_pass("backward", eager_embedding, inputs)
    (out,) = work.setup()
    grad_tok, grad_pos = work.run(out)
    assert grad_tok.shape == inputs.tok_weight.shape and grad_pos.shape == inputs.pos_weight.shape
    assert inputs.tok_weight.grad is None  # autograd.grad: nothing accumulates between repeats


def test_timer_runs_setup_then_flushes_the_cache_before_every_call():
    events = []
    timer = CpuTimer(budget_s=0.0, min_reps=4, max_reps=4, warmup_reps=1)
    timer.flush_cache = lambda: events.append("flush")
    stats = timer.measure(run=lambda token: events.append(token), setup=lambda: (len(events),))
    # One warm-up, then four timed repeats. Each token is the event count its setup saw: 0, 2,
    # ... before the flush that precedes it, so the order is setup, flush, run.
    assert events == ["flush", 0, "flush", 2, "flush", 4, "flush", 6, "flush", 8]
    assert stats.reps == 4


def fake_sysfs(root, caches_by_cpu):
    """cpu<i>/cache/index<j>/{level,size,shared_cpu_list} under root, as Linux lays them out."""
    for cpu, caches in enumerate(caches_by_cpu):
        for index, fields in enumerate(caches):
            cache = root / f"cpu{cpu}" / "cache" / f"index{index}"
            cache.mkdir(parents=True)
            for name, value in fields.items():
                (cache / name).write_text(value + "\n")
    (root / "cpufreq").mkdir(exist_ok=True)  # not a CPU


def test_last_level_cache_bytes_counts_each_shared_cache_once(tmp_path):
    def l1(cpu):
        return {"level": "1", "size": "32K", "shared_cpu_list": str(cpu)}

    def l3(shared_by):
        return {"level": "3", "size": "32768K", "shared_cpu_list": shared_by}

    one_l3 = tmp_path / "one"
    fake_sysfs(one_l3, [[l1(0), l3("0-1")], [l1(1), l3("0-1")]])
    assert last_level_cache_bytes(one_l3) == 32 * 2**20
    two_l3 = tmp_path / "two"  # two chiplets (or sockets), an L3 each
    fake_sysfs(two_l3, [[l1(0), l3("0")], [l1(1), l3("1")]])
    assert last_level_cache_bytes(two_l3) == 64 * 2**20
    unreadable = tmp_path / "unreadable"  # a cache with no size file is skipped
    fake_sysfs(unreadable, [[l1(0), {"level": "3", "shared_cpu_list": "0"}]])
    assert last_level_cache_bytes(unreadable) == 32 * 2**10
    assert last_level_cache_bytes(tmp_path / "missing") == 0


@pytest.mark.parametrize(("l3_mib", "flush_mib", "copy_mib"), [(0, 64, 256), (8, 64, 256), (480, 960, 960)])
def test_the_flush_and_the_copy_buffer_dwarf_the_last_level_cache(monkeypatch, l3_mib, flush_mib, copy_mib):
    """Twice the L3, at least 64 MiB, for the flush; a full run's copy buffer is its preset (256 MiB
    on CPU) or the flush's where that is larger (a 480 MiB L3: one of this project's VMs)."""
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: l3_mib * 2**20)
    assert CacheFlush("cpu")._buffer.nbytes == flush_mib * 2**20
    assert cli.copy_buffer_mib("cpu", quick=False) == copy_mib
    assert cli.copy_buffer_mib("cpu", quick=True) == 64  # a smoke test's, whatever the cache
    assert (cli.copy_buffer_mib("cuda", quick=False), cli.copy_buffer_mib("cuda", quick=True)) == (1024, 256)


def test_the_flush_counts_against_the_time_budget():
    """A call of microseconds gets budget / (call + flush) repeats, not max_reps flushes."""
    timer = CpuTimer(budget_s=0.05, min_reps=1, max_reps=1000, warmup_reps=1)
    assert timer.untimed_s_per_call > 0
    timer.untimed_s_per_call = 0.01
    timer.flush_cache = lambda: None
    # ceil(0.05 / (0.01 + the call)) = 5 for a call of microseconds (fewer if the VM stalls it)
    assert timer.measure(lambda: None).reps <= 5


def test_timing_stats_quantiles():
    stats = TimingStats.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.p25_s, stats.median_s, stats.p75_s, stats.reps) == (2.0, 3.0, 4.0, 5)
    assert stats.spread == pytest.approx(1 / 3)


def timed_result(impl: str, pass_name: str, timing: TimingStats, **figures) -> Result:
    """A timed row on the tiny problem, for tests of the report alone; figures override its
    bytes, gbps, copy_fraction, peak_extra_bytes or speedup."""
    figures = {"bytes": 1000, "gbps": 1.0, "copy_fraction": 0.1, "peak_extra_bytes": 0, **figures}
    return Result(tiny_problem(), impl, pass_name, "ok", timing=timing, **figures)


def test_gbps_and_copy_fraction_are_of_the_median_and_the_copy_bandwidth():
    (result,) = quick_runner(["forward"], copy_bandwidth=2e9).run_problem(
        tiny_problem(), [Implementation("eager", eager_embedding)]
    )
    assert result.gbps == pytest.approx(result.bytes / result.timing.median_s / 1e9)
    assert result.copy_fraction == pytest.approx(result.gbps / 2.0)


def test_the_runner_measures_each_pass_peak_memory():
    (result,) = quick_runner(["backward"]).run_problem(tiny_problem(), [Implementation("eager", eager_embedding)])
    assert result.peak_extra_bytes >= 97 * 16 * 4  # at least the dense (V, D) float32 token gradient


def test_peak_extra_memory_counts_a_temporary_once():
    peak = peak_extra_bytes(lambda: torch.ones(2**20).sum(), "cpu")  # one 4 MiB temporary
    assert 4 * 2**20 <= peak < 5 * 2**20


def test_the_seed_reaches_the_inputs(monkeypatch):
    from fusedemb.bench import runner

    seeds, make = [], runner.make_inputs
    monkeypatch.setattr(runner, "make_inputs", lambda problem, device, seed: seeds.append(seed) or make(problem, device, seed))
    args = [*TINY_ARGS, "--batch", "1", "--ids", "uniform", "--impl", "eager", "--pass", "forward", "--seed", "7"]
    assert cli.main(args) == 0
    assert seeds == [7]
    assert not torch.equal(make_inputs(tiny_problem(), "cpu", seed=0).ids, make_inputs(tiny_problem(), "cpu", seed=1).ids)


def test_the_cpu_cache_flush_is_outside_the_timed_region(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    timer = CpuTimer(budget_s=0.0, min_reps=3, max_reps=3, warmup_reps=1)

    def slow_flush():
        clock[0] += 1.0

    def run():
        clock[0] += 0.001

    timer.flush_cache = slow_flush
    assert timer.measure(run).median_s == pytest.approx(0.001)


def test_repeats_are_capped_at_max_reps():
    timer = CpuTimer(budget_s=10.0, min_reps=1, max_reps=3, warmup_reps=1)
    timer.flush_cache = lambda: None
    timer.untimed_s_per_call = 0.0
    assert timer.measure(lambda: None).reps == 3


def test_copy_bandwidth_counts_bytes_read_plus_written():
    class OneSecondPerCopy(Timer):
        def __init__(self):
            super().__init__(budget_s=0.0, min_reps=1, max_reps=1, warmup_reps=1)

        def time_calls(self, run, setup, reps):
            run(*setup())
            return [1.0] * reps, [1.0] * reps, None, None

    assert copy_bandwidth(OneSecondPerCopy(), "cpu", 4096) == 2 * 4096


def test_spreads_are_half_the_interquartile_range():
    stats = TimingStats(1e-3, 0.9e-3, 1.3e-3, 5, 1e-3)
    assert format_median_and_spread(stats, "ms").split("±")[1] == "0.200"


def test_the_host_median_comes_from_the_host_samples():
    assert TimingStats.from_samples([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]).host_median_s == 20.0


def known_result() -> Result:
    """A row whose every figure differs from the others, so that a cell showing the wrong one shows."""
    return timed_result("fusedemb", "forward", TimingStats(1e-3, 0.9e-3, 1.3e-3, 5, 2e-3), gbps=12.5,
                        copy_fraction=0.25, peak_extra_bytes=3 * 2**20, speedup={"eager": 2.0})  # fmt: skip


def test_table_cells_show_the_figures_in_their_units():
    table = format_table(Report(made_up_environment("cpu"), {}, 50e9, {}, [known_result()]))
    (row,) = [line for line in table.splitlines() if line.startswith("| tiny")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[6:] == ["1.00 ms", "20.0%", "2.00 ms", "12.5", "25%", "2.00x", "-", "3.0 MiB"]
    assert "copy bandwidth: 50.0 GB/s before the sweep" in table


def test_the_header_gives_the_copy_buffer_and_the_cache_flush():
    settings = {"copy_buffer_mib": 256, "cache_flush_mib": 71.5}  # twice a 35.75 MiB L3
    table = format_table(Report(made_up_environment("cpu"), settings, 50e9, {}, [known_result()]))
    assert "(dst.copy_(src) of 256 MiB, bytes read + written)" in table
    assert "cache flush: 71.5 MiB overwritten before every timed call" in table
    assert "cache flush" not in format_table(Report(made_up_environment("cpu"), {}, 50e9, {}, [known_result()]))
    read = format_table(Report(made_up_environment("cpu"), {**settings, "cache_flush": "read"}, 50e9, {},
                               [known_result()]))  # fmt: skip
    assert "cache flush: 71.5 MiB read before every timed call" in read


@pytest.mark.parametrize("mode", CACHE_FLUSHES)
def test_the_cache_flush_writes_or_only_reads_its_buffer(monkeypatch, mode):
    """write overwrites the whole buffer (dirty lines left in the cache); read leaves it as it
    was (clean lines) but goes through all of it."""
    monkeypatch.setattr(timing, "bytes_beyond_cache", lambda device: 4096 + 7)  # (not a multiple of 8)
    flush = CacheFlush("cpu", mode)
    buffer = flush._buffer
    assert buffer.nbytes == 4096
    buffer.fill_(3)
    summed = []  # (address, elements) of every tensor summed
    real_sum = torch.Tensor.sum

    def recording_sum(tensor, *args, **kwargs):
        summed.append((tensor.data_ptr(), tensor.numel()))
        return real_sum(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", recording_sum)
    flush()
    monkeypatch.setattr(torch.Tensor, "sum", real_sum)
    assert bool((buffer == (0 if mode == "write" else 3)).all())
    assert summed == ([] if mode == "write" else [(buffer.data_ptr(), buffer.numel())])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc/self/statm")
def test_the_read_flush_goes_through_memory_of_its_own(monkeypatch):
    """An untouched CPU buffer's pages all map the one zero page, which a sum would read from
    the cache: the buffer's pages are made resident before any flush reads them."""

    def resident_bytes() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    monkeypatch.setattr(timing, "bytes_beyond_cache", lambda device: 64 * 2**20)  # above malloc's mmap threshold
    before = resident_bytes()
    flush = CacheFlush("cpu", "read")
    flush()
    assert resident_bytes() - before >= flush._buffer.nbytes // 2


def test_an_unknown_cache_flush_is_refused():
    with pytest.raises(ValueError, match=r"unknown cache flush 'none'; expected one of \('write', 'read'\)"):
        CacheFlush("cpu", "none")


def test_json_fields_carry_their_own_values():
    report = Report(made_up_environment("cpu"), {}, 50e9, {}, [known_result()], copy_bandwidth_end=40e9).to_json()
    assert report["copy_bandwidth_gbps"] == 50.0 and report["copy_bandwidth_end_gbps"] == 40.0
    (row,) = report["results"]
    assert (row["gbps"], row["copy_fraction"], row["bytes"], row["peak_extra_bytes"]) == (12.5, 0.25, 1000, 3 * 2**20)
    assert (row["p25_s"], row["median_s"], row["p75_s"]) == (0.9e-3, 1e-3, 1.3e-3)
    assert row["speedup_vs_eager"] == 2.0 and row["speedup_vs_compile"] is None


def test_a_backward_within_the_spreads_of_forward_plus_backward_is_not_suspect():
    def result(pass_name, median):
        return timed_result("eager", pass_name, TimingStats(median, 0.8 * median, 1.2 * median, 5, median))

    report = Report(made_up_environment("cpu"), {}, 1e10, {}, [result("backward", 0.031), result("forward+backward", 0.030)])
    assert "suspect" not in format_table(report)


def test_the_plot_draws_gbps_against_tokens_under_the_copy_bandwidth(tmp_path):
    figure = plot_report(Report(made_up_environment("cpu"), {}, 50e9, {}, [known_result()]), tmp_path / "plot.png")
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert list(lines.pop("copy bandwidth").get_ydata()) == [50.0, 50.0]
    (series,) = lines.values()
    assert list(series.get_xdata()) == [24] and list(series.get_ydata()) == [12.5]  # B * T tokens
    assert figure.get_suptitle() == "fusedemb z on made up (cpu, torch x)"


def test_a_quick_plot_says_it_is_no_measurement_and_names_the_commit(tmp_path):
    environment = made_up_environment("cpu") | {"fusedemb_commit": "abc1234"}
    figure = plot_report(Report(environment, {"quick": True}, 50e9, {}, [known_result()]), tmp_path / "plot.png")
    assert figure.get_suptitle() == "fusedemb abc1234 on made up (cpu, torch x); --quick: a smoke test, not a measurement"


@pytest.mark.parametrize("load, warned", [(3.0, True), (1.5, False)])
def test_the_busy_cpu_warning_is_for_more_than_half_the_cpus(monkeypatch, capsys, load, warned):
    monkeypatch.setattr(environment, "load_average", lambda: load)
    monkeypatch.setattr(environment.os, "cpu_count", lambda: 4)
    environment.warn_if_cpu_busy("cpu")
    assert ("warning: load average" in capsys.readouterr().err) == warned


def test_the_source_commit_marks_uncommitted_changes(monkeypatch):
    if not (Path(environment.__file__).resolve().parents[2] / ".git").exists():
        pytest.skip("fusedemb is not imported from a git checkout")

    def git(args, **kwargs):
        out = "abc1234\n" if "rev-parse" in args else " M fusedemb/bench/cli.py\n"
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    monkeypatch.setattr(environment.subprocess, "run", git)
    assert environment.source_commit() == "abc1234+modified"


def made_up_environment(device: str) -> dict[str, object]:
    return {"device": device, "device_name": "made up", "torch_threads": 1, "torch": "x", "triton": "y", "fusedemb": "z"}


def test_calls_timed_without_the_gpu_hold_or_outrunning_it_are_marked():
    """A CUDA call that waits for the GPU is timed without the hold (its device time includes
    the GPU's idling), and a held one may outrun its hold: the table marks either median, and
    the JSON says so."""
    results = []
    # no hold (a syncing CUDA call), held (CUDA), held but outrun twice, CPU
    for held, outruns in ((False, 0), (True, 0), (True, 2), (None, None)):
        results.append(timed_result("fusedemb", "forward", TimingStats(1e-4, 9e-5, 1.1e-4, 5, 2e-4, held, outruns)))
    table = format_table(Report(made_up_environment("cuda"), {}, 1e12, {}, results))
    medians = [line.split("|")[7].strip() for line in table.splitlines() if line.startswith("| tiny")]
    assert medians == ["100.0 us*", "100.0 us", "100.0 us!", "100.0 us"]
    assert "*: a GPU call that waits for the GPU" in table and "!: the host outran the hold" in table
    cpu_table = format_table(Report(made_up_environment("cpu"), {}, 1e12, {}, results[-1:]))
    assert "peak extra: the most memory" in cpu_table and "*: a GPU call" not in cpu_table  # no marks to explain
    assert [result.to_dict()["held"] for result in results] == [False, True, True, None]
    assert [result.to_dict()["hold_outruns"] for result in results] == [0, 0, 2, None]


def test_a_backward_slower_than_forward_plus_backward_is_flagged():
    """Impossible for the work, so the machine drifted: the table says so under it."""

    def result(impl, pass_name, median):
        return timed_result(impl, pass_name, TimingStats(median, 0.95 * median, 1.05 * median, 5, median))

    results = [result("eager", "backward", 0.14), result("eager", "forward+backward", 0.03),
               result("fusedemb", "backward", 0.02), result("fusedemb", "forward+backward", 0.03)]  # fmt: skip
    table = format_table(Report(made_up_environment("cpu"), {}, 1e10, {}, results))
    assert "suspect (a backward alone slower than forward+backward" in table
    assert "eager on " in table.split("suspect")[1] and "fusedemb on " not in table.split("suspect")[1]


def test_peak_extra_memory_sees_a_temporary_on_cpu():
    mib = 2**20
    assert peak_extra_bytes(lambda: torch.ones(4 * mib // 4).sum(), "cpu") >= 4 * mib


def test_speedups_are_baseline_time_over_own_time():
    results = quick_runner(["forward"]).run_problem(
        tiny_problem(), [Implementation("eager", eager_embedding), Implementation("also-eager", eager_embedding)]
    )
    eager, other = results
    assert eager.speedup["eager"] == 1.0
    assert other.speedup["eager"] == pytest.approx(eager.timing.median_s / other.timing.median_s)
    assert "compile" not in other.speedup


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("switched_off", ["flag", "setting"])
def test_report_says_whether_the_range_check_was_on(switched_off, monkeypatch, capsys):
    """Whether by --no-bounds-check or by fusedemb's own setting (FUSEDEMB_BOUNDS_CHECK=0)."""
    import fusedemb

    monkeypatch.setattr(fusedemb.validation, "_bounds_check", switched_off == "flag")
    flag = ["--no-bounds-check"] if switched_off == "flag" else []
    assert cli.main([*TINY_ARGS, "--batch", "1", "--ids", "uniform", "--impl", "eager", "--pass", "forward", *flag]) == 0
    assert "fusedemb id range check: off" in capsys.readouterr().out


def test_tiny_cpu_run_writes_the_table_json_and_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    status = cli.main([
        *TINY_ARGS, "--batch", "1", "2", "--ids", "uniform", "same", "--impl", "fusedemb", "eager",
        "fusedemb-fast", "--json", str(json_path), "--plot", str(plot_path),
    ])
    assert status == 1  # fusedemb-fast was asked for and could not run here
    table = capsys.readouterr().out
    assert "copy bandwidth:" in table and "| custom[V=97 D=16 T=8] | float32 | same" in table
    assert "fusedemb-fast: the Triton kernels need a CUDA device" in table
    assert "median: time per call" in table  # the legend
    assert re.search(r"load average \d+\.\d\d on \d+ CPUs at the start; transparent huge pages", table)
    assert "GB/s after it" in table and "--quick: few repeats" in table

    report = json.loads(json_path.read_text())
    assert report["schema_version"] == 1
    environment = report["environment"]
    assert environment["device"] == "cpu" and environment["torch"] == torch.__version__
    assert environment["torch_threads"] >= 1 and environment["device_name"]
    commit = environment["fusedemb_commit"]  # None for an installed copy, else the checkout's HEAD
    assert commit is None or re.fullmatch(r"[0-9a-f]{7,}(\+modified)?", commit), commit
    assert report["copy_bandwidth_gbps"] > 0 and report["copy_bandwidth_end_gbps"] > 0
    assert set(environment["env"]) == {"THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY"}
    assert "load_average" in environment
    assert environment["device_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"{environment['device_name']}, {environment['device_capability']}), " in table
    assert report["settings"]["configs"] == [{"name": "custom[V=97 D=16 T=8]", "vocab": 97, "dim": 16, "seq": 8}]
    assert "fusedemb-fast" in report["skipped"]
    timed = {"fusedemb", "eager"} - set(report["skipped"])  # fusedemb needs the C++ extension built
    results = report["results"]
    assert {result["impl"] for result in results} == timed
    assert len(results) == 2 * 2 * len(timed) * 3  # batches x distributions x implementations x passes
    for result in results:
        assert result["status"] == "ok", result
        assert result["tokens"] == result["batch"] * 8
        assert result["gbps"] == pytest.approx(result["bytes"] / result["median_s"] / 1e9)
        assert result["p25_s"] <= result["median_s"] <= result["p75_s"]
        assert result["peak_extra_bytes"] >= 0
        assert result["speedup_vs_eager"] > 0 and result["speedup_vs_compile"] is None
    assert plot_path.read_bytes().startswith(b"\x89PNG")


def test_every_line_of_the_plot_is_told_apart_at_one_problem_size(tmp_path):
    """Colour tells implementations apart, line style and marker the dtypes and id distributions:
    with one batch size a series is a single dot, which only its marker distinguishes."""
    pytest.importorskip("matplotlib")
    timing = TimingStats(1e-4, 9e-5, 1.1e-4, 5, 1e-4)
    results = [
        Result(tiny_problem(ids, dtype=dtype), impl, "forward", "ok", bytes=1000, timing=timing, gbps=1.0,
               copy_fraction=0.1, peak_extra_bytes=0)
        for impl in ("fusedemb", "eager")
        for dtype in (torch.float32, torch.bfloat16)
        for ids in ("uniform", "zipf:1.1", "same", "zipf:1.3")
    ]  # fmt: skip
    figure = plot_report(Report(made_up_environment("cpu"), {}, 1e10, {}, results), tmp_path / "plot.png")
    series = [line for line in figure.axes[0].get_lines() if line.get_label() != "copy bandwidth"]
    assert len(series) == 16
    looks = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in series}
    assert len(looks) == 16
    markers = {line.get_label().removeprefix("eager ").removeprefix("fusedemb "): line.get_marker() for line in series}
    assert len(set(markers.values())) == 8  # a dot's marker alone names its variant


def test_a_run_with_a_failure_exits_nonzero(monkeypatch, tmp_path):
    monkeypatch.setattr(
        "fusedemb.bench.implementations.eager_embedding", doubles_token_gradient
    )
    json_path = tmp_path / "bench.json"
    assert cli.main([*TINY_ARGS, "--batch", "1", "--ids", "uniform", "--impl", "eager", "--json", str(json_path)]) == 1
    statuses = {result["status"] for result in json.loads(json_path.read_text())["results"]}
    assert statuses == {"mismatch"}


def test_a_run_cut_short_by_sigterm_reports_the_problems_it_finished(monkeypatch, tmp_path, capsys):
    run_problem = Runner.run_problem
    problems_started = []

    def terminated_at_the_second_problem(self, problem, *args, **kwargs):
        problems_started.append(problem)
        if len(problems_started) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends
        return run_problem(self, problem, *args, **kwargs)

    monkeypatch.setattr(Runner, "run_problem", terminated_at_the_second_problem)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    json_path = tmp_path / "bench.json"
    status = cli.main([*TINY_ARGS, "--batch", "1", "2", "3", "--ids", "uniform", "--impl", "eager",
                       "--json", str(json_path)])  # fmt: skip
    assert status == 130  # the shell's status for Ctrl-C, as the docs say
    assert len(problems_started) == 2 and signal.getsignal(signal.SIGTERM) == sigterm_handler
    table = capsys.readouterr().out
    assert "interrupted: the rows above are what finished before it" in table
    assert "| custom[V=97 D=16 T=8] | float32 | uniform | 1 " in table and "| custom[V=97 D=16 T=8] | float32 | uniform | 2 " not in table
    report = json.loads(json_path.read_text())
    assert report["settings"]["complete"] is False
    assert {result["batch"] for result in report["results"]} == {1}
    assert all(result["status"] == "ok" for result in report["results"])


def test_a_run_cut_short_after_its_sweep_still_reports_it(monkeypatch, tmp_path, capsys):
    """SIGTERM while the copy bandwidth is measured again after the last problem (seconds on a
    CPU whose flush is large): the whole sweep is reported, without that second figure."""
    measure, calls = cli.copy_bandwidth, []

    def terminated_on_the_second_copy(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends
        return measure(*args, **kwargs)

    monkeypatch.setattr(cli, "copy_bandwidth", terminated_on_the_second_copy)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    json_path = tmp_path / "bench.json"
    status = cli.main([*TINY_ARGS, "--batch", "1", "--ids", "uniform", "--impl", "eager", "--pass", "forward",
                       "--json", str(json_path)])  # fmt: skip
    assert status == 130 and len(calls) == 2 and signal.getsignal(signal.SIGTERM) == sigterm_handler
    assert "| custom[V=97 D=16 T=8] | float32 | uniform | 1 " in capsys.readouterr().out
    report = json.loads(json_path.read_text())
    assert report["settings"]["complete"] is True and report["copy_bandwidth_end_gbps"] is None
    assert [result["status"] for result in report["results"]] == ["ok"]


def test_a_run_cut_short_inside_a_problem_keeps_its_finished_implementations(monkeypatch, tmp_path, capsys):
    """Interrupted while the second implementation runs: the first one's rows are reported, with
    their speedups over the baselines that finished."""
    def interrupted(ids, tok_weight, pos_weight):
        raise KeyboardInterrupt  # what SIGTERM becomes during the run

    monkeypatch.setattr(
        cli.implementations, "build_implementations",
        lambda names, device: ([Implementation("eager", eager_embedding), Implementation("slow", interrupted)], {}),
    )  # fmt: skip
    json_path = tmp_path / "bench.json"
    status = cli.main([*TINY_ARGS, "--batch", "1", "--ids", "uniform", "--impl", "eager", "--json", str(json_path)])
    assert status == 130  # the shell's status for Ctrl-C, as the docs say
    report = json.loads(json_path.read_text())
    assert {(result["impl"], result["status"]) for result in report["results"]} == {("eager", "ok")}
    assert {result["speedup_vs_eager"] for result in report["results"]} == {1.0}  # not left unfilled
    # no copy bandwidth after an interrupted sweep; a quick run's smaller copy buffer, recorded
    assert report["copy_bandwidth_end_gbps"] is None and "GB/s after it" not in capsys.readouterr().out
    assert report["settings"]["copy_buffer_mib"] == 64
    assert report["settings"]["cache_flush_mib"] * 2**20 == timing.bytes_beyond_cache("cpu")  # the timer's flush
    assert report["settings"]["cache_flush"] == "write"


def test_the_cache_flush_read_reaches_the_timer_and_the_report(monkeypatch, tmp_path, capsys):
    timers = []
    real_make_timer = cli.make_timer
    monkeypatch.setattr(cli, "make_timer", lambda *args, **kwargs: timers.append(real_make_timer(*args, **kwargs))
                        or timers[-1])  # fmt: skip
    json_path = tmp_path / "bench.json"
    status = cli.main([*TINY_ARGS, "--batch", "1", "--ids", "uniform", "--impl", "eager", "--pass", "forward",
                       "--cache-flush", "read", "--json", str(json_path)])  # fmt: skip
    assert status == 0
    assert [timer.flush_cache.mode for timer in timers] == ["read"]
    assert json.loads(json_path.read_text())["settings"]["cache_flush"] == "read"
    assert "MiB read before every timed call" in capsys.readouterr().out


def test_compile_is_gated_and_timed(capsys):
    assert cli.main([*TINY_ARGS, "--batch", "2", "--ids", "zipf:1.1", "--impl", "compile", "eager"]) == 0
    assert "| compile " in capsys.readouterr().out


def test_one_failing_implementation_among_passing_ones_exits_1(monkeypatch):
    def wrong(ids, tok_weight, pos_weight):
        return eager_embedding(ids, tok_weight, pos_weight) * 2

    monkeypatch.setattr(
        cli.implementations, "build_implementations",
        lambda names, device: ([Implementation("eager", eager_embedding), Implementation("wrong", wrong)], {}),
    )  # fmt: skip
    assert cli.main([*TINY_ARGS, "--batch", "1", "--ids", "uniform", "--impl", "eager", "--pass", "forward"]) == 1
