"""Causal attention throughput over the sequence length T: the Triton kernel against every peer.

    python -m bench.bench_attention            # bf16 on the GPU, B*T = 16384 tokens, hidden 2048
    python -m bench.bench_attention --smoke    # tiny fp32 shapes on CPU (Triton interpreter)
    python -m bench.bench_attention --dropout 0.1 --no-flex   # training with attention dropout
    python -m bench.bench_attention --fused-qkv  # q, k, v as the model passes them: views of one projection
    python -m bench.bench_attention --gqa 4    # grouped-query: k and v with a quarter of q's heads
    python -m bench.bench_attention --window 1024   # a causal sliding window of 1024 keys

Peers: F.scaled_dot_product_attention with each backend forced (FlashAttention-2, cuDNN,
memory-efficient; a backend that refuses a shape is skipped and the reason printed),
FlexAttention (a causal block mask, compiled with torch.compile), and naive torch
(softmax(QK^T) V with the T x T scores in memory) where those fit.

B*T and the hidden size H*D are held fixed, so every T does the same projection work and
attention FLOPs grow linearly with T. TFLOP/s count as the Triton fused-attention
tutorial does: forward 4*B*H*T^2*D, halved for causal; backward 2.5x the forward, so
forward+backward is 3.5x. Every provider is checked against SDPA before it is timed (with
--dropout, without dropout: the masks are random; the tests check ours with its own).
With --window W (a causal sliding window) the FLOPs count the pairs it keeps,
4*B*H*D * (W*T - W*(W-1)/2), and SDPA takes the window as a boolean mask (its
FlashAttention-2 backend refuses masks; its memory-efficient one computes every tile).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

# The kernels import triton, which must see TRITON_INTERPRET before its first import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import PLOTS, bench, check_close, compile_static, outputs_and_grads, plot, print_table, unless_failing  # noqa: E402
from kernels.attention import attention  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Attn = Callable[..., torch.Tensor]  # (q, k, v, dropout_p=0.0) -> output; k, v may have fewer heads (--gqa)
# A (T, device) -> attention function factory; returns None (and prints why) to skip.
Maker = Callable[[int, int, int, str], "Attn | None"]


def window_mask(T: int, window: int | None, device: torch.device | str) -> torch.Tensor:
    """(T, T) boolean, True where query i sees key j: causal, within `window` keys if given."""
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return mask if window is None else mask & ~mask.tril(-window)


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
          window: int | None = None) -> torch.Tensor:
    T, group = q.shape[-2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = window_mask(T, window, q.device)
    return F.dropout(scores.masked_fill(~mask, float("-inf")).softmax(-1), dropout_p) @ v


def triton_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                  window: int | None = None) -> torch.Tensor:
    return attention(q, k, v, causal=True, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1], window=window)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
         window: int | None = None) -> torch.Tensor:
    mask = dict(is_causal=True) if window is None else dict(attn_mask=window_mask(q.shape[2], window, q.device))
    if q.shape[1] == k.shape[1]:  # enable_gqa is torch 2.5's
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **mask)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True, **mask)


def sdpa_with(backend, window: int | None = None) -> Maker:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, dropout_p=0.0):
        with sdpa_kernel(backend):
            return sdpa(q, k, v, dropout_p, window)

    return lambda B, H, T, device: fn


def flex_maker(window: int | None = None) -> Maker:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = compile_static(flex_attention)  # one graph per shape in the sweep

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    def make(B, H, T, device):
        mask_mod = causal if window is None else sliding
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
        return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])

    return make


def naive_maker(budget_bytes: int | None, dtype: torch.dtype, window: int | None = None) -> Maker:
    def make(B, H, T, device):
        # Scores, masked scores, probabilities and their gradients: about five T x T
        # tensors per head live at once in the backward.
        need = 5 * B * H * T * T * dtype.itemsize
        if budget_bytes is not None and need > budget_bytes:
            print(f"naive: skipped at T={T} (needs ~{need / 2**30:.0f} GiB)")
            return None
        return lambda q, k, v, dropout_p=0.0: naive(q, k, v, dropout_p, window)

    return make


def peers(cuda: bool, use_flex: bool, dtype: torch.dtype, dropout: bool = False,
          window: int | None = None) -> dict[str, Maker]:
    makers: dict[str, Maker] = {
        "triton": lambda B, H, T, device: lambda q, k, v, dropout_p=0.0: triton_causal(q, k, v, dropout_p, window)}
    if cuda:
        from torch.nn.attention import SDPBackend

        makers["sdpa-flash"] = sdpa_with(SDPBackend.FLASH_ATTENTION, window)
        makers["sdpa-cudnn"] = sdpa_with(SDPBackend.CUDNN_ATTENTION, window)
        makers["sdpa-efficient"] = sdpa_with(SDPBackend.EFFICIENT_ATTENTION, window)
        if dropout:
            print("flex: skipped (FlexAttention has no dropout)")
        elif use_flex:
            try:
                makers["flex"] = flex_maker(window)
            except ImportError as e:
                print(f"flex: skipped ({e})")
        else:
            print("flex: skipped (--no-flex)")
        free, _ = torch.cuda.mem_get_info()
        makers["naive"] = naive_maker(int(free * 0.7), dtype, window)
    else:
        print("sdpa backends, flex: skipped (need CUDA)")
        makers["naive"] = naive_maker(None, dtype, window)
    return makers


def flops_per_s(B: int, H: int, T: int, D: int, ms: float | None, factor: float, unit: float,
                window: int | None = None) -> float | None:
    # Causal: half the score matrix (the tutorial's count); a window: the pairs it keeps.
    pairs = T * T * 0.5 if window is None else min(window, T) * T - min(window, T) * (min(window, T) - 1) / 2
    flops = 4 * B * H * pairs * D * factor
    return None if ms is None else flops / unit / (ms * 1e-3)


def qkv_inputs(B: int, H: int, T: int, D: int, dtype: torch.dtype, device: str, fused: bool, group: int = 1
               ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """q (B, H, T, D), k and v (B, H // group, T, D), and the leaves their gradients reach.
    fused: views of one (B, T, 3, H, D) tensor, as the model's QKV projection gives them (a
    row stride of 3*H*D, heads D apart), whose backward also assembles dq, dk, dv into that
    tensor's gradient."""
    if not fused:
        q, k, v = (torch.randn(B, heads, T, D, device=device, dtype=dtype, requires_grad=True)
                   for heads in (H, H // group, H // group))
        return (q, k, v), [q, k, v]
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return (q, k, v), [qkv]


def run(
    seq_lens: list[int], tokens: int, hidden: int, head_dims: list[int], dtype: torch.dtype,
    device: str, use_flex: bool, plot_suffix: str, dropout_p: float = 0.0, fused_qkv: bool = False, group: int = 1,
    window: int | None = None,
) -> None:
    makers = peers(device == "cuda", use_flex, dtype, dropout_p > 0, window)
    # The interpreter runs at MFLOP/s, not TFLOP/s.
    unit, unit_name = (1e12, "TFLOP/s") if device == "cuda" else (1e6, "MFLOP/s")
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    dt = (str(dtype).removeprefix("torch.") + (f", dropout {dropout_p}" if dropout_p else "")
          + (", q/k/v views of a fused QKV" if fused_qkv else "")
          + (f", {group} query heads a key/value head" if group > 1 else "")
          + (f", sliding window {window}" if window else ""))
    for D in head_dims:
        H = hidden // D
        fwd: dict[str, list] = {name: [] for name in makers}
        both: dict[str, list] = {name: [] for name in makers}
        shapes = []
        for T in seq_lens:
            B = max(1, tokens // T)
            shapes.append((T, B, H))
            torch.manual_seed(0)
            (q, k, v), leaves = qkv_inputs(B, H, T, D, dtype, device, fused_qkv, group)
            do = torch.randn(B, H, T, D, device=device, dtype=dtype)
            # Never time a provider that gives wrong answers, forward or backward: the output
            # and dq, dk, dv against SDPA's, for ours and each peer.
            expected = outputs_and_grads(sdpa(q, k, v, window=window), (q, k, v), [do])

            def measure(name: str, make) -> tuple[float | None, float | None] | None:
                fn = make(B, H, T, device)
                if fn is None:  # e.g. the naive reference where it would not fit
                    return None
                check_close(outputs_and_grads(fn(q, k, v), (q, k, v), [do]), expected, f"{name} at T={T}, D={D}", **tol)
                timed = (lambda: fn(q, k, v, dropout_p)) if dropout_p else (lambda: fn(q, k, v))
                forward = flops_per_s(B, H, T, D, bench(timed), 1.0, unit, window)
                ms = bench(lambda: timed().backward(do), grad_to_none=leaves)
                return forward, flops_per_s(B, H, T, D, ms, 3.5, unit, window)

            for name, make in makers.items():
                if name == "triton":
                    result = measure(name, make)
                else:  # a backend that refuses the shape, or runs out of memory, is left out
                    result = unless_failing(name, f"T={T}, D={D}", lambda: measure(name, make))
                fwd[name].append(result[0] if result else None)
                both[name].append(result[1] if result else None)
            del q, k, v, leaves, do, expected
            if device == "cuda":
                torch.cuda.empty_cache()

        ratio = lambda a, c: None if a is None or c is None else a / c
        extra = [p for p in ("flex", "sdpa-cudnn", "sdpa-flash") if p in makers]
        headers = ["T", "B", "H", *makers, *(f"triton / {p}" for p in extra)]
        for title, table in (("forward", fwd), ("forward+backward", both)):
            rows = [
                [T, B, H, *(table[p][i] for p in makers), *(ratio(table["triton"][i], table[p][i]) for p in extra)]
                for i, (T, B, H) in enumerate(shapes)
            ]
            print_table(f"causal attention {title}, {unit_name} ({dt}, D={D}, H*D={hidden}, B*T={tokens})", headers, rows)
        series = {f"{p} fwd": fwd[p] for p in makers} | {f"{p} fwd+bwd": both[p] for p in makers}
        plot(
            os.path.join(PLOTS, f"attention_d{D}{plot_suffix}.png"),
            f"causal attention, {dt}, D={D}, B*T={tokens}", "T (sequence length)", unit_name, seq_lens, series,
        )


# Alternative launches for --sweep, (BLOCK_M, BLOCK_N, num_warps, num_stages[, tma]) per
# kernel; each is timed with the other two kernels at the table's setting. The TMA rows
# move the tiles each kernel loops over (forward: q, k, v; dK/dV: q, dO; dQ: k, v)
# through tensor descriptors (Hopper): no per-thread address arithmetic (a third fewer
# PTX instructions in the D = 64 forward, compiled for sm90), which competes for issue
# slots with the softmax that sets the D = 64 forward's pace.
SWEEP = {
    # Run 5 (H200, T = 4096) chose the table's settings from these lists (the output marks
    # them "default"): D = 64 forward 311 -> 378 TFLOP/s, D = 128 forward 399 -> 434; dK/dV
    # at D = 64 and dQ at both head dims 4.5-11% faster fwd+bwd; the TMA rows came within
    # 1-3% of the pointer ones (ahead only for dQ, taken at D = 128).
    # (128, 128, 4, 3) is what FlexAttention's Hopper table gives 16-bit D = 64 -- it spills
    # 40 bytes with pointers and fits with TMA (254 registers).
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3, True), (128, 64, 4, 3, True), (128, 64, 8, 3, True),
            (64, 64, 4, 3), (128, 64, 4, 3)],
    "dkdv": [(32, 128, 4, 5), (32, 128, 8, 3), (32, 128, 8, 5), (64, 128, 8, 3), (32, 64, 4, 4), (32, 128, 4, 5, True)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 3, True), (128, 32, 4, 5), (64, 32, 4, 4), (128, 64, 8, 2)],
}


def sweep(T: int, tokens: int, hidden: int, head_dims: list[int], dtype: torch.dtype, device: str,
          sweep_table: dict[str, list[tuple]] = SWEEP) -> None:
    """Times the Triton kernel under alternative launch settings, kernel by kernel, for
    re-tuning kernels/attention.py's table; every candidate is checked against SDPA."""
    module = importlib.import_module("kernels.attention")
    original = module._settings
    unit = 1e12 if device == "cuda" else 1e6
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    rows = []
    cases = {}
    for D in head_dims:
        H, B = hidden // D, max(1, tokens // T)
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, T, D, device=device, dtype=dtype)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        cases[D] = (B, H, q, k, v, do, [ref.detach(), *torch.autograd.grad(ref, (q, k, v), do)])
    # Kernel by kernel, each launch at every head dim: a step cut short has timed the
    # forward launches (the D = 64 forward is the gap to FlexAttention) at both.
    try:
        for kernel, launches in sweep_table.items():
            for launch in launches:
                for D, (B, H, q, k, v, do, expected) in cases.items():
                    base = original(D, dtype, module.device_capability(q.device.index or 0))
                    settings = base._replace(**{kernel: module._Launch(*launch)})
                    module._settings = lambda *a, s=settings: s
                    try:
                        out = triton_causal(q, k, v)
                        got = [out.detach(), *torch.autograd.grad(out, (q, k, v), do)]
                        for g, e in zip(got, expected):
                            torch.testing.assert_close(g, e, **tol)
                        fwd = flops_per_s(B, H, T, D, bench(lambda: triton_causal(q, k, v)), 1.0, unit)
                        ms = bench(lambda: triton_causal(q, k, v).backward(do), grad_to_none=[q, k, v])
                        label = str(launch) + (" (default)" if settings == base else "")
                        rows.append([D, kernel, label, fwd, flops_per_s(B, H, T, D, ms, 3.5, unit)])
                        print("row:", *rows[-1], flush=True)  # survives a step killed before the table
                    except Exception as e:  # out of shared memory or registers, or wrong
                        print(f"D={D} {kernel} {launch}: failed ({str(e).splitlines()[0][:120]})")
                        rows.append([D, kernel, str(launch), None, None])
                    finally:
                        module._settings = original
    finally:
        module._settings = original
    rows.sort(key=lambda r: r[0])  # stable: by head dim, kernel and launch order within
    dt = str(dtype).removeprefix("torch.")
    print_table(
        f"attention launch sweep, {'TFLOP/s' if device == 'cuda' else 'MFLOP/s'} ({dt}, T={T}, B*T={tokens}, H*D={hidden})",
        ["D", "kernel", "BLOCK_M, BLOCK_N, warps, stages[, tma]", "forward", "forward+backward"], rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU through the Triton interpreter, to check the script runs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="element type (default bf16)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dims to sweep (default 64 128)")
    parser.add_argument("--tokens", type=int, default=16384, help="B*T held fixed across the sweep (default 16384)")
    parser.add_argument("--hidden", type=int, default=2048, help="H*D held fixed (default 2048)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves its compile time)")
    parser.add_argument("--sweep", action="store_true", help="time alternative launch settings at T=4096 instead (with --smoke: on CPU)")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout probability for every provider (default 0)")
    parser.add_argument("--fused-qkv", action="store_true", help="q, k, v as views of one (B, T, 3, H, D) tensor, as the model passes them")
    parser.add_argument("--gqa", type=int, default=1, metavar="G",
                        help="grouped-query attention: G query heads a key/value head (default 1: multi-head)")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="a causal sliding window: each query sees its W latest keys (default: all)")
    args = parser.parse_args()
    if args.window is not None and args.window < 1:
        parser.error(f"--window {args.window} must be at least 1")
    if args.gqa < 1 or any(args.hidden // D % args.gqa for D in args.head_dims):
        parser.error(f"--gqa {args.gqa} must be at least 1 and divide every head count (--hidden / --head-dims)")
    if args.gqa > 1 and args.fused_qkv:
        parser.error("--gqa with --fused-qkv: the fused layout is the model's, whose k and v have q's heads")
    suffix = ("_dropout" if args.dropout else "") + ("_fused_qkv" if args.fused_qkv else "") + (
        f"_gqa{args.gqa}" if args.gqa > 1 else "") + (f"_window{args.window}" if args.window else "")
    if args.sweep:
        if args.smoke:
            tiny = {"fwd": [(32, 16, 4, 1), (16, 16, 4, 1, True)], "dkdv": [(16, 32, 4, 1, True)], "dq": [(32, 16, 4, 1, True)]}
            sweep(48, 48, 32, [16], torch.float32, "cpu", tiny)
        elif torch.cuda.is_available():
            sweep(4096, args.tokens, args.hidden, args.head_dims, DTYPES[args.dtype], "cuda")
        else:
            parser.exit(1, "bench_attention: no CUDA GPU; use --smoke --sweep to check the script on CPU\n")
        return
    if args.smoke:
        run(
            seq_lens=[16, 48], tokens=96, hidden=64, head_dims=[16, 32], dtype=torch.float32,
            device="cpu", use_flex=False, plot_suffix="_smoke", dropout_p=args.dropout, fused_qkv=args.fused_qkv,
            group=args.gqa, window=args.window,
        )
        return
    if not torch.cuda.is_available():
        parser.exit(1, "bench_attention: no CUDA GPU; use --smoke to check the script on CPU\n")
    run(
        seq_lens=[1024, 2048, 4096, 8192, 16384], tokens=args.tokens, hidden=args.hidden,
        head_dims=args.head_dims, dtype=DTYPES[args.dtype], device="cuda",
        use_flex=not args.no_flex, plot_suffix=suffix, dropout_p=args.dropout, fused_qkv=args.fused_qkv,
        group=args.gqa, window=args.window,
    )


if __name__ == "__main__":
    main()
