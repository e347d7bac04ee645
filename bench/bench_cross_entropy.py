"""The language-model head and its loss over the tokens M: the fused linear cross-entropy
(kernels.linear_cross_entropy) against torch eager, torch.compile and Liger-Kernel's fused one.

    python -m bench.bench_cross_entropy           # bf16 on the GPU, GPT-2's head (C = 768, V = 50304), M = 2048-16384
    python -m bench.bench_cross_entropy --smoke   # tiny fp32 shapes on CPU (Triton interpreter)

Each provider computes F.cross_entropy(F.linear(x, weight).float(), targets) (mean, 5% of
targets ignored) and its gradients in x and weight. Reported: milliseconds for the forward
and backward, for the forward alone under no_grad (an eval), and the peak memory above the
inputs over a forward and backward (CUDA only). The matmuls' FLOPs are the same for all
(6 * M * C * V), so the milliseconds compare the work around them. Every provider is checked
against the float64 loss and gradients before it is timed.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable

import torch

# The kernels import triton, which must see TRITON_INTERPRET before its first import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import PLOTS, bench, compile_static, plot, print_table, unless_failing  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.cross_entropy import linear_cross_entropy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IGNORE = -1
LOSS = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return reference.linear_cross_entropy(x, weight, None, targets, IGNORE)


def peers(use_compile: bool, cuda: bool) -> dict[str, LOSS | None]:
    providers: dict[str, LOSS | None] = {
        "triton": lambda x, w, t: linear_cross_entropy(x, w, None, t, IGNORE),
        "torch": torch_loss,
        "compile": compile_static(torch_loss) if use_compile else None,
    }
    if not use_compile:
        print("torch.compile: skipped (--smoke or --no-compile)")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        providers["liger"] = None
        print("Liger-Kernel: skipped (liger_kernel is not installed)")
    else:
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        providers["liger"] = (lambda x, w, t: liger(w, x, t)) if cuda else None
        if not cuda:
            print("Liger-Kernel: skipped (needs CUDA)")
    return providers


def inputs(M: int, C: int, V: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(M, C, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, C, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()  # GPT-2's init
    targets = torch.randint(0, V, (M,), device=device, generator=gen)
    targets[torch.rand(M, device=device, generator=gen) < 0.05] = IGNORE
    return x, weight, targets


def _check(name: str, fn: LOSS, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, expected: list[torch.Tensor]) -> None:
    """Never time a provider that gives wrong answers: loss and both gradients, relative error."""
    loss = fn(x, w, t)
    got = [loss.detach(), *torch.autograd.grad(loss, (x, w))]
    bound = 2e-2 if x.dtype != torch.float32 else 1e-4
    for i, (g, e) in enumerate(zip(got, expected)):
        rel = ((g.double() - e).norm() / e.norm()).item()
        assert rel < bound, f"{name} at M={x.shape[0]}: tensor {i} off by {rel:.3g} (relative)"


def time_providers(providers: dict[str, LOSS | None], M: int, C: int, V: int, dtype: torch.dtype,
                   device: str) -> dict[str, tuple[float, float, float | None] | None]:
    """(forward+backward ms, no-grad forward ms, peak MiB) of each provider at one shape."""
    x, w, t = inputs(M, C, V, dtype, device)
    x64, w64 = (a.detach().double().requires_grad_() for a in (x, w))
    loss64 = reference.linear_cross_entropy(x64, w64, None, t, IGNORE)
    expected = [loss64.detach(), *torch.autograd.grad(loss64, (x64, w64))]
    del x64, w64, loss64

    def measure(name: str, fn: LOSS) -> tuple[float, float, float | None]:
        _check(name, fn, x, w, t, expected)
        peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(x, w, t).backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            x.grad = w.grad = None
        both = bench(lambda: fn(x, w, t).backward(), grad_to_none=[x, w])
        with torch.no_grad():
            forward = bench(lambda: fn(x, w, t))
        return both, forward, peak

    results = {}
    for name, fn in providers.items():
        if fn is None:
            results[name] = None
        elif name == "triton":
            results[name] = measure(name, fn)
        else:  # a peer that fails (a torch.compile error, out of memory, wrong numbers) is left out
            results[name] = unless_failing(name, f"M={M}", lambda: measure(name, fn))
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def run(tokens: list[int], C: int, V: int, dtype: torch.dtype, device: str, use_compile: bool, plot_suffix: str) -> None:
    providers = peers(use_compile, device == "cuda")
    dt = str(dtype).removeprefix("torch.")
    table = {M: time_providers(providers, M, C, V, dtype, device) for M in tokens}
    pick = lambda M, name, i: None if table[M][name] is None else table[M][name][i]  # noqa: E731
    ratio = lambda a, b: None if a is None or b is None else b / a  # noqa: E731  (their time over ours)
    shape = f"{dt}, C={C}, V={V}"
    for title, i in (("forward+backward, ms", 0), ("forward under no_grad, ms", 1), ("peak memory over forward+backward, MiB", 2)):
        if i == 2 and device != "cuda":
            continue
        rows = [[M, *(pick(M, p, i) for p in providers), ratio(pick(M, "triton", i), pick(M, "torch", i)),
                 ratio(pick(M, "triton", i), pick(M, "liger", i))] for M in tokens]
        print_table(f"LM head + cross-entropy {title} ({shape})", ["M", *providers, "torch / triton",
                                                                   "liger / triton"], rows)
    series = {f"{p} fwd+bwd": [pick(M, p, 0) for M in tokens] for p in providers}
    series |= {f"{p} fwd": [pick(M, p, 1) for M in tokens] for p in providers}
    plot(os.path.join(PLOTS, f"cross_entropy{plot_suffix}.png"), f"LM head + cross-entropy, {shape}",
         "M (tokens)", "ms (lower is better)", tokens, series)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU through the Triton interpreter, to check the script runs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="element type (default bf16)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="rows M (default 2048 4096 8192 16384)")
    parser.add_argument("--width", type=int, default=768, help="model width C (default 768, GPT-2 124M)")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary V (default 50304, GPT-2's padded)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves its compile time)")
    args = parser.parse_args()
    if args.smoke:
        run([24, 40], 16, 100, torch.float32, "cpu", use_compile=False, plot_suffix="_smoke")
        return
    if not torch.cuda.is_available():
        parser.exit(1, "bench_cross_entropy: no CUDA GPU; use --smoke to check the script on CPU\n")
    run(args.tokens, args.width, args.vocab, DTYPES[args.dtype], "cuda", use_compile=not args.no_compile, plot_suffix="")


if __name__ == "__main__":
    main()
