"""Compiles the kernels' GPU configurations for Hopper (sm90) and Ampere (sm80) on any
machine, GPU or not, and reports what the GPU would run: registers, spills, shared memory,
pipelined copies.

    python tests/codegen.py                  # JSON, one entry per case (tests/test_codegen.py reads it)
    python tests/codegen.py --dropout-cost   # instructions a score that attention dropout adds

Run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions with Python).
Uses triton.compile with an explicit target and the ptxas that ships with Triton, so the
checks run in CI on CPU-only machines.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The modules, not the functions of the same names that kernels/__init__.py exports.
attention, cross_entropy, decode_attention, ffn, layer_norm, sampling = (
    importlib.import_module(f"kernels.{name}")
    for name in ("attention", "cross_entropy", "decode_attention", "ffn", "layer_norm", "sampling")
)

ARCHS = (90, 80)


def ptxas(arch: int) -> str:
    """The ptxas Triton itself assembles `arch` with: Triton 3.9 emits PTX 9.x for sm90,
    which only its CUDA 13 ptxas (`ptxas-blackwell`) reads."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def compile_case(arch: int, kernel, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = (),
                 unaligned: tuple[str, ...] = (), num_warps: int = 4, num_stages: int = 3,
                 descriptors: dict[str, str] | None = None, sass: bool = False) -> dict:
    """Compiles `kernel` with every pointer and integer 16-aligned except `unaligned`;
    integer arguments given in `constexprs` (strides of 1) are specialised like Triton does;
    `descriptors` maps TMA descriptor arguments to their types, e.g. "tensordesc<bf16[128, 64]>".
    sass: also count the machine instructions (Triton's nvdisasm)."""
    names = kernel.arg_names
    descriptors = descriptors or {}
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in descriptors:
            signature[name] = descriptors[name]
            continue
        signature[name] = f"*{pointers[name]}" if name in pointers else "fp32" if name in floats else "i32"
        if signature[name] != "fp32" and name not in unaligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(ptx)
        cubin = os.path.join(tmp, "k.cubin") if sass else os.devnull
        info = subprocess.run([ptxas(arch), f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", f.name, "-o", cubin],
                              capture_output=True, text=True, check=True).stderr
        if sass:
            nvdisasm = os.path.join(os.path.dirname(ptxas(arch)), "nvdisasm")
            listing = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    extra = {"instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/ ", listing, re.M))} if sass else {}
    return extra | {
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        "shared": compiled.metadata.shared,
        "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        # Index tensors multiplied in int32 (a stride times an index can pass 2^31).
        "i32_index_muls": len(re.findall(r"arith\.muli .* : tensor<[0-9x]+xi32>", compiled.asm["ttir"])),
        "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        # Philox's rounds (attention dropout, sampling): two 32-bit mul.hi each, ten a call.
        "mul_hi": len(re.findall(r"mul\.hi\.u32", ptx)),
        # The FFN's approximate-tanh GELU candidate: MUFU.TANH through inline PTX.
        "tanh_approx": len(re.findall(r"tanh\.approx\.f32", ptx)),
        # Warp specialisation adds warp groups and moves registers between them.
        "threads": int(re.search(r"\.reqntid (\d+)", ptx).group(1)),
        "setmaxnreg": len(re.findall(r"setmaxnreg", ptx)),
        "num_warps": num_warps,
        "arch": arch,
    }


def layer_norm_cases(arch: int) -> dict[str, dict]:
    cases = {}
    for N in (768, 2048, 4096, 8192):
        cfg = layer_norm._settings(N, 2)
        ptrs = {n: "bf16" for n in ("X", "R", "S", "Y", "W", "B", "DY", "DS", "DX")} | {
            n: "fp32" for n in ("Mean", "Rstd", "DW", "DB")}
        fwd = dict(BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.block_n, HAS_BIAS=True, HAS_RESIDUAL=True, SHIFT=False)
        cases[f"layer_norm fwd N={N}"] = compile_case(
            arch, layer_norm._layer_norm_fwd_kernel, ptrs, fwd | dict(STAGES=0),
            floats=("eps",), unaligned=("M",), num_warps=cfg.fwd_warps)
        # The persistent forward, a sweep candidate (bench_layer_norm --sweep), 2 stages;
        # Hopper only, as in the launcher.
        if arch == 90:
            cases[f"layer_norm persistent fwd N={N}"] = compile_case(
                arch, layer_norm._layer_norm_fwd_kernel, ptrs, fwd | dict(STAGES=2),
                floats=("eps",), unaligned=("M",), num_warps=cfg.fwd_warps)
        # Liger's forward tile, a sweep candidate: one row a program, 8 elements a thread.
        cases[f"layer_norm fwd one-row N={N}"] = compile_case(
            arch, layer_norm._layer_norm_fwd_kernel, ptrs, fwd | dict(BLOCK_M=1, STAGES=0),
            floats=("eps",), unaligned=("M",), num_warps=max(1, min(32, cfg.block_n // 256)))
        for dsum in (False, True):
            cases[f"layer_norm bwd N={N} dsum={dsum}"] = compile_case(
                arch, layer_norm._layer_norm_bwd_kernel, ptrs,
                dict(BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.block_n, HAS_BIAS=True, HAS_DSUM=dsum, STAGES=cfg.bwd_stages),
                unaligned=("M", "rows_per_program"), num_warps=cfg.bwd_warps)
    return cases


def attention_cases(arch: int) -> dict[str, dict]:
    cases = {}
    ptrs = {n: "bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")} | {"LSE": "fp32", "DELTA": "fp32"}
    unaligned = ("H", "Tq", "Tk", "window")
    for D in (16, 32, 64, 128):
        cfg = attention._CONFIGS[(arch // 10, D)]
        common = dict(HEAD_DIM=D, CAUSAL=True, PRECISION=None, SPLIT_GRID=False, DROPOUT=False, GROUP=1, WINDOW=False)
        for name, kernel, launch, extra in (
            ("fwd", attention._attn_fwd_kernel, cfg.fwd, dict(NEGATIVE_SCALE=False, TMA=False)),
            ("bwd dkdv", attention._attn_bwd_dkdv_kernel, cfg.dkdv, dict(TMA=False, KV_SPLITS=1)),
            ("bwd dq", attention._attn_bwd_dq_kernel, cfg.dq, dict(TMA=False)),
        ):
            # As launched; with the grid for B * H past CUDA's 65535 programs on axis 1;
            # with attention dropout (training with --dropout), on its own tiles.
            dropped = getattr(attention._dropout_settings(cfg, D, arch == 90), name.split()[-1])
            # ... and grouped-query attention (4 query heads a key/value head), whose dK/dV
            # loops over the group's heads (the others only index K and V by the group).
            grouped = {dropout: getattr(attention._settings(D, torch.bfloat16, (arch // 10, 0), dropout, grouped=True),
                                        name.split()[-1]) for dropout in (False, True)}
            # ... and under a sliding window, with and without dropout, on its own tiles.
            windowed = {dropout: getattr(attention._settings(D, torch.bfloat16, (arch // 10, 0), dropout, window=True),
                                         name.split()[-1]) for dropout in (False, True)}
            for variant, tiles, changed in (
                ("", launch, {}), (" split grid", launch, dict(SPLIT_GRID=True)), (" dropout", dropped, dict(DROPOUT=True)),
                (" window", windowed[False], dict(WINDOW=True)),
                (" window dropout", windowed[True], dict(WINDOW=True, DROPOUT=True)),
            ) + (((" gqa", grouped[False], dict(GROUP=4)), (" gqa dropout", grouped[True], dict(GROUP=4, DROPOUT=True)))
                 if name == "bwd dkdv" else ()):
                cases[f"attention {name} D={D}{variant}"] = compile_case(
                    arch, kernel, ptrs, common | extra | dict(BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N) | changed,
                    floats=("scale", "qk_scale", "dropout_p"), unaligned=unaligned,
                    num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        if arch == 90 and D >= 64:  # the TMA candidates, Hopper's (bench_attention --sweep)
            for name, kernel, launch, loop_tiles in (
                ("fwd", attention._attn_fwd_kernel, cfg.fwd, {"Q": "M", "K": "N", "V": "N"}),
                ("bwd dkdv", attention._attn_bwd_dkdv_kernel, cfg.dkdv, {"Q": "M", "DO": "M"}),
                ("bwd dq", attention._attn_bwd_dq_kernel, cfg.dq, {"K": "N", "V": "N"}),
            ):
                blocks = dict(BLOCK_M=launch.BLOCK_M, BLOCK_N=launch.BLOCK_N)
                extra = dict(NEGATIVE_SCALE=False) if name == "fwd" else dict(KV_SPLITS=1) if name == "bwd dkdv" else {}
                cases[f"attention {name} tma D={D}"] = compile_case(
                    arch, kernel, ptrs, common | extra | blocks | dict(TMA=True),
                    floats=("scale", "qk_scale", "dropout_p"), unaligned=unaligned, num_warps=launch.num_warps,
                    num_stages=launch.num_stages,
                    descriptors={n: f"tensordesc<bf16[1, 1, {blocks['BLOCK_' + b]}, {D}]>" for n, b in loop_tiles.items()})
            # The TMA dQ as launched with dropout (D = 128).
            dq = attention._dropout_settings(cfg, D, True).dq
            if dq.tma:
                cases[f"attention bwd dq tma D={D} dropout"] = compile_case(
                    arch, attention._attn_bwd_dq_kernel, ptrs,
                    common | dict(BLOCK_M=dq.BLOCK_M, BLOCK_N=dq.BLOCK_N, TMA=True, DROPOUT=True),
                    floats=("scale", "qk_scale", "dropout_p"), unaligned=unaligned, num_warps=dq.num_warps,
                    num_stages=dq.num_stages, descriptors={n: f"tensordesc<bf16[1, 1, {dq.BLOCK_N}, {D}]>" for n in "KV"})
    return cases


def ffn_cases(arch: int) -> dict[str, dict]:
    """The six products of a GPT-2 (C = 768) layer's FFN, forward and backward, with the
    strides they run with (nn.Linear weights, transposed views), and two decode products."""
    C, H = 768, 3072
    row = lambda n: (n, 1)  # (stride along the row index, along the column index)
    col = lambda n: (1, n)
    products = {  # name: (kind, epilogue, a strides, b strides, out width)
        "fwd fc+gelu": (ffn._EPILOGUE, ffn._GELU, row(C), col(C), H),
        "fwd proj": (ffn._PLAIN, ffn._NONE, row(H), col(H), C),
        "bwd dpre (gelu grad)": (ffn._EPILOGUE, ffn._GELU_GRAD, row(C), row(H), H),
        "bwd dWproj": (ffn._WEIGHT_GRAD, ffn._NONE, col(C), row(H), H),
        "bwd dWfc": (ffn._WEIGHT_GRAD, ffn._NONE, col(H), row(C), C),
        "bwd dx": (ffn._PLAIN, ffn._NONE, row(H), row(C), C),
        "decode fc+gelu": (ffn._FEW_ROWS, ffn._GELU, row(C), col(C), H),
        "decode proj": (ffn._FEW_ROWS, ffn._NONE, row(H), col(H), C),
    }
    ptrs = {n: "bf16" for n in ("A", "B", "Out", "Bias", "Aux")} | {"ColSum": "fp32"}
    cases = {}
    for name, (kind, epilogue, (am, ak), (bk, bn), width) in products.items():
        t = ffn._TILES[(arch // 10, kind)]
        strides = dict(stride_am=am, stride_ak=ak, stride_bk=bk, stride_bn=bn, stride_om=width,
                       stride_on=1, stride_xm=width, stride_xn=1)
        constexprs = {k: 1 for k, v in strides.items() if v == 1} | dict(
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
            HAS_BIAS=name.startswith(("fwd", "decode")), EPILOGUE=epilogue, STORE_PRE=name == "fwd fc+gelu",
            COL_SUM=epilogue == ffn._GELU_GRAD, PRECISION=None, SPLIT_K=False, APPROX_GELU=False)
        cases[f"ffn {name}"] = compile_case(
            arch, ffn._matmul_kernel, ptrs, constexprs, num_warps=t.num_warps, num_stages=t.num_stages)
        if kind == ffn._WEIGHT_GRAD:  # the split-K sweep candidate, on the same tiles
            cases[f"ffn {name} split K"] = compile_case(
                arch, ffn._matmul_kernel, ptrs | {"Out": "fp32"}, constexprs | dict(SPLIT_K=True),
                num_warps=t.num_warps, num_stages=t.num_stages)
        if arch == 90 and kind != ffn._FEW_ROWS:
            cases[f"ffn tma {name}"] = _ffn_tma_case(ffn._TMA_TILES[kind], epilogue, name, ak == 1, bn == 1)
            if kind == ffn._WEIGHT_GRAD:  # cut along K (GPT-2 small): fp32 slices staged for the store
                cases[f"ffn tma {name} split K"] = _ffn_tma_case(
                    ffn._TMA_TILES[kind], epilogue, name, ak == 1, bn == 1, out="fp32")
            if epilogue != ffn._NONE:  # the approximate-tanh GELU candidate
                cases[f"ffn tma {name} approx GELU"] = _ffn_tma_case(
                    ffn._TMA_TILES[kind], epilogue, name, ak == 1, bn == 1, approx_gelu=True)
            # The warp-specialised candidate; the launcher gives it dpre only without the
            # column sums (no fc bias), as the specialisation cannot sum across its consumers.
            ws_tiles = ffn._specialised(ffn._WS_TILES[kind], epilogue, col_sums=False)
            cases[f"ffn ws {name}"] = _ffn_ws_case(ws_tiles, epilogue, name, ak == 1, bn == 1)
    for kind in (ffn._WEIGHT_GRAD, ffn._PLAIN):  # the split products' tiles, 128 wide and 256 on Hopper
        t = ffn._TMA_TILES[kind] if arch == 90 else ffn._TILES[(arch // 10, kind)]
        cases[f"ffn sum K slices {t.block_m}x{t.block_n}"] = compile_case(
            arch, ffn._sum_slices_kernel, {"Part": "fp32", "Out": "bf16"},
            dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, GROUP_M=t.group_m, ROWS=min(t.block_m, ffn._SUM_ROWS)))
    return cases


def _ffn_ws_case(t, epilogue: int, name: str, a_rows_first: bool, b_k_first: bool) -> dict:
    """An FFN product on the warp-specialised TMA kernel for sm90; weight gradients with the
    fp32 output of a split K."""
    constexprs = dict(
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
        A_ROWS_FIRST=a_rows_first, B_K_FIRST=b_k_first, HAS_BIAS=name.startswith("fwd"), EPILOGUE=epilogue,
        STORE_PRE=name == "fwd fc+gelu", COL_SUM=False, PRECISION=None, APPROX_GELU=False)
    out = "fp32" if "dW" in name else "bf16"
    pointers = {"A": "bf16", "B": "bf16", "Out": out, "Aux": "bf16", "Bias": "bf16", "ColSum": "fp32"}
    return compile_case(90, ffn._matmul_ws_kernel, pointers, constexprs, num_warps=t.num_warps,
                        num_stages=t.num_stages)


def _ffn_tma_case(t, epilogue: int, name: str, a_rows_first: bool, b_k_first: bool, out: str = "bf16",
                  approx_gelu: bool = False) -> dict:
    """An FFN product on the TMA kernel for sm90, its descriptors' tiles in storage order,
    its output of dtype `out`."""
    halves = t.block_n >= 256
    width = t.block_n // (1 + halves)
    a_block = [t.block_m, t.block_k] if a_rows_first else [t.block_k, t.block_m]
    b_block = [t.block_k, t.block_n] if b_k_first else [t.block_n, t.block_k]
    descriptors = {"DescA": f"tensordesc<bf16{a_block}>", "DescB": f"tensordesc<bf16{b_block}>",
                   "DescOut": f"tensordesc<{out}{[t.block_m, width]}>",
                   "DescAux": f"tensordesc<bf16{[t.block_m, width]}>"}
    constexprs = dict(
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
        A_ROWS_FIRST=a_rows_first, B_K_FIRST=b_k_first, HAS_BIAS=name.startswith("fwd"), EPILOGUE=epilogue,
        STORE_PRE=name == "fwd fc+gelu", COL_SUM=epilogue == ffn._GELU_GRAD, PRECISION=None, HALVES=halves,
        APPROX_GELU=approx_gelu)
    return compile_case(90, ffn._matmul_tma_kernel, {"Bias": "bf16", "ColSum": "fp32"}, constexprs,
                        num_warps=t.num_warps, num_stages=t.num_stages, descriptors=descriptors)


def decode_attention_cases(arch: int) -> dict[str, dict]:
    """The decode-attention kernel over a contiguous cache (unit strides along D), with as
    many splits as a batch-1 GPT-2 step on a 132-SM GPU gets; and at D = 64 with any
    strides along D (only the launcher's own output contiguous), where the index
    arithmetic is not folded away."""
    ptrs = {n: "bf16" for n in ("Q", "K", "V", "K_NEW", "V_NEW", "O")} | {
        "SEQ_LENS": "i64", "M": "fp32", "L": "fp32", "ACC": "fp32", "COUNTERS": "i32"}
    unit = {n: 1 for n in ("stride_qd", "stride_kd", "stride_vd", "stride_knd", "stride_vnd", "stride_od")}
    cases = {}
    # ... and grouped-query (4 query heads a cache head) at D = 128.
    for D, strides, variant, group in ((64, unit, "", 1), (128, unit, "", 1), (64, dict(stride_od=1), " strided", 1),
                                       (128, unit, " gqa", 4)):
        block_n = max(16, min(128, 4096 // D))  # as decode_attention._settings on a GPU
        cases[f"decode_attention D={D}{variant}"] = compile_case(
            arch, decode_attention._decode_attention_kernel, ptrs,
            strides | dict(HEAD_DIM=D, BLOCK_N=block_n, HAS_NEW=True, STAGES=decode_attention._STAGES, SPLITS_P2=64,
                           GROUP=group),
            floats=("qk_scale",), unaligned=("H", "S", "chunk"), num_warps=4)
    return cases


def sampling_cases(arch: int) -> dict[str, dict]:
    """Top-k sampling's kernels over bf16 logits with a unit stride along the vocabulary,
    GPT-2's vocabulary cut into chunks; the chunk kernels also with any stride along it
    (a transposed view), where the index arithmetic is not folded away."""
    s = sampling
    P2 = triton.next_power_of_2(-(-50257 // s.CHUNK))
    ptrs = {"LOGITS": "bf16", "OUT": "i64", "SEED": "i64", "OFFSETS": "i64", "KEYS": "i32", "INDEX": "i32",
            "STATS_MAX": "fp32", "STATS_SUM": "fp32", "STATS_N": "i32", "COUNTS": "i32", "BEST": "fp32",
            "BEST_INDEX": "i32", "CHUNK_MAX": "fp32"}
    chunked = dict(stride_lv=1, CHUNK=s.CHUNK)
    windows = dict(P2=P2, WINDOWS=s.WINDOWS)
    kernels = {
        "stats": (s._stats_kernel, chunked, s.NUM_WARPS),
        "window counts": (s._window_counts_kernel, chunked | windows, s.NUM_WARPS),
        "compact": (s._compact_kernel, chunked | windows, s.NUM_WARPS),
        "draw": (s._draw_kernel, windows | dict(CANDIDATES=s.CANDIDATES), s.DRAW_WARPS),
        "gumbel chunks": (s._gumbel_chunks_kernel, chunked, s.NUM_WARPS),
        "pick best": (s._pick_best_kernel, dict(P2=P2), 1),
    }
    kernels |= {f"{name} strided": (kernels[name][0], {k: v for k, v in kernels[name][1].items() if k != "stride_lv"},
                                     s.NUM_WARPS) for name in ("stats", "window counts", "compact")}
    return {
        f"sample {name}": compile_case(arch, kernel, ptrs, constexprs, floats=("inv_temperature",),
                                       unaligned=("V", "top_k", "stride_lb", "P", "stride_lv"), num_warps=warps)
        for name, (kernel, constexprs, warps) in kernels.items()
    }


def cross_entropy_cases(arch: int) -> dict[str, dict]:
    """The fused loss's row kernel over GPT-2's vocabulary in bf16 and fp32, with and
    without the gradient pass, on the launcher's block and warps."""
    block_v = min(cross_entropy._MAX_BLOCK_V, triton.next_power_of_2(50304))
    return {
        f"cross_entropy {dtype} grad={grad}": compile_case(
            arch, cross_entropy._cross_entropy_kernel, {"logits_ptr": dtype, "targets_ptr": "i64", "loss_ptr": "fp32"},
            dict(BLOCK_V=block_v, HAS_GRAD=grad), unaligned=("stride_row", "V", "ignore_index"),
            num_warps=max(1, min(16, block_v // 128)))
        for dtype in ("bf16", "fp32") for grad in (True, False)
    }


def dropout_cost(arch: int) -> None:
    """Prints the machine instructions a score that attention dropout adds to each kernel:
    built with and without it on the table's tiles, the difference over the scores a
    thread holds in one iteration of each of the kernel's two loops (masked, unmasked)."""
    ptrs = {n: "bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")} | {"LSE": "fp32", "DELTA": "fp32"}
    for D in (16, 32, 64, 128):
        cfg = attention._CONFIGS[(arch // 10, D)]
        for name, kernel, t, extra in (
            ("fwd", attention._attn_fwd_kernel, cfg.fwd, dict(NEGATIVE_SCALE=False)),
            ("bwd dkdv", attention._attn_bwd_dkdv_kernel, cfg.dkdv, dict(KV_SPLITS=1)),
            ("bwd dq", attention._attn_bwd_dq_kernel, cfg.dq, {}),
        ):
            count = {dropout: compile_case(
                arch, kernel, ptrs, dict(HEAD_DIM=D, CAUSAL=True, PRECISION=None, SPLIT_GRID=False, TMA=False,
                                         BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, DROPOUT=dropout, GROUP=1,
                                         WINDOW=False) | extra,
                floats=("scale", "qk_scale", "dropout_p"), unaligned=("H", "Tq", "Tk"), num_warps=t.num_warps,
                num_stages=t.num_stages, sass=True)["instructions"] for dropout in (False, True)}
            scores = t.BLOCK_M * t.BLOCK_N / (32 * t.num_warps)
            print(f"sm{arch} attention {name} D={D}: {(count[True] - count[False]) / 2 / scores:.1f} instructions a score")


def main() -> None:
    if sys.argv[1:] == ["--dropout-cost"]:
        for arch in ARCHS:
            dropout_cost(arch)
        return
    cases = {}
    for arch in ARCHS:
        for group in (layer_norm_cases, attention_cases, ffn_cases, decode_attention_cases, sampling_cases,
                      cross_entropy_cases):
            cases |= {f"sm{arch} {name}": case for name, case in group(arch).items()}
    json.dump(cases, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
