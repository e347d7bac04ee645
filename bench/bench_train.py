"""Whole-model training throughput: step time, tokens/s and MFU per implementation.

    python -m bench.bench_train                       # tiny preset on CPU, gpt2 on CUDA
    python -m bench.bench_train --preset gpt2 --batch-size 8 --dtype bf16

Like nanoGPT's bench.py: burn-in steps, then timed steps on random tokens; every
implementation's first loss is checked against eager's, and the implementations take turns
over several rounds.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from typing import Callable

import torch

from bench.common import print_table
from gpt import GPT, ops, preset
from train import DTYPES, peak_flops


def build(cfg, batch_size: int, dtype: str, device: str, compile: bool) -> Callable[[], torch.Tensor]:
    """One implementation's training step (forward, backward, AdamW) on fixed random tokens;
    returns the step's loss. The same seed, so every implementation starts from one model."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train.py on CUDA and CPU
    fwd = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    autocast = torch.autocast(device, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def step() -> torch.Tensor:
        with autocast:
            _, loss = fwd(x, x, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def with_torch_loss(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The step with "auto" taking torch's loss over the full logits, not the fused one."""
    def torch_loss_step() -> torch.Tensor:
        saved, ops.AUTO_TRITON_LOSS = ops.AUTO_TRITON_LOSS, False
        try:
            return step()
        finally:
            ops.AUTO_TRITON_LOSS = saved
    return torch_loss_step


def timed(step: Callable[[], torch.Tensor], steps: int, device: str) -> float:
    """Milliseconds per step over `steps` steps."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


# "auto" as before the fused loss, for the loss's share of the step.
_AUTO_TORCH_LOSS = "auto, torch's loss (full logits)"
# ~0.5 s of a sleeping kernel at Hopper's clocks: longer than any step takes to enqueue.
_SLEEP_CYCLES = 10**9


def host_ms(step: Callable[[], torch.Tensor], rounds: int = 3, profile: cProfile.Profile | None = None) -> float | None:
    """Milliseconds the host takes to enqueue one step while a sleeping kernel holds the
    device, so that the device cannot hold the host back (best of `rounds`). Where this
    passes the step's time, the step runs at the host's pace. None where the enqueue lasted
    as long as the sleep: the step waited on the device (a sync, or a full launch queue)."""
    best = None
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(_SLEEP_CYCLES)
        end.record()
        t0 = time.perf_counter()
        if profile is not None:
            profile.enable()
        step()
        if profile is not None:
            profile.disable()
        ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        if ms > 0.8 * start.elapsed_time(end):
            return None
        best = ms if best is None else min(best, ms)
    return best


def print_host_profile(name: str, step: Callable[[], torch.Tensor], top: int = 30) -> None:
    """Where one implementation's host time goes: cProfile over three steps, each enqueued
    behind a sleeping kernel (so that no wait on the device is counted), top functions by
    their own time, then by their time with what they call."""
    profile = cProfile.Profile()
    if host_ms(step, profile=profile) is None:
        print(f"host profile of {name}: the step waited on the device; not profiled")
        return
    for order, label in (("tottime", "own time"), ("cumulative", "time with callees")):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(top)
        print(f"### host profile of {name}, three steps, by {label}\n")
        print(out.getvalue().strip().split("\n\n", 1)[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--preset", default="gpt2" if cuda else "tiny")
    p.add_argument("--batch-size", type=int, default=12 if cuda else 16)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the implementations taking turns; the median is reported")
    p.add_argument("--burn-in", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--host-profile", action="store_true",
                   help="CUDA: after the table, cProfile each eager implementation's host path")
    args = p.parse_args()
    device = "cuda" if cuda else "cpu"

    base = preset(args.preset).updated(vocab_size=50304 if args.preset.startswith("gpt2") else 256, block_size=args.block_size)
    variants = [("torch eager", "torch", False)]
    if not args.no_compile:
        variants.append(("torch.compile", "torch", True))
    if cuda:
        variants += [("triton kernels", "triton", False), ("auto (the faster per op)", "auto", False),
                     (_AUTO_TORCH_LOSS, "auto", False)]
        if not args.no_compile:  # our kernels are custom ops in the compiled graph
            variants += [("triton kernels + compile", "triton", True), ("auto + compile", "auto", True)]
    # Never time a wrong model: every implementation's first loss against eager's (the same
    # weights and tokens), before any is timed.
    steps, first_loss = {}, None
    for name, kernels, compile in variants:
        try:
            step = build(base.updated(kernels=kernels), args.batch_size, args.dtype, device, compile)
            step = with_torch_loss(step) if name == _AUTO_TORCH_LOSS else step
            loss = float(step())
            for _ in range(args.burn_in - 1):
                step()
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        first_loss = first_loss if first_loss is not None else loss
        if abs(loss - first_loss) > 1e-2 * abs(first_loss):
            raise SystemExit(f"bench_train: {name}'s first loss is {loss:.4f}, eager's {first_loss:.4f}: not timed")
        steps[name] = step
    # Rounds in turn, so that a slow spell of the device is shared rather than one row's.
    times: dict[str, list[float]] = {name: [] for name in steps}
    memory: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, step in steps.items():
            if cuda:  # the step's own peak, above every built model's weights and optimizer state
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
            times[name].append(timed(step, args.steps, device))
            if cuda:
                memory[name] = max(memory.get(name, 0.0), (torch.cuda.max_memory_allocated() - held) / 2**30)
    # What the host alone takes a step: a step whose host time passes its device time is
    # launch-bound, and its time varies with the machine's CPU.
    hosts = {name: host_ms(step) for name, step in steps.items()} if cuda else {}
    peak = peak_flops(device, args.dtype)
    rows, baseline = [], None
    for name, kernels, _ in variants:
        if name not in times:
            continue
        ms = statistics.median(times[name])
        tok_s = args.batch_size * base.block_size / ms * 1e3
        baseline = baseline or (tok_s if name == "torch eager" else None)
        mfu = GPT(base.updated(kernels=kernels)).flops_per_token() * tok_s / peak if peak else None
        spread = (max(times[name]) - min(times[name])) / ms
        rows.append((name, ms, f"{spread:.1%}", f"{tok_s:,.0f}", f"{mfu:.1%}" if mfu else None,
                     f"{tok_s / baseline:.2f}x" if baseline else None, memory.get(name),
                     (hosts[name] if hosts[name] is not None else "waited") if cuda else None))
    print_table(
        f"training step, preset {args.preset}, batch {args.batch_size} x {base.block_size}, {args.dtype}, "
        f"median of {args.rounds} rounds of {args.steps} steps",
        ["implementation", "ms/step", "spread (max-min)/median", "tokens/s", "MFU", "vs eager",
         "step's peak memory, GiB", "host ms/step (enqueueing only)"],
        rows,
    )
    if args.host_profile and cuda:
        for name, kernels, compile in variants:
            if name in steps and not compile:
                print_host_profile(name, steps[name])


if __name__ == "__main__":
    main()
