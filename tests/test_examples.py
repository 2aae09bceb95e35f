"""The examples run in-process on the-verdict.txt with small settings."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from conftest import run_python
from shared_data import import_example, use_shared_tiktoken_cache, verdict_path

import fusedemb
from fusedemb import demo


@pytest.fixture
def gpt_model():
    return import_example("gpt_model")


def small_config(gpt_model, **overrides):
    """A one-layer GPT small enough to compare gradients exactly in milliseconds."""
    fields = dict(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=True)
    return gpt_model.GPTConfig(**{**fields, **overrides})


def script_module(script: str):
    """The demo, or an example by its file name, as a module with main(argv)."""
    return demo if script == "demo" else import_example(script)


@pytest.fixture
def verdict():
    path = verdict_path()
    use_shared_tiktoken_cache()
    return path


def test_train_gpt_random_streams_are_separate_and_leave_the_global_one_alone():
    """Each model's stream draws what torch.manual_seed(seed) would, one after the other, and
    the global random state is as it was after every step (train_gpt.RandomStream)."""
    train_gpt = import_example("train_gpt")
    torch.manual_seed(5)
    outside = torch.get_rng_state()
    first_model, second_model = (train_gpt.RandomStream(3, torch.device("cpu")) for _ in range(2))
    with first_model.active():
        first = torch.rand(4)
    with second_model.active():
        assert torch.equal(torch.rand(4), first)  # the same seed: the same draws
    with first_model.active():
        second = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(8), torch.cat([first, second]))  # the stream went on, not restarted


def test_ch02_input_embeddings_match_nn_embedding(verdict, capsys):
    ch02 = import_example("ch02_embeddings")
    embeddings = ch02.main(["--text", str(verdict)])  # asserts forward and backward equality itself
    assert embeddings.shape == (8, 4, 256)
    assert "fusedemb matches nn.Embedding" in capsys.readouterr().out


def test_train_gpt_losses_match_step_by_step(verdict, capsys):
    train_gpt = import_example("train_gpt")
    steps = 10
    comparison = train_gpt.main(["--text", str(verdict), "--config", "tiny", "--steps", str(steps), "--device", "cpu"])

    assert comparison.same_initial_weights
    assert len(comparison.reference.losses) == len(comparison.fused.losses) == steps
    for step, (reference, fused) in enumerate(zip(comparison.reference.losses, comparison.fused.losses), start=1):
        assert abs(reference - fused) <= train_gpt.LOSS_TOLERANCE, f"step {step}: {reference} vs {fused}"
    # Training did something: the loss fell from about ln(50257) = 10.8.
    assert comparison.reference.losses[-1] < comparison.reference.losses[0] - 0.1
    assert comparison.checkpoint_logits_max_diff <= train_gpt.CHECKPOINT_LOGITS_TOLERANCE
    assert comparison.ok

    model = comparison.fused_model
    assert isinstance(model.embedding, fusedemb.FusedEmbedding)
    assert model.out_head.weight is model.embedding.tok_emb.weight  # the tie survives training and .to()

    reference_loss, fused_loss = comparison.validation_losses  # on the held-out last tenth of the text
    assert abs(reference_loss - fused_loss) <= train_gpt.LOSS_TOLERANCE
    assert comparison.failures() == []

    printed = capsys.readouterr().out
    backend = "cpp" if fusedemb.CPP_EXTENSION_AVAILABLE else "reference"  # (the reference without a build)
    assert f"fusedemb backend: {backend}" in printed.splitlines()
    assert "step time nn.Embedding" in printed and "step time     fusedemb" in printed
    assert "validation loss: nn.Embedding" in printed and printed.rstrip().endswith("PASS")


def test_train_gpt_compiled(verdict, capsys):
    """--compile: both models compiled (Dynamo made graphs), fusedemb a drop-in there too."""
    from torch._dynamo.utils import counters

    train_gpt = import_example("train_gpt")
    counters.clear()
    comparison = train_gpt.main(["--text", str(verdict), "--config", "tiny", "--steps", "3", "--device", "cpu", "--compile"])
    assert counters["stats"]["unique_graphs"] >= 2  # one per model at least
    assert comparison.ok, comparison.failures()
    assert "device cpu, compiled, 3 steps" in capsys.readouterr().out


def test_train_gpt_names_what_failed():
    train_gpt = import_example("train_gpt")
    run = train_gpt.TrainingRun(losses=[10.0, 9.0], step_seconds=[0.1, 0.1])
    drifted = train_gpt.TrainingRun(losses=[10.0, 9.1], step_seconds=[0.1, 0.1])
    comparison = train_gpt.Comparison(run, drifted, True, 0.0, None, (8.5, 8.5), validation_losses=(8.0, 8.0))
    assert not comparison.ok
    assert comparison.failures() == ["training losses differ by 1.0e-01 > 1e-04"]

    trained_apart = train_gpt.Comparison(run, run, True, 0.0, None, (8.5, 8.6), validation_losses=None)
    assert trained_apart.failures() == ["trained models' losses on the first batch differ by 1.0e-01 > 1e-04"]


def test_train_gpt_fails_a_diverged_model():
    """A NaN loss at a later step fails the comparison (Python's max() would skip it), as does
    a NaN after training or on the held-out text; the failure names the model that diverged,
    and both diverging (too large a --lr) is said as such, not as a difference."""
    train_gpt = import_example("train_gpt")
    run = train_gpt.TrainingRun(losses=[10.0, 9.0, 8.0], step_seconds=[0.1] * 3)
    diverged = train_gpt.TrainingRun(losses=[10.0, float("nan"), 8.0], step_seconds=[0.1] * 3)
    comparison = train_gpt.Comparison(run, diverged, True, 0.0, None, (8.5, float("nan")), (8.0, float("nan")))
    assert comparison.failures() == [
        "training losses: only the fusedemb model diverged (a loss not finite)",
        "trained models' losses on the first batch: only the fusedemb model diverged (a loss not finite)",
        "validation losses: only the fusedemb model diverged (a loss not finite)",
    ]
    # inf - inf is NaN, which max() skips when it does not come first
    overflowed = train_gpt.TrainingRun(losses=[10.0, float("inf"), float("inf")], step_seconds=[0.1] * 3)
    both = train_gpt.Comparison(overflowed, overflowed, True, 0.0, None, (float("nan"),) * 2, None)
    assert both.failures() == [
        "training losses: both models diverged (a loss not finite; a smaller --lr?)",
        "trained models' losses on the first batch: both models diverged (a loss not finite; a smaller --lr?)",
    ]
    apart = train_gpt.Comparison(run, replace(run, losses=[10.0, 9.0, 8.5]), True, 0.0, None, (8.0, 8.0), None)
    assert apart.failures() == ["training losses differ by 5.0e-01 > 1e-04"]


def test_train_gpt_checks_the_last_update(verdict, monkeypatch, capsys):
    """A step's loss is taken before its update, so with one step only the trained models' loss
    tells a wrong gradient: here fusedemb's position table gets none."""
    train_gpt = import_example("train_gpt")
    fused_embedding = fusedemb.module.fused_embedding

    def without_position_gradient(ids, tok_weight, pos_weight, **options):
        return fused_embedding(ids, tok_weight, pos_weight.detach(), **options)

    monkeypatch.setattr(fusedemb.module, "fused_embedding", without_position_gradient)
    comparison = train_gpt.main(["--text", str(verdict), "--steps", "1", "--val-ratio", "0", "--device", "cpu"])
    assert comparison.max_loss_diff == 0.0
    assert [failure.split(" differ")[0] for failure in comparison.failures()] == [
        "trained models' losses on the first batch"
    ]
    assert capsys.readouterr().out.rstrip().endswith("> 1e-04")


def test_train_gpt_refuses_a_batch_size_below_one(verdict, capsys):
    train_gpt = import_example("train_gpt")
    with pytest.raises(SystemExit):
        train_gpt.main(["--text", str(verdict), "--batch-size", "0"])
    assert "--batch-size must be positive, got 0" in capsys.readouterr().err


def test_train_gpt_says_what_to_change_when_the_text_is_too_short(tmp_path, verdict):
    """Too few windows for one batch is the batch size's business; too few tokens for one
    window is not."""
    train_gpt = import_example("train_gpt")
    text = tmp_path / "text.txt"
    for length, remedy in ((3000, "use a smaller --batch-size"), (100, "use a longer text$")):
        text.write_text(verdict.read_text(encoding="utf-8")[:length], encoding="utf-8")
        with pytest.raises(SystemExit, match=remedy):
            train_gpt.main(["--text", str(text), "--batch-size", "64", "--steps", "1", "--val-ratio", "0"])


def test_validation_loss_is_the_mean_over_windows_when_the_last_batch_is_short(gpt_model):
    train_gpt = import_example("train_gpt")
    config = small_config(gpt_model)
    torch.manual_seed(0)
    model = gpt_model.GPTModel(config, use_fusedemb=True)
    inputs = torch.randint(0, config.vocab_size, (4, config.context_length))
    targets = torch.randint(0, config.vocab_size, (4, config.context_length))
    whole = train_gpt.eval_loss(model, [(inputs, targets)], "cpu")
    split = train_gpt.eval_loss(model, [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])], "cpu")
    assert split == pytest.approx(whole, rel=1e-6)


def test_nn_embedding_checkpoint_loads_strictly_into_the_fused_model(gpt_model):
    config = small_config(gpt_model)
    torch.manual_seed(0)
    plain = gpt_model.GPTModel(config, use_fusedemb=False)
    torch.manual_seed(1)
    fused = gpt_model.GPTModel(config, use_fusedemb=True)

    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    buffer.seek(0)
    result = fused.load_state_dict(torch.load(buffer, weights_only=True), strict=True)  # no key mapping
    assert not result.missing_keys and not result.unexpected_keys

    assert fused.out_head.weight is fused.embedding.tok_emb.weight  # load copies into the tied parameter
    torch.testing.assert_close(fused.embedding.tok_emb.weight, plain.embedding.tok_emb.weight, rtol=0, atol=0)
    ids = torch.randint(0, config.vocab_size, (2, config.context_length))
    plain.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids))


def test_both_first_layers_train_the_tied_table_with_equal_gradients(gpt_model):
    config = small_config(gpt_model)
    ids = torch.randint(0, config.vocab_size, (3, config.context_length), generator=torch.Generator().manual_seed(5))
    grads = []
    for use_fusedemb in (False, True):
        torch.manual_seed(0)
        model = gpt_model.GPTModel(config, use_fusedemb)
        model(ids).logsumexp(-1).sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_gpt2_124m_config_has_gpt2_small_parameter_count(gpt_model):
    with torch.device("meta"):  # shapes only, no memory
        model = gpt_model.GPTModel(gpt_model.GPT2_124M, use_fusedemb=True)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # tied head counted once


def test_sequences_longer_than_the_context_are_rejected(gpt_model):
    config = small_config(gpt_model, context_length=4)
    model = gpt_model.GPTModel(config, use_fusedemb=True)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("script", ["demo", "train_gpt", "ch02_embeddings"])
def test_text_that_cannot_be_used_is_a_usage_error(script, tmp_path, capsys):
    module = script_module(script)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for path, message in ((empty, f"{empty} is empty"), (tmp_path / "missing.txt", "cannot read")):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--text", str(path)])
        assert exit_info.value.code == 2
        assert f"argument --text: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--batch", "--seq-len", "--dim", "--repeats"])
def test_demo_sizes_must_be_positive(option, capsys):
    for value in ("0", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            demo.main([option, value])
        assert exit_info.value.code == 2
        assert f"error: {option} must be positive" in capsys.readouterr().err


def test_demo_warns_that_its_cpu_timings_are_noisy_on_a_busy_machine(capsys, monkeypatch):
    use_shared_tiktoken_cache()
    monkeypatch.setattr("fusedemb.bench.environment.load_average", lambda: 64.0)
    assert demo.main(["--batch", "1", "--seq-len", "4", "--dim", "4", "--repeats", "1", "--device", "cpu"]) == 0
    assert "warning: load average 64.00 on" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["demo", "train_gpt", "ch02_embeddings"])
def test_a_missing_tokenizer_is_a_usage_error_naming_tiktoken_cache_dir(script, monkeypatch, tmp_path, capsys):
    """No gpt2 encoding (no network, no cache): exit status 2 and fusedemb.data's message, not
    a traceback chained through tiktoken's download attempt."""
    import tiktoken

    def offline_get_encoding(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline_get_encoding)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-cache"))
    module = script_module(script)
    text = tmp_path / "text.txt"
    text.write_text("Some text to tokenize.")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--text", str(text)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: cannot load tiktoken's 'gpt2' encoding" in error and str(tmp_path / "no-cache") in error
    assert "Traceback" not in error


def test_train_gpt_refuses_a_device_it_cannot_use(verdict, capsys):
    train_gpt = import_example("train_gpt")
    devices = [("gpu", "--device gpu: ")] + ([] if torch.cuda.is_available() else [("cuda", "torch sees no CUDA device")])
    for device, message in devices:
        with pytest.raises(SystemExit) as exit_info:
            train_gpt.main(["--text", str(verdict), "--device", device])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--drop-rate", "1.5", "--drop-rate must be in [0, 1], got 1.5"),  # nn.Dropout's traceback, after loading
    ("--drop-rate", "nan", "--drop-rate must be in [0, 1], got nan"),  # nn.Dropout's, at the first step
    ("--lr", "-1", "--lr must be finite and not negative, got -1.0"),  # AdamW's traceback
    ("--lr", "inf", "--lr must be finite and not negative, got inf"),  # trained both models to NaN: FAIL
    ("--weight-decay", "-0.1", "--weight-decay must be finite and not negative, got -0.1"),
    ("--seed", str(2**64), "--seed must be in"),  # was blamed on the text or the batch size
    ("--device", "meta", "--device meta: train_gpt.py trains on cpu or cuda"),  # a traceback at .item()
])  # fmt: skip
def test_train_gpt_refuses_bad_training_options_before_any_work(verdict, capsys, option, value, message):
    train_gpt = import_example("train_gpt")
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.main(["--text", str(verdict), "--steps", "1", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_gpt_names_the_validation_share_when_the_training_part_is_too_short(verdict):
    train_gpt = import_example("train_gpt")
    with pytest.raises(SystemExit, match=r"the training part of the text \(1% of it, --val-ratio 0.99\).*smaller --val-ratio"):
        train_gpt.main(["--text", str(verdict), "--steps", "1", "--val-ratio", "0.99"])


def test_ch02_says_when_the_text_is_too_short(tmp_path, verdict):
    ch02 = import_example("ch02_embeddings")
    text = tmp_path / "short.txt"
    text.write_text("hi there")
    with pytest.raises(SystemExit, match=r"text is too short for one window.*use a longer text"):
        ch02.main(["--text", str(text)])


def test_demo_checks_and_times_both_passes(capsys, monkeypatch):
    use_shared_tiktoken_cache()
    monkeypatch.setattr("fusedemb.bench.environment.load_average", lambda: 0.0)
    assert demo.main(["--batch", "2", "--seq-len", "16", "--dim", "8", "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    assert "load average" not in captured.err
    printed = captured.out
    assert "max |fused - nn.Embedding|: output 0" in printed
    assert "inference forward (no_grad)" in printed and "forward+backward" in printed


def test_the_demo_finds_the_checkouts_tiktoken_cache_itself():
    """README: the demo finds ../shared/data/tiktoken beside the checkout, with TIKTOKEN_CACHE_DIR
    unset (this process sets it for the other tests)."""
    from fusedemb.data import CHECKOUT_TIKTOKEN_CACHE

    if not CHECKOUT_TIKTOKEN_CACHE.is_dir():
        pytest.skip(f"no tiktoken cache in {CHECKOUT_TIKTOKEN_CACHE}")
    args = ("-m", "fusedemb", "--device", "cpu", "--batch", "1", "--seq-len", "4", "--dim", "4", "--repeats", "1")
    result = run_python(*args, TIKTOKEN_CACHE_DIR=None)
    assert result.returncode == 0, result.stderr[-3000:]
