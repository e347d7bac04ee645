"""GPT MLP throughput over the width C: the Triton FFN against torch eager and torch.compile.

    python -m bench.bench_ffn            # bf16 on the GPU, C = 768, 1024, 1600, 4096; 16384 tokens (8192 at C=4096)
    python -m bench.bench_ffn --smoke    # tiny fp32 shapes on CPU (Triton interpreter)
    python -m bench.bench_ffn --sweep    # time alternative tile tables (C = 768, 1024), eager beside
    python -m bench.bench_ffn --few-rows # a decode step's FFN: 1 to 64 rows, forward, microseconds
    python -m bench.bench_ffn --profile  # per-kernel times of forward+backward at C = 768, slowest calls, host vs device

The block is linear(C -> 4C) -> GELU(tanh) -> linear(4C -> C), with biases. TFLOP/s count
the matmuls only: forward 2 * 2*M*C*4C = 16*M*C^2, backward twice that, so
forward+backward is 48*M*C^2. "triton" saves the pre-activation for the backward,
"triton-recompute" recomputes it (one more matmul, one M x 4C tensor less memory); the
same FLOP count is used for both, so the recompute cost shows as lower TFLOP/s.
Every provider is checked against eager before it is timed.
"""
from __future__ import annotations

import argparse
import importlib
import os
from typing import Callable

import torch

# The kernels import triton, which must see TRITON_INTERPRET before its first import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import (  # noqa: E402
    PLOTS, bench, bench_graph, compile_static, launch_costs, plot, print_table, profile_table, unless_failing,
)
from kernels import reference  # noqa: E402
from kernels.ffn import ffn  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FFN = Callable[..., torch.Tensor]


OURS = ("triton", "triton-recompute")


def peers(use_compile: bool) -> dict[str, FFN | None]:
    providers: dict[str, FFN | None] = {
        "triton": ffn,
        "triton-recompute": lambda *a: ffn(*a, recompute_pre=True),
        "torch": reference.ffn,
    }
    if use_compile:
        providers["compile"] = compile_static(reference.ffn)
    else:
        providers["compile"] = None
        print("torch.compile: skipped (--smoke or --no-compile)")
    return providers


def inputs(M: int, C: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()
    return [
        make(M, C),
        make(4 * C, C, scale=C**-0.5), make(4 * C, scale=0.1),
        make(C, 4 * C, scale=(4 * C) ** -0.5), make(C, scale=0.1),
    ]


def time_providers(providers: dict[str, FFN | None], M: int, C: int, dtype: torch.dtype, device: str,
                   unit: float) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Forward and forward+backward throughput of each provider at one shape."""
    args = inputs(M, C, dtype, device)
    dy = torch.randn(M, C, device=device).to(dtype)
    expected = reference.ffn(*args)
    expected_grads = torch.autograd.grad(expected, args, dy)
    expected = expected.detach()
    tol = dict(atol=5e-2, rtol=5e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    fwd, both = {}, {}
    flops = 16 * M * C * C

    def measure(name: str, fn: FFN) -> tuple[float, float]:
        out = fn(*args)
        # Never time a provider that gives wrong answers, forward or backward (a tile shape
        # once gave right outputs and wrong weight gradients).
        torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"{name} at C={C}: {m}")
        for i, (g, e) in enumerate(zip(torch.autograd.grad(out, args, dy), expected_grads)):
            rel = ((g.float() - e.float()).norm() / e.float().norm()).item()
            assert rel < (2e-2 if dtype != torch.float32 else 1e-4), f"{name} at C={C}: gradient {i} off by {rel:.3g} (relative)"
        del out
        ms = bench(lambda: fn(*args))
        forward = flops / unit / (ms * 1e-3)
        ms = bench(lambda: fn(*args).backward(dy), grad_to_none=args)
        return forward, 3 * flops / unit / (ms * 1e-3)

    for name, fn in providers.items():
        if fn is None:
            result = None
        elif name in OURS:
            result = measure(name, fn)
        else:  # a peer that fails (a torch.compile error, out of memory) is left out
            result = unless_failing(name, f"C={C}", lambda: measure(name, fn))
        fwd[name], both[name] = result or (None, None)
    return fwd, both


def run(widths: list[int], tokens: dict[int, int], dtype: torch.dtype, device: str, use_compile: bool,
        plot_suffix: str) -> None:
    providers = peers(use_compile)
    unit, unit_name = (1e12, "TFLOP/s") if device == "cuda" else (1e6, "MFLOP/s")
    dt = str(dtype).removeprefix("torch.")
    fwd: dict[str, list] = {name: [] for name in providers}
    both: dict[str, list] = {name: [] for name in providers}
    for C in widths:
        f, b = time_providers(providers, tokens[C], C, dtype, device, unit)
        for name in providers:
            fwd[name].append(f[name])
            both[name].append(b[name])
        show = lambda d: ", ".join(f"{k} {v:.1f}" for k, v in d.items() if v is not None)
        print(f"C={C}: forward {show(f)} | forward+backward {show(b)} {unit_name}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()

    ratio = lambda a, c: None if a is None or c is None else a / c
    headers = ["C", "M", *providers, "triton / torch", "triton / compile"]
    for title, table in (("forward", fwd), ("forward+backward", both)):
        rows = [
            [C, tokens[C], *(table[p][i] for p in providers),
             ratio(table["triton"][i], table["torch"][i]), ratio(table["triton"][i], table["compile"][i])]
            for i, C in enumerate(widths)
        ]
        print_table(f"GPT MLP {title}, {unit_name} ({dt}, linear C->4C, GELU, linear 4C->C, biases)", headers, rows)
    series = {f"{p} fwd": fwd[p] for p in providers} | {f"{p} fwd+bwd": both[p] for p in providers}
    plot(os.path.join(PLOTS, f"ffn{plot_suffix}.png"), f"GPT MLP, {dt}", "C (model width)", unit_name, widths, series)


# Alternative tiles for --sweep, per kind of product (plain: y and dx; epilogue: the GELU
# and GELU-gradient kernels; weight_grad: dW), each block_m, block_n, block_k, group_m,
# warps, stages[, register cap, persistent programs per SM, TMA, split K, warp-specialised,
# tail split, approximate GELU];
# a kind left out keeps the default. The pointer kernel's variants (persistent forward,
# split K, 128-register epilogues, 4-warp 128 x 128 tiles) all ran at 0.70-0.84x eager in
# run 5, below the TMA kernel, and are gone from the list; the pointer table stays as the
# baseline. The TMA rows run kernels/ffn.py's _matmul_tma_kernel (descriptors, persistent);
# split K cuts the weight gradients where their tiles leave SMs idle (C = 768: 144 tiles
# on 132 SMs, cut in 4), so the C = 768 rows show it and the C = 1024 rows do not. The
# warp-specialised rows run _matmul_ws_kernel: a producer warp group keeps loading while
# two consumer groups multiply and run the epilogue (4 warps here name one consumer group).
_TMA = dict(plain=(128, 256, 64, 8, 8, 3, None, 1, True, True), epilogue=(128, 128, 64, 8, 8, 4, None, 1, True, True),
            weight_grad=(128, 128, 64, 8, 8, 4, None, 1, True, True))
_WS = dict(plain=(128, 128, 64, 8, 4, 4, None, 1, True, True, True),
           epilogue=(128, 256, 64, 8, 4, 3, None, 1, True, True, True),
           weight_grad=(128, 128, 64, 8, 4, 4, None, 1, True, True, True))
SWEEP = {
    "table": None,
    # Only the last round's tiles cut along K (kernels/ffn.py _split_plan): at C = 768 the
    # weight gradients' 132 whole tiles, then 12 in 11 slices, against all 144 in four;
    # C = 1280 (GPT-2 large): 396 whole, 4 in 16, against all 400 in three.
    "TMA + tail split K": {kind: t + (False, True) for kind, t in _TMA.items()},
    "warp-specialized + tail split K": {kind: t + (True,) for kind, t in _WS.items()},
    # The GELU epilogues on the hardware's approximate tanh (one MUFU.TANH where sigmoid
    # takes an exp and a division): the forward GELU's part of the epilogue in half the
    # instructions (sm90 build: 872 machine instructions against 1832), which the tensor cores wait out
    # (no warp specialisation), the more so at K = C = 768's short main loop.
    "TMA + approx GELU": {kind: t + (False, False, True) for kind, t in _TMA.items()},
    "TMA + tail split K + approx GELU": {kind: t + (False, True, True) for kind, t in _TMA.items()},
    "pointer kernel (kernels/ffn.py _TILES, Hopper's default before run 5)": {
        kind: (128, 256, 64, 8, 8, 3) if kind == "plain" else (128, 128, 64, 8, 8, 3) for kind in _TMA},
    "warp-specialized TMA + split K (kernels/ffn.py _WS_TILES)": _WS,
    "warp-specialized, 128x128 s4 everywhere": {kind: (128, 128, 64, 8, 4, 4, None, 1, True, True, True) for kind in _WS},
    # 128 x 128 tiles need more operand bytes per FLOP from L2 than 128 x 256; the GELU
    # epilogues fit 128 x 256 in halves (254 registers, no spill; 194 KiB shared at 2 stages).
    "TMA + split K, epilogue 128x256 s2": _TMA | dict(epilogue=(128, 256, 64, 8, 8, 2, None, 1, True, True)),
    "TMA + split K, weight_grad 128x256 s3": _TMA | dict(weight_grad=(128, 256, 64, 8, 8, 3, None, 1, True, True)),
    "TMA, no split K": {kind: t[:9] for kind, t in _TMA.items()},
    "TMA + split K, plain 128x128 s4": _TMA | dict(plain=(128, 128, 64, 8, 8, 4, None, 1, True, True)),
    "TMA + split K, epilogue s3": _TMA | dict(epilogue=(128, 128, 64, 8, 8, 3, None, 1, True, True)),
    # 2 stages of 32 KiB and a 32 KiB staging tile: two programs per SM fit, as do their registers capped.
    "TMA + split K, plain and weight_grad 128x128 s2, 2/SM": _TMA | dict(
        plain=(128, 128, 64, 8, 8, 2, 128, 2, True, True), weight_grad=(128, 128, 64, 8, 8, 2, 128, 2, True, True)),
}


def sweep(widths: list[int], dtype: torch.dtype, device: str = "cuda", warp_specialized: bool = True,
          only: list[str] | None = None) -> None:
    """Times the Triton FFN with each alternative tile table (for re-tuning kernels/ffn.py),
    beside torch eager in the same run; time_providers checks every gradient before it times.
    Candidates run in SWEEP's order, each at every width, so that a run cut short has timed
    the first ones everywhere. warp_specialized=False leaves out the warp-specialised rows
    (for a GPU on which their tests failed or hung: bench/gpu_check.sh); `only` keeps the
    rows whose names contain one of its strings."""
    module = importlib.import_module("kernels.ffn")
    original = module._tiles
    unit = 1e12 if device == "cuda" else 1e6
    tokens = {C: (8192 if C >= 4096 else 16384) if device == "cuda" else 40 for C in widths}
    eager = {C: time_providers({"torch": reference.ffn}, tokens[C], C, dtype, device, unit) for C in widths}
    rows = {C: [["torch eager", eager[C][0]["torch"], eager[C][1]["torch"], 1.0, 1.0]] for C in widths}
    for name, changes in SWEEP.items():
        if not warp_specialized and any(len(t) > 10 and t[10] for t in (changes or {}).values()):
            continue
        if only and not any(part in name for part in only):
            continue
        overrides = {kind: module._Tiles(*t) for kind, t in (changes or {}).items()}
        module._tiles = lambda t, kind, o=overrides: o[kind] if kind in o else original(t, kind)
        try:
            for C in widths:
                try:
                    f, b = time_providers({"triton": ffn}, tokens[C], C, dtype, device, unit)
                    f, b = f["triton"], b["triton"]
                    rows[C].append([name, f, b, f / eager[C][0]["torch"], b / eager[C][1]["torch"]])
                    print(f"row: C={C}", *rows[C][-1], flush=True)  # survives a step killed before the tables
                except Exception as e:  # a tile shape that does not fit (shared memory, registers), or wrong results
                    rows[C].append([name, None, None, None, None])
                    print(f"{name} at C={C}: failed ({str(e).splitlines()[0][:120]})", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
        finally:
            module._tiles = original
    units = "TFLOP/s" if device == "cuda" else "MFLOP/s"
    for C in widths:
        print_table(f"FFN tile sweep, {units} (C={C}, M={tokens[C]})",
                    ["tiles (changes to the table)", "forward", "forward+backward", "fwd / eager", "fwd+bwd / eager"], rows[C])


def few_rows(widths: list[int], rows: list[int], dtype: torch.dtype, device: str) -> None:
    """Forward time of the FFN at generation's row counts, Triton (16-row tiles, bias and
    GELU in the epilogue) against torch eager (cuBLAS, which at one row adds a bias copy
    to each matmul, then a separate GELU) and against what kernels="auto" runs there
    (gpt.ops.ffn: cuBLAS with the GELU in its epilogue on CUDA, under no_grad as a decode
    step is): what gpt/ops.py's FFN_MIN_ROWS should be."""
    from gpt import ops

    tol = dict(atol=5e-2, rtol=5e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    table = []
    for C in widths:
        for M in rows:
            args = [t.detach() for t in inputs(M, C, dtype, device)]
            with torch.no_grad():
                expected = reference.ffn(*args)
                for provider in (ffn, ops.ffn):
                    torch.testing.assert_close(provider(*args), expected, **tol)
                ours = bench(lambda: ffn(*args)) * 1e3
                theirs = bench(lambda: reference.ffn(*args)) * 1e3
                auto = bench(lambda: ops.ffn(*args)) * 1e3
            table.append([C, M, ours, theirs, auto, auto / ours])
    dt = str(dtype).removeprefix("torch.")
    print_table(f"GPT MLP forward at few rows, microseconds ({dt})",
                ["C", "rows", "triton", "torch", "auto (cuBLAS, GELU epilogue)", "auto / triton"], table)


def profile(widths: list[int], tokens: dict[int, int], dtype: torch.dtype, device: str, steps: int) -> None:
    """Per-kernel time of `steps` forward+backward passes, ours and eager's, with each
    kernel's fastest and slowest call, then each pass's host time beside its device time:
    which product, or whether the launch path, makes C = 768's forward+backward read 0.59x
    to 0.83x eager from one run to the next (runs 5 and 6). The main table times through
    `bench`, launches included: a pass whose host time passes its device time (~0.9 ms at
    C = 768 at eager's rate; ours launches ~10 kernels through Python, eager's through ATen)
    is timed at the host's pace, which varies with the host."""
    costs = []
    for C in widths:
        args = inputs(tokens[C], C, dtype, device)
        dy = torch.randn(tokens[C], C, device=device).to(dtype)
        for name, fn in (("triton", ffn), ("torch", reference.ffn)):
            def step(fn: FFN = fn) -> None:
                fn(*args).backward(dy)
                for t in args:
                    t.grad = None

            for _ in range(3):  # warm-up: compilation, allocator
                step()
            kernels = profile_table(f"FFN forward+backward, {name}, C={C}, M={tokens[C]}, per step", step, steps)
            host, device_only, launched = (1e3 * ms for ms in launch_costs(lambda fn=fn: fn(*args).backward(dy), args))
            costs.append([C, name, host, device_only, launched, kernels, launched / device_only])
    print_table("FFN forward+backward, microseconds a pass: host (enqueueing only), device (CUDA-graph replay), "
                "launched (bench, as the main table), kernels (the profile's sum)",
                ["C", "provider", "host", "device", "launched", "kernels", "launched / device"], costs)
    products(widths, tokens, dtype, device)


def products(widths: list[int], tokens: dict[int, int], dtype: torch.dtype, device: str) -> None:
    """Each of the six matmuls of our forward+backward alone, device time, beside cuBLAS
    (torch.mm) on the same operands: which product holds the pass back (run 7: at C = 768
    one call of our TMA kernel took 287 us, the fastest 99). Ours include their epilogues
    (bias, GELU, GELU's gradient, the bias gradient's column sums); cuBLAS's rows are the
    bare product. Each is checked against torch before it is timed."""
    m = importlib.import_module("kernels.ffn")
    tol = dict(atol=5e-2, rtol=5e-2) if dtype != torch.float32 else dict(atol=1e-3, rtol=1e-3)
    rows = []
    for C in widths:
        x, wfc, bfc, wproj, bproj = (t.detach() for t in inputs(tokens[C], C, dtype, device))
        dy = torch.randn(tokens[C], C, device=device).to(dtype)
        pre = torch.empty(tokens[C], wfc.shape[0], dtype=dtype, device=device)
        h, _ = m._matmul(x, wfc.t(), bfc, m._GELU, aux=pre)
        dpre, _ = m._matmul(dy, wproj, epilogue=m._GELU_GRAD, aux=pre, col_sums=True)
        pre32 = pre.float().requires_grad_()
        gelu_grad = torch.autograd.grad(reference.gelu(pre32).sum(), pre32)[0]
        cases = [  # name, ours, its operands, what torch computes
            ("fc: gelu(x W1^T + b1)", lambda: m._matmul(x, wfc.t(), bfc, m._GELU, aux=pre)[0], x, wfc.t(),
             lambda: reference.gelu(torch.addmm(bfc.float(), x.float(), wfc.t().float()))),
            ("proj: h W2^T + b2", lambda: m._matmul(h, wproj.t(), bproj)[0], h, wproj.t(),
             lambda: torch.addmm(bproj.float(), h.float(), wproj.t().float())),
            ("dW2 = dy^T h", lambda: m._matmul(dy.t(), h, kind=m._WEIGHT_GRAD)[0], dy.t(), h, None),
            ("dpre = dy W2 * gelu'(pre), db1", lambda: m._matmul(dy, wproj, epilogue=m._GELU_GRAD, aux=pre,
                                                                col_sums=True)[0], dy, wproj,
             lambda: (dy.float() @ wproj.float()) * gelu_grad),
            ("dW1 = dpre^T x", lambda: m._matmul(dpre.t(), x, kind=m._WEIGHT_GRAD)[0], dpre.t(), x, None),
            ("dx = dpre W1", lambda: m._matmul(dpre, wfc)[0], dpre, wfc, None),
        ]
        for name, ours, a, b, expected in cases:
            expected = expected() if expected is not None else a.float() @ b.float()
            torch.testing.assert_close(ours().float(), expected, **tol, msg=lambda msg, n=name: f"ffn product {n}: {msg}")
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            ms_ours, ms_cublas = bench_graph(ours), bench_graph(lambda a=a, b=b: torch.mm(a, b))
            rate = 1e-9 if device == "cuda" else 1e-3  # TFLOP/s from FLOP per ms; MFLOP/s on CPU
            rows.append([C, name, f"{a.shape[0]} x {b.shape[1]} x {a.shape[1]}", 1e3 * ms_ours,
                         flops / ms_ours * rate, 1e3 * ms_cublas, flops / ms_cublas * rate, ms_cublas / ms_ours])
    units = "TFLOP/s" if device == "cuda" else "MFLOP/s"
    print_table(f"FFN products one at a time, device time (us) and {units}, ours against cuBLAS",
                ["C", "product", "M x N x K", "ours us", f"ours {units}", "cuBLAS us", f"cuBLAS {units}",
                 "cuBLAS / ours (time)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU through the Triton interpreter, to check the script runs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="element type (default bf16)")
    parser.add_argument("--widths", type=int, nargs="+", default=[768, 1024, 1600, 4096], help="model widths C")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves its compile time)")
    parser.add_argument("--sweep", type=int, metavar="C", nargs="*", help="time alternative tile tables at widths C (default 768 1024) instead (with --smoke: on CPU)")
    parser.add_argument("--no-warp-specialized", action="store_true", help="--sweep without the warp-specialised rows")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="--sweep: only the rows whose names contain one of these")
    parser.add_argument("--few-rows", action="store_true", help="time a decode step's FFN (1 to 64 rows) instead (with --smoke: on CPU)")
    parser.add_argument("--profile", type=int, metavar="C", nargs="*", help="per-kernel times of forward+backward at widths C (default 768), ours and eager (with --smoke: on CPU)")
    args = parser.parse_args()
    if args.profile is not None:
        if args.smoke:
            profile([16], {16: 40}, torch.float32, "cpu", steps=2)
        elif torch.cuda.is_available():
            widths = args.profile or [768]
            profile(widths, {C: 8192 if C >= 4096 else 16384 for C in widths}, DTYPES[args.dtype], "cuda", steps=20)
        else:
            parser.exit(1, "bench_ffn: no CUDA GPU; use --smoke --profile to check the script on CPU\n")
        return
    if args.few_rows:
        if args.smoke:
            few_rows([16], [1, 5], torch.float32, "cpu")
        elif torch.cuda.is_available():
            few_rows([768, 1024], [1, 8, 32, 64], DTYPES[args.dtype], "cuda")
        else:
            parser.exit(1, "bench_ffn: no CUDA GPU; use --smoke --few-rows to check the script on CPU\n")
        return
    if args.smoke and args.sweep is not None:
        sweep([16], torch.float32, "cpu", only=args.only)
        return
    if args.smoke:
        run([16, 32], {16: 40, 32: 40}, torch.float32, "cpu", use_compile=False, plot_suffix="_smoke")
        return
    if not torch.cuda.is_available():
        parser.exit(1, f"bench_ffn: no CUDA GPU; use --smoke{' --sweep' if args.sweep is not None else ''} "
                       f"to check the script on CPU\n")
    dtype = DTYPES[args.dtype]
    if args.sweep is not None:
        sweep(args.sweep or [768, 1024], dtype, warp_specialized=not args.no_warp_specialized, only=args.only)
        return
    tokens = {C: 8192 if C >= 4096 else 16384 for C in args.widths}
    run(args.widths, tokens, dtype, "cuda", use_compile=not args.no_compile, plot_suffix="")


if __name__ == "__main__":
    main()
