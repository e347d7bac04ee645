"""Whole-model training throughput: step time, tokens/s and MFU per implementation.

    python -m bench.bench_train                       # tiny preset on CPU, gpt2 on CUDA
    python -m bench.bench_train --preset gpt2 --batch-size 8 --dtype bf16

Like nanoGPT's bench.py: burn-in steps, then timed steps on random tokens; every
implementation's first loss is checked against eager's, and the implementations take turns
over several rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from bench.common import print_table
from gpt import GPT, preset
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
    args = p.parse_args()
    device = "cuda" if cuda else "cpu"

    base = preset(args.preset).updated(vocab_size=50304 if args.preset.startswith("gpt2") else 256, block_size=args.block_size)
    variants = [("torch eager", "torch", False)]
    if not args.no_compile:
        variants.append(("torch.compile", "torch", True))
    if cuda:
        variants += [("triton kernels", "triton", False), ("auto (the faster per op)", "auto", False)]
        if not args.no_compile:  # our kernels are custom ops in the compiled graph
            variants += [("triton kernels + compile", "triton", True), ("auto + compile", "auto", True)]
    # Never time a wrong model: every implementation's first loss against eager's (the same
    # weights and tokens), before any is timed.
    steps, first_loss = {}, None
    for name, kernels, compile in variants:
        try:
            step = build(base.updated(kernels=kernels), args.batch_size, args.dtype, device, compile)
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
                     f"{tok_s / baseline:.2f}x" if baseline else None, memory.get(name)))
    print_table(
        f"training step, preset {args.preset}, batch {args.batch_size} x {base.block_size}, {args.dtype}, "
        f"median of {args.rounds} rounds of {args.steps} steps",
        ["implementation", "ms/step", "spread (max-min)/median", "tokens/s", "MFU", "vs eager",
         "step's peak memory, GiB"],
        rows,
    )


if __name__ == "__main__":
    main()
