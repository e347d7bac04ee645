"""Whole-model training throughput: step time, tokens/s and MFU per implementation.

    python -m bench.bench_train                       # tiny preset on CPU, gpt2 on CUDA
    python -m bench.bench_train --preset gpt2 --batch-size 8 --dtype bf16

Like nanoGPT's bench.py: burn-in steps, then timed steps on random tokens.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import print_table
from gpt import GPT, preset
from train import DTYPES, peak_flops


def measure(cfg, batch_size: int, dtype: str, device: str, compile: bool, steps: int, burn_in: int) -> tuple[float, float]:
    """(ms per step, tokens/s) for one implementation."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    fwd = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    autocast = torch.autocast(device, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def step() -> None:
        with autocast:
            _, loss = fwd(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(burn_in):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    return ms, batch_size * cfg.block_size / ms * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--preset", default="gpt2" if cuda else "tiny")
    p.add_argument("--batch-size", type=int, default=12 if cuda else 16)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=20)
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
        if not args.no_compile:
            variants.append(("triton kernels + compile", "triton", True))
    peak = peak_flops(device, args.dtype)
    rows, baseline = [], None
    for name, kernels, compile in variants:
        cfg = base.updated(kernels=kernels)
        try:
            ms, tok_s = measure(cfg, args.batch_size, args.dtype, device, compile, args.steps, args.burn_in)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        baseline = baseline or tok_s
        mfu = GPT(cfg).flops_per_token() * tok_s / peak if peak else None
        rows.append((name, ms, f"{tok_s:,.0f}", f"{mfu:.1%}" if mfu else None, f"{tok_s / baseline:.2f}x"))
    print_table(
        f"training step, preset {args.preset}, batch {args.batch_size} x {base.block_size}, {args.dtype}",
        ["implementation", "ms/step", "tokens/s", "MFU", "vs eager"],
        rows,
    )


if __name__ == "__main__":
    main()
