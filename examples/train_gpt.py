"""Train the same GPT-2 twice on one text: first layer as nn.Embedding and as fusedemb; compare.

    python examples/train_gpt.py --text ../shared/data/the-verdict.txt --config tiny --steps 20

Both models are built from the same seed and trained side by side, step for step, each with its
own random stream seeded alike, so they start from the same weights, see the same batches and
draw the same dropout masks (the embedding draws no random numbers); their steps alternate, so
that the step times printed compare them on an equally warm machine. The forward of the two
first layers is bitwise equal in float32 (each output element is the same single addition);
only the backward differs: the token and position gradients are sums over the tokens of the
batch, and fusedemb adds them in another order. The printed losses therefore agree to float32
rounding noise, checked against LOSS_TOLERANCE. A step's loss is taken before its update, so
the printed losses never see the last update: the trained models' loss on the first batch (in
eval mode), which does see it, is compared as well. The last tenth of the text (--val-ratio) is held
out, and both trained models' loss on it is compared the same way. The script also saves the
nn.Embedding model's checkpoint and loads it, with no key mapping, into a fresh fusedemb model
(see gpt_model.py for the names). It ends with PASS, or FAIL and what failed, and exits
with status 0 or 1 accordingly.

With --compile both models train compiled (nn.Module.compile, which keeps the state_dict's
keys): fusedemb is a drop-in there too, and its graph checks the ids each step, as eager calls
do (fusedemb::range_checked). The first steps then include the compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from gpt_model import CONFIGS, GPTConfig, GPTModel

from fusedemb.bench.cli import SEED_RANGE, check_device, require_gpt2_tokenizer, text_file
from fusedemb.bench.timing import synchronize
from fusedemb.data import create_dataloader, split_text
from fusedemb.functional import resolve_backend

# Largest accepted |loss_nn - loss_fused| at any step. Reordering a float32 sum of k terms
# changes it by at most about k * 2^-24 relative to the sum of magnitudes: for the sums here
# (a few positions per batch, up to hundreds of repeats of a frequent token) below 1e-5.
# AdamW's first steps are close to sign(grad) * lr, so such noise moves a weight by ~1e-5 *
# lr; only where a gradient cancels to almost zero can its sign, and the update, flip, and the
# loss is insensitive to exactly those weights. So the losses (about ln 50257 = 10.8 at the
# start) drift apart far slower than 1e-4 over a few dozen steps. Observed: 0 on the CPU (the
# C++ kernels sum in token order, as PyTorch's CPU embedding backward does), at most 1e-6 on
# an H200 with the Triton atomic backward (tiny: 30 steps, gpt2-124M: 12 steps). A wrong
# gradient (a dropped row, a missed position) shifts the loss by 1e-3 or more within a step or two.
LOSS_TOLERANCE = 1e-4
# Loading the same weights gives the same function: the logits agree exactly on the CPU; the
# bound leaves room for nondeterministic GPU kernels, while a wrong load differs by O(1).
CHECKPOINT_LOGITS_TOLERANCE = 1e-5


@dataclass
class TrainingRun:
    losses: list[float]
    step_seconds: list[float]


@dataclass
class Comparison:
    reference: TrainingRun  # nn.Embedding first layer
    fused: TrainingRun  # fusedemb first layer
    same_initial_weights: bool
    checkpoint_logits_max_diff: float  # nn.Embedding checkpoint loaded into a fresh fusedemb model
    fused_model: GPTModel
    # Loss of each trained model (nn.Embedding, fusedemb) on the first batch, after the last update.
    trained_losses: tuple[float, float]
    # Loss of each trained model on the held-out text; None without one.
    validation_losses: tuple[float, float] | None = None

    @property
    def max_loss_diff(self) -> float:
        return largest_difference(self.reference.losses, self.fused.losses)

    def failures(self) -> list[str]:
        """What did not hold, in words; empty when everything did. (A NaN fails every
        comparison: NaN <= tolerance is False.)"""
        checks = dict([
            ("the two models started from different weights", self.same_initial_weights),
            losses_agree("training losses", self.reference.losses, self.fused.losses),
            (f"the checkpoint's logits differ by {self.checkpoint_logits_max_diff:.1e}",
             self.checkpoint_logits_max_diff <= CHECKPOINT_LOGITS_TOLERANCE),
        ])  # fmt: skip
        pairs = {"trained models' losses on the first batch": self.trained_losses, "validation losses": self.validation_losses}
        for what, losses in pairs.items():
            if losses is not None:
                checks.update([losses_agree(what, [losses[0]], [losses[1]])])
        return [failure for failure, held in checks.items() if not held]

    @property
    def ok(self) -> bool:
        return not self.failures()


def largest_difference(reference: list[float], fused: list[float]) -> float:
    """The largest |difference| of paired losses, NaN if any is (max() would skip a NaN that
    does not come first; inf - inf is one)."""
    diffs = [abs(a - b) for a, b in zip(reference, fused)]
    return math.nan if any(map(math.isnan, diffs)) else max(diffs)


def losses_agree(what: str, reference: list[float], fused: list[float]) -> tuple[str, bool]:
    """Whether the two models' losses agree within LOSS_TOLERANCE, and the failure in words: by
    how much they differ, or which model diverged (a loss of NaN or inf). Both diverging is no
    mismatch between the first layers but a failed run, said as such."""
    diverged = [
        name for name, losses in (("nn.Embedding", reference), ("fusedemb", fused)) if not all(map(math.isfinite, losses))
    ]
    if len(diverged) == 2:
        return f"{what}: both models diverged (a loss not finite; a smaller --lr?)", False
    if diverged:
        return f"{what}: only the {diverged[0]} model diverged (a loss not finite)", False
    diff = largest_difference(reference, fused)
    return f"{what} differ by {diff:.1e} > {LOSS_TOLERANCE:.0e}", diff <= LOSS_TOLERANCE


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--text", type=text_file, required=True, metavar="FILE", help="UTF-8 text file to train on")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="model size (gpt_model.py)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each model")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--drop-rate", type=float, default=None, help="override the config's dropout rate")
    parser.add_argument("--val-ratio", type=float, default=0.1,
                        help="share of the text held out for the validation loss (0: none)")  # fmt: skip
    parser.add_argument("--deterministic", action="store_true",
                        help="fusedemb's deterministic token gradient on CUDA (the C++ backward always is)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=123, help="seed of the weights, the batches and dropout")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    parser.add_argument("--compile", action="store_true", help="train both models compiled (torch.compile)")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    # Checked as split_text will take it, as the train ratio 1 - val_ratio: a val_ratio too small
    # to change 1.0 would hold out no text.
    if not (args.val_ratio == 0 or 0 < 1 - args.val_ratio < 1):
        parser.error(f"--val-ratio must be 0, or in (0, 1) and leave 1 - val_ratio below 1, got {args.val_ratio}")
    # What torch would refuse only once the data is loaded (nn.Dropout, AdamW) or mid-training
    # (a NaN dropout rate), and an infinite rate, which trains both models to NaN.
    if args.drop_rate is not None and not 0 <= args.drop_rate <= 1:
        parser.error(f"--drop-rate must be in [0, 1], got {args.drop_rate}")
    for flag, value in (("--lr", args.lr), ("--weight-decay", args.weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"{flag} must be finite and not negative, got {value}")
    # torch's seeds are 64-bit, and the script seeds seed, seed + 1 and seed + 2 (one outside
    # failed inside the loader, and the text or the batch size was blamed).
    lowest_seed, highest_seed = SEED_RANGE
    if not lowest_seed <= args.seed <= highest_seed - 2:
        parser.error(f"--seed must be in [-2**63, 2**64 - 3], got {args.seed}")
    try:
        device_type = torch.device(args.device).type
    except RuntimeError as error:  # not a device string
        parser.error(f"--device {args.device}: {error}")
    # RandomStream seeds the CPU's and CUDA's random numbers only, and fusedemb's kernels run on
    # these two (elsewhere it falls back to the reference): other devices are refused, not crashed on.
    if device_type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: train_gpt.py trains on cpu or cuda")
    check_device(parser, device_type)
    require_gpt2_tokenizer(parser)
    return args


def training_batches(text: str, config: GPTConfig, batch_size: int, steps: int, seed: int) -> list:
    """``steps`` (input, target) batches of non-overlapping windows, reshuffled every epoch."""
    loader = create_dataloader(
        text,
        batch_size=batch_size,
        max_length=config.context_length,
        stride=config.context_length,
        generator=torch.Generator().manual_seed(seed),
    )
    epochs = itertools.chain.from_iterable(itertools.repeat(loader))
    return list(itertools.islice(epochs, steps))


def validation_batches(text: str, config: GPTConfig, batch_size: int) -> list:
    """Every non-overlapping window of the held-out text, in order; [] if it has none."""
    try:
        loader = create_dataloader(
            text, batch_size=batch_size, max_length=config.context_length, stride=config.context_length,
            shuffle=False, drop_last=False,
        )  # fmt: skip
    except ValueError:  # too short for one window of the model's context length
        return []
    return list(loader)


def eval_loss(model: GPTModel, batches: list, device: str) -> float:
    """Mean next-token loss over the batches' windows, in eval mode (no dropout): each batch's
    mean weighted by its windows, as the last batch may be short."""
    model.eval()
    with torch.no_grad():
        losses = [next_token_loss(model(inputs.to(device)), targets.to(device)).item() for inputs, targets in batches]
    model.train()
    windows = [len(inputs) for inputs, _ in batches]  # (fmean's weights need Python 3.11)
    return sum(loss * count for loss, count in zip(losses, windows)) / sum(windows)


def build_model(config: GPTConfig, use_fusedemb: bool, seed: int) -> GPTModel:
    # Built on the CPU so that the initial weights do not depend on the device's RNG.
    torch.manual_seed(seed)
    return GPTModel(config, use_fusedemb)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def training_step(model: GPTModel, optimizer: torch.optim.Optimizer, inputs, targets) -> torch.Tensor:
    """One AdamW step on next-token prediction; returns the loss (a tensor: reading it syncs)."""
    optimizer.zero_grad(set_to_none=True)
    loss = next_token_loss(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss


class RandomStream:
    """A model's own stream of random numbers (the CPU's, and the GPU's on CUDA), swapped in for
    its steps: two models trained side by side then draw the same dropout masks, as two runs
    one after the other from the same seed would. torch.random.fork_rng puts the outside
    state back after each step."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.gpus = [device] if device.type == "cuda" else []
        # The states torch.manual_seed(seed) would give, made without touching the global ones.
        self.cpu_state = torch.Generator().manual_seed(seed).get_state()
        self.gpu_states = [torch.Generator(gpu).manual_seed(seed).get_state() for gpu in self.gpus]

    @contextlib.contextmanager
    def active(self):
        with torch.random.fork_rng(devices=self.gpus):
            torch.set_rng_state(self.cpu_state)
            for gpu, state in zip(self.gpus, self.gpu_states):
                torch.cuda.set_rng_state(state, gpu)
            yield
            self.cpu_state = torch.get_rng_state()
            self.gpu_states = [torch.cuda.get_rng_state(gpu) for gpu in self.gpus]


def train_side_by_side(
    models: list[GPTModel], batches: list, *, device: str, lr: float, weight_decay: float, seed: int
) -> list[TrainingRun]:
    """One AdamW step per batch for each model; the loss and wall time of every step.

    The models' steps alternate, and which goes first alternates from batch to batch, so that
    neither is timed on a warmer machine (caches, allocator, clock speed) than the other, as the
    second of two runs one after the other would be. Each model draws from its own random
    stream, seeded alike: the same dropout masks."""
    device = torch.device(device)
    trainees = []
    for model in models:
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        trainees.append((model, optimizer, RandomStream(seed, device), TrainingRun(losses=[], step_seconds=[])))
    for step, (inputs, targets) in enumerate(batches):
        inputs, targets = inputs.to(device), targets.to(device)
        for model, optimizer, stream, run in trainees[:: 1 if step % 2 == 0 else -1]:
            with stream.active():
                synchronize(device)
                start = time.perf_counter()
                loss = training_step(model, optimizer, inputs, targets)
                synchronize(device)
                run.step_seconds.append(time.perf_counter() - start)
            run.losses.append(loss.item())
    return [run for *_, run in trainees]


def checkpoint_round_trip(trained: GPTModel, config: GPTConfig, seed: int, sample: torch.Tensor) -> float:
    """Save ``trained`` (nn.Embedding), load it strictly into a fresh fusedemb model: max |logits diff|."""
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fused = build_model(config, use_fusedemb=True, seed=seed + 2)  # other weights, overwritten by the load
    fused.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    device = next(trained.parameters()).device
    fused.to(device).eval()
    trained.eval()
    with torch.no_grad():
        sample = sample.to(device)
        return (trained(sample) - fused(sample)).abs().max().item()


def same_state(a: GPTModel, b: GPTModel) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def report(comparison: Comparison, args: argparse.Namespace, config: GPTConfig) -> None:
    print(f"config {args.config}: {config}")
    compiled = ", compiled" if args.compile else ""
    print(f"device {args.device}{compiled}, {args.steps} steps of batch {args.batch_size} x {config.context_length} tokens")
    # Which kernels the comparison tested: without a build of the C++ extension (or triton on a
    # GPU) fusedemb falls back to its plain-PyTorch reference, and a PASS then says nothing of them.
    print(f"fusedemb backend: {resolve_backend(None, torch.device(args.device))}")
    print(f"same initial weights: {comparison.same_initial_weights}")
    print(f"{'step':>5} {'loss nn.Embedding':>18} {'loss fusedemb':>14} {'|diff|':>9}")
    for step, (a, b) in enumerate(zip(comparison.reference.losses, comparison.fused.losses), start=1):
        print(f"{step:>5} {a:>18.6f} {b:>14.6f} {abs(a - b):>9.2e}")
    print(f"max |loss diff| {comparison.max_loss_diff:.2e} (tolerance {LOSS_TOLERANCE:.0e})")
    reference, fused = comparison.trained_losses
    print(f"after training, loss on the first batch: nn.Embedding {reference:.6f}, fusedemb {fused:.6f}, "
          f"|diff| {abs(reference - fused):.2e}")  # fmt: skip
    # The first step includes one-time costs (allocator warm-up, kernel compilation): leave it out.
    for name, run in (("nn.Embedding", comparison.reference), ("fusedemb", comparison.fused)):
        timed = run.step_seconds[1:] or run.step_seconds
        print(f"step time {name:>12}: median {1e3 * statistics.median(timed):8.2f} ms over {len(timed)} steps")
    if comparison.validation_losses is None:
        print("validation loss: none (no held-out text, or too short for one window)")
    else:
        reference, fused = comparison.validation_losses
        print(f"validation loss: nn.Embedding {reference:.6f}, fusedemb {fused:.6f}, |diff| {abs(reference - fused):.2e}")
    print(
        "nn.Embedding checkpoint loaded into the fusedemb model (strict, no key mapping): "
        f"max |logits diff| {comparison.checkpoint_logits_max_diff:.1e}"
    )
    failures = comparison.failures()
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))


def main(argv: list[str] | None = None) -> Comparison:
    args = parse_args(argv)
    config = CONFIGS[args.config]
    if args.drop_rate is not None:
        config = replace(config, drop_rate=args.drop_rate)
    train_text, held_out = split_text(args.text, 1 - args.val_ratio) if args.val_ratio > 0 else (args.text, "")
    try:
        batches = training_batches(train_text, config, args.batch_size, args.steps, args.seed)
    except ValueError as error:  # the training part has fewer windows than a batch, or not one
        remedy = "a longer text" if "too short" in str(error) else "a smaller --batch-size or a longer text"
        part = ""
        if args.val_ratio > 0:
            part = f"the training part of the text ({1 - args.val_ratio:.0%} of it, --val-ratio {args.val_ratio}): "
            remedy += " or a smaller --val-ratio"
        raise SystemExit(f"train_gpt.py: {part}{error}; use {remedy}") from None
    held_out_batches = validation_batches(held_out, config, args.batch_size) if held_out else []

    reference_model = build_model(config, use_fusedemb=False, seed=args.seed)
    fused_model = build_model(config, use_fusedemb=True, seed=args.seed)
    if args.deterministic:
        fused_model.embedding.deterministic = True
    same_initial_weights = same_state(reference_model, fused_model)
    if args.compile:
        for model in (reference_model, fused_model):
            model.compile()
    training = dict(device=args.device, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed + 1)
    reference_run, fused_run = train_side_by_side([reference_model, fused_model], batches, **training)

    def both_losses(batches: list) -> tuple[float, float]:
        return tuple(eval_loss(model, batches, args.device) for model in (reference_model, fused_model))

    trained_losses = both_losses(batches[:1])
    validation_losses = both_losses(held_out_batches) if held_out_batches else None
    logits_diff = checkpoint_round_trip(reference_model, config, args.seed, batches[0][0])

    comparison = Comparison(
        reference_run, fused_run, same_initial_weights, logits_diff, fused_model, trained_losses, validation_losses
    )
    report(comparison, args, config)
    return comparison


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)
