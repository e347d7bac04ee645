"""LayerNorm bandwidth over the hidden size N: Triton vs torch eager, torch.compile, Liger-Kernel.

    python -m bench.bench_layer_norm            # bf16 on the GPU, M*N = 2^25 elements
    python -m bench.bench_layer_norm --smoke    # tiny fp32 shapes on CPU (Triton interpreter)

GB/s count bytes as the Triton LayerNorm tutorial does (weights and statistics ignored,
so every provider is scored on the same minimal traffic):
  layer_norm      forward x in, y out: 2*M*N elements; backward x, dy in, dx out: 3*M*N
  add_layer_norm  forward x, residual in, sum, y out: 4*M*N; backward sum, dy, dsum in, dx out: 4*M*N
forward+backward counts both. M*N is held fixed (default 2^25: 64 MiB per bf16 tensor,
above an H100's 50 MiB L2) so each N is timed on the same amount of data; M = elements // N.
"copy" is x.clone(), the same 2*M*N elements as the forward: "% of copy" is the forward's
share of the bandwidth the device reaches on a plain copy, the best copy of the run (the
same elements at every N, so one device figure).

Times are device time, replayed from CUDA graphs (bench.common.bench_graph): at these
sizes a kernel runs tens of microseconds, about what a Python launch path costs, and
timing launches made the numbers swing 2-6x run to run. "triton launched" is the Triton
forward timed the ordinary way (do_bench, host launch included), for that cost.
"""
from __future__ import annotations

import argparse
import importlib
import os
from typing import Callable

import torch
import torch.nn.functional as F

# The kernels import triton, which must see TRITON_INTERPRET before its first import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import (  # noqa: E402
    PLOTS, bench, bench_graph, check_close, compile_static, outputs_and_grads, plot, print_table, unless_failing,
)
from kernels.layer_norm import add_layer_norm, layer_norm  # noqa: E402

EPS = 1e-5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LN = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
ADD_LN = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], tuple]


def torch_layer_norm(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def torch_add_layer_norm(x, r, w, b, eps):
    s = x + r
    return s, F.layer_norm(s, (s.shape[-1],), w, b, eps)


def peers(use_compile: bool, cuda: bool) -> tuple[dict[str, LN | None], dict[str, ADD_LN | None]]:
    """Providers by name; None marks a peer that is skipped (the reason is printed)."""
    ln: dict[str, LN | None] = {"triton": layer_norm, "torch": torch_layer_norm}
    add: dict[str, ADD_LN | None] = {"triton": add_layer_norm, "torch": torch_add_layer_norm}
    if use_compile:
        ln["compile"] = compile_static(torch_layer_norm)
        add["compile"] = compile_static(torch_add_layer_norm)
    else:
        ln["compile"] = add["compile"] = None
        print("torch.compile: skipped (--smoke or --no-compile)")
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        ln["liger"] = None
        print("Liger-Kernel: skipped (liger_kernel is not installed)")
    else:
        ln["liger"] = LigerLayerNormFunction.apply if cuda else None
        if not cuda:
            print("Liger-Kernel: skipped (needs CUDA)")
    return ln, add


def gbps(elements: int, element_size: int, ms: float | None) -> float | None:
    return None if ms is None else elements * element_size * 1e-6 / ms


def run(sizes: list[int], elements: int, dtype: torch.dtype, device: str, use_compile: bool, plot_suffix: str) -> None:
    ln, add = peers(use_compile, device == "cuda")
    esize = torch.tensor([], dtype=dtype).element_size()
    fwd: dict[str, list] = {name: [] for name in [*ln, "copy", "triton launched"]}
    both: dict[str, list] = {name: [] for name in ln}
    add_fwd: dict[str, list] = {name: [] for name in add}
    add_both: dict[str, list] = {name: [] for name in add}
    ms_list = []
    for N in sizes:
        M = elements // N
        ms_list.append(M)
        torch.manual_seed(0)
        x, r, dy, ds = (torch.randn(M, N, device=device, dtype=dtype) for _ in range(4))
        w = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        x.requires_grad_()
        r.requires_grad_()
        params = [x, r, w, b]
        # Never time a provider that gives wrong answers, forward or backward: outputs and
        # every gradient against eager torch's, for ours and each peer.
        tol = dict(atol=5e-2, rtol=5e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
        expected = outputs_and_grads(torch_layer_norm(x, w, b, EPS), (x, w, b), [dy])
        expected_add = outputs_and_grads(torch_add_layer_norm(x, r, w, b, EPS), (x, r, w, b), [ds, dy])

        def measure_ln(name: str, fn: LN) -> tuple[float | None, float | None]:
            got = outputs_and_grads(fn(x, w, b, EPS), (x, w, b), [dy])
            check_close(got, expected, f"{name} layer_norm at N={N}", **tol)
            del got
            ms = bench_graph(lambda: fn(x, w, b, EPS).backward(dy), grad_to_none=params)
            return gbps(2 * M * N, esize, bench_graph(lambda: fn(x, w, b, EPS))), gbps(5 * M * N, esize, ms)

        def measure_add(name: str, fn: ADD_LN) -> tuple[float | None, float | None]:
            got = outputs_and_grads(fn(x, r, w, b, EPS), (x, r, w, b), [ds, dy])
            check_close(got, expected_add, f"{name} add_layer_norm at N={N}", **tol)
            del got
            ms = bench_graph(lambda: torch.autograd.backward(fn(x, r, w, b, EPS), [ds, dy]), grad_to_none=params)
            return gbps(4 * M * N, esize, bench_graph(lambda: fn(x, r, w, b, EPS))), gbps(8 * M * N, esize, ms)

        for table, table_both, providers, measure in ((fwd, both, ln, measure_ln), (add_fwd, add_both, add, measure_add)):
            for name, fn in providers.items():
                if fn is None:
                    result = None
                elif name == "triton":
                    result = measure(name, fn)
                else:
                    result = unless_failing(name, f"N={N}", lambda: measure(name, fn))
                table[name].append(result[0] if result else None)
                table_both[name].append(result[1] if result else None)
        fwd["copy"].append(gbps(2 * M * N, esize, bench_graph(lambda: x.clone())))
        fwd["triton launched"].append(gbps(2 * M * N, esize, bench(lambda: layer_norm(x, w, b, EPS))))
        del expected, expected_add

    ratio = lambda a, c: None if a is None or c is None else a / c
    dt = str(dtype).removeprefix("torch.")
    # Every N copies the same 2*M*N elements: one device bandwidth, its best reading (run 5's
    # first copy, at N = 768, read 2674 GB/s against 4.0-4.1 TB/s at every other N).
    copy = max((c for c in fwd["copy"] if c is not None), default=None)
    rows = [
        [N, M, *(fwd[k][i] for k in fwd), 100 * ratio(fwd["triton"][i], copy), ratio(fwd["triton"][i], fwd["liger"][i])]
        for i, (N, M) in enumerate(zip(sizes, ms_list))
    ]
    print_table(f"layer_norm forward, GB/s ({dt})", ["N", "M", *fwd, "triton % of best copy", "triton / liger"], rows)
    rows = [
        [N, M, *(both[k][i] for k in both), ratio(both["triton"][i], both["torch"][i]), ratio(both["triton"][i], both["liger"][i])]
        for i, (N, M) in enumerate(zip(sizes, ms_list))
    ]
    print_table(f"layer_norm forward+backward, GB/s ({dt})", ["N", "M", *both, "triton / torch", "triton / liger"], rows)
    rows = [
        [N, M, *(add_fwd[k][i] for k in add_fwd), *(add_both[k][i] for k in add_both), ratio(add_both["triton"][i], add_both["torch"][i])]
        for i, (N, M) in enumerate(zip(sizes, ms_list))
    ]
    headers = ["N", "M", *(f"{k} fwd" for k in add_fwd), *(f"{k} fwd+bwd" for k in add_both), "fwd+bwd triton / torch"]
    print_table(f"add_layer_norm (torch: x + r, then layer_norm), GB/s ({dt})", headers, rows)

    series = {f"{k} fwd": v for k, v in fwd.items()} | {f"{k} fwd+bwd": v for k, v in both.items()}
    plot(os.path.join(PLOTS, f"layer_norm{plot_suffix}.png"), f"LayerNorm, {dt}, M*N = {elements}", "N (hidden size)", "GB/s", sizes, series)
    series = {f"{k} fwd": v for k, v in add_fwd.items()} | {f"{k} fwd+bwd": v for k, v in add_both.items()}
    plot(os.path.join(PLOTS, f"add_layer_norm{plot_suffix}.png"), f"add + LayerNorm, {dt}, M*N = {elements}", "N (hidden size)", "GB/s", sizes, series)


# Candidate launch settings for --sweep: elements per program step and per thread (for the
# forward's tile and the backward's apart), backward pipeline stages and the persistent
# forward's (stages, programs per SM). The non-persistent forward at N = 8192 holds 2
# programs per SM (53-60 registers x 16 warps, sm90): 32 KiB in flight; persistent with 2
# stages, 2 x 2 tiles. A tile of one row at 8 elements a thread is Liger's forward, the
# default at N = 513-1024 since 2026-11-26. There the stacked forward (4 rows, 8 warps, run
# 5's default) takes a layout for weight and bias of their own and moves them into x's
# through 2 KiB of shared memory and four more barriers a program (its sm90 build); 4-warp
# tiles of one or four rows do without (16-64 bytes).
# The persistent forward pipelines weight and bias with x (as many stages of each); at
# N <= 4096 its three stages take about 48 KiB or less (sm90 build), so four programs fit
# an SM, registers included: (3, 4).
# 4 elements a thread is one row over 8 warps at N <= 1024: run 6 (H200) had torch.compile's
# forward at 3.87 and 3.83 TB/s at N = 768 and 1024, ours (one row, 4 warps) at 2.99 and 3.59.
SWEEP_TILES = (1024, 2048, 4096, 8192)
SWEEP_PER_THREAD = (4, 8, 16, 32)
# The forward keeps ~2 fp32 values an element live (the backward ~6): 64 a thread fits it.
SWEEP_FWD_PER_THREAD = (*SWEEP_PER_THREAD, 64)
SWEEP_FWD_TILES = (*SWEEP_TILES, 16384)  # two rows of 8192
SWEEP_STAGES = (1, 2, 3)
SWEEP_FWD = ((2, 2), (3, 2), (2, 4), (3, 4))


def _tile(block_n: int, tile: int, per_thread: int) -> tuple[int, int]:
    """(rows, warps) of a program step of `tile` elements (at least one row), per_thread each."""
    block_m = max(1, tile // block_n)
    return block_m, min(32, max(1, block_m * block_n // (32 * per_thread)))


def sweep(sizes: list[int], elements: int, dtype: torch.dtype, device: str, forward_only: bool = False) -> None:
    """Times layer_norm under each candidate _Settings per N, for re-tuning
    kernels/layer_norm.py's _settings; every candidate is checked before it is timed.
    Forward candidates (the forward's tile, the persistent forward) are timed forward
    only: the backward they run is the default's; add_layer_norm's forward beside each
    (its residual doubles the persistent forward's stages). forward_only: those alone."""
    module = importlib.import_module("kernels.layer_norm")
    original = module._settings
    esize = torch.tensor([], dtype=dtype).element_size()
    tol = dict(atol=5e-2, rtol=5e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    liger = peers(use_compile=False, cuda=device == "cuda")[0]["liger"]
    rows = []
    try:
        for N in sizes:
            M = elements // N
            torch.manual_seed(0)
            x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
            w, b = (torch.randn(N, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            dy = torch.randn(M, N, device=device, dtype=dtype)
            r = torch.randn(M, N, device=device, dtype=dtype)
            # The outputs too: the forward candidates write them. No output may outlive its
            # check: a live autograd graph keeps x's AccumulateGrad node from the default
            # stream, and a backward captured beside it fails (run 6: Liger's capture did).
            expected = outputs_and_grads(torch_layer_norm(x, w, b, EPS), (x, w, b), [dy])
            expected_add = torch_add_layer_norm(x.detach(), r, w.detach(), b.detach(), EPS)
            # The peers first, timed in the same run: the forward's targets are a share of copy
            # and a ratio to Liger.
            blank = [""] * 6
            copy = gbps(2 * M * N, esize, bench_graph(lambda: x.clone())) if device == "cuda" else None
            rows.append([N, "copy", *blank, copy, None, None])
            if liger is not None:
                fwd = gbps(2 * M * N, esize, bench_graph(lambda: liger(x, w, b, EPS)))
                ms = bench_graph(lambda: liger(x, w, b, EPS).backward(dy), grad_to_none=[x, w, b])
                rows.append([N, "liger", *blank, fwd, gbps(5 * M * N, esize, ms), None])
            for row in rows[-2 if liger is not None else -1:]:
                print("row:", *row, flush=True)
            default = original(N, esize)
            # The default, then the forward candidates, so that a step cut short has timed those first.
            forward = [default._replace(fwd_stages=s, fwd_programs_per_sm=p) for s, p in SWEEP_FWD]
            for tile in SWEEP_FWD_TILES:
                for per_thread in SWEEP_FWD_PER_THREAD:
                    block_m, warps = _tile(default.block_n, tile, per_thread)
                    forward.append(default._replace(fwd_block_m=block_m, fwd_warps=warps, fwd_stages=0))
            backward = [] if forward_only else [default._replace(bwd_stages=s) for s in SWEEP_STAGES]
            for tile in () if forward_only else SWEEP_TILES:
                for per_thread in SWEEP_PER_THREAD:
                    block_m, warps = _tile(default.block_n, tile, per_thread)
                    backward.append(default._replace(bwd_block_m=block_m, bwd_warps=warps))
            timed = set()
            for cfg in [default, *forward, *backward]:
                if cfg in timed:
                    continue
                timed.add(cfg)
                module._settings = lambda n, e, s=cfg: s
                persistent = f"{cfg.fwd_stages}, {cfg.fwd_programs_per_sm}/SM" if cfg.fwd_stages else "-"
                label = [N, cfg.fwd_block_m, cfg.fwd_warps, persistent, cfg.bwd_block_m, cfg.bwd_warps, cfg.bwd_stages,
                         "default" if cfg == default else ""]
                try:
                    check_close(outputs_and_grads(layer_norm(x, w, b, EPS), (x, w, b), [dy]), expected, f"N={N}", **tol)
                except Exception as e:  # e.g. more shared memory than the device has, or wrong numbers
                    rows.append([*label, None, None, None])
                    print(f"N={N} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    continue
                add = None
                if cfg == default or cfg in forward:
                    with torch.no_grad():
                        torch.testing.assert_close(add_layer_norm(x, r, w, b, EPS), expected_add, **tol)
                        add = gbps(4 * M * N, esize, bench_graph(lambda: add_layer_norm(x, r, w, b, EPS)))
                fwd = gbps(2 * M * N, esize, bench_graph(lambda: layer_norm(x, w, b, EPS)))
                both = None
                if cfg == default or cfg in backward:
                    ms = bench_graph(lambda: layer_norm(x, w, b, EPS).backward(dy), grad_to_none=[x, w, b])
                    both = gbps(5 * M * N, esize, ms)
                rows.append([*label, fwd, both, add])
                print("row:", *rows[-1], flush=True)  # survives a step killed before the table
    finally:
        module._settings = original
    dt = str(dtype).removeprefix("torch.")
    headers = ["N", "fwd BLOCK_M", "fwd warps", "persistent fwd", "bwd BLOCK_M", "bwd warps", "bwd stages", "",
               "forward", "forward+backward", "add_layer_norm forward"]
    print_table(f"layer_norm settings sweep, GB/s ({dt}, M*N = {elements})", headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU through the Triton interpreter, to check the script runs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="element type on the GPU (default bf16)")
    parser.add_argument("--elements", type=int, default=2**25, help="M*N held fixed across the sweep (default 2^25)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--sweep", action="store_true", help="time candidate launch settings instead (with --smoke: on CPU)")
    parser.add_argument("--forward-only", action="store_true", help="--sweep: the forward candidates alone (its tiles, the persistent forward)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1024, 2048, 4096, 8192], help="--sweep: the N to time, in this order (default 768 1024 2048 4096 8192)")
    args = parser.parse_args()
    if args.sweep:
        if args.smoke:
            sweep([64, 96], 64 * 96, torch.float32, "cpu")
        elif torch.cuda.is_available():
            sweep(args.sizes, args.elements, DTYPES[args.dtype], "cuda", args.forward_only)
        else:
            parser.exit(1, "bench_layer_norm: no CUDA GPU; use --smoke --sweep to check the script on CPU\n")
        return
    if args.smoke:
        run(sizes=[64, 96], elements=64 * 96, dtype=torch.float32, device="cpu", use_compile=False, plot_suffix="_smoke")
        return
    if not torch.cuda.is_available():
        parser.exit(1, "bench_layer_norm: no CUDA GPU; use --smoke to check the script on CPU\n")
    run(
        sizes=[768, 1024, 2048, 4096, 8192], elements=args.elements, dtype=DTYPES[args.dtype],
        device="cuda", use_compile=not args.no_compile, plot_suffix="",
    )


if __name__ == "__main__":
    main()
