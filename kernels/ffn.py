"""The GPT feed-forward block in Triton, forward and backward.

    ffn(x, fc_weight, fc_bias, proj_weight, proj_bias)
        == F.linear(gelu_tanh(F.linear(x, fc_weight, fc_bias)), proj_weight, proj_bias)

One tiled matmul kernel, out = A @ B with arbitrary strides (transposed weights and
activations are views, never copies), computes all six products. Constexpr epilogues fuse
what eager PyTorch runs as separate passes over the M x 4C hidden tensor:

  forward   h    = gelu(x @ Wfc^T + bfc)        bias + GELU in registers (pre-activation
                                                 stored beside h when a backward will follow)
            y    = h @ Wproj^T + bproj
  backward  dpre = (dy @ Wproj) * gelu'(pre)     GELU derivative in the epilogue, which
            dbfc = sum dpre                     also sums each tile's columns
            dWproj = dy^T @ h,  dWfc = dpre^T @ x
            dx   = dpre @ Wfc
            dbproj = sum dy                     torch, in fp32: one read of dy

The residual add stays out of y's epilogue: the model (gpt/model.py) hands y to the next
add_layer_norm, which adds it to the residual stream in the pass that normalises the sum,
so the stream is read once per block boundary; adding it here too would read it twice.

The main loop is the same plain loop in every kernel: bias gradients come from the
epilogue (dbfc) or from torch (dbproj), never from extra work inside the loop, which in
earlier versions made the weight-gradient kernels' first column of programs the slowest.

On Hopper a second kernel, _matmul_tma_kernel, moves every tile with TMA descriptors on a
persistent schedule and cuts the K of products whose output tiles are too few to fill the
SMs; with its tiles (_TMA_TILES) it is Hopper's default for 16-bit inputs since run 5
(H200: 0.89-0.95x cuBLAS forward against the pointer kernel's 0.69-0.73x, fwd+bwd
0.83-0.86x against 0.74-0.77x). _matmul_ws_kernel, a candidate (_WS_TILES), runs the same
work warp-specialised: a producer warp group loads while two consumer groups multiply and
run the epilogue. A product cut along K stores fp32 slices that _sum_slices_kernel adds
and rounds into the output in one pass. Cutting every tile (the default) evens out the
rounds at the cost of fp32 slices for the whole output; the tail split (`tail_split`, a
candidate, _split_plan) runs the tiles of the whole rounds uncut and cuts only the last
round's few. Another candidate, `approx_gelu`, runs the GELU epilogues of 16-bit
products on the hardware's approximate tanh (half the forward GELU's instructions).

Saving the pre-activation costs one M x 4C write in the forward and one read in the
backward; recomputing it (recompute_pre=True) costs a seventh matmul instead. bench_ffn
times both; saving is the default (see bench/RESULTS.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels._utils import (
    cdiv, check_inputs, device_capability, interpreting, on_input_device, refuse_double_backward, sm_count,
    with_device_scratch,
)

_OP = "ffn"
_REFERENCE = "kernels.reference.ffn"

# Epilogues
_NONE, _GELU, _GELU_GRAD = 0, 1, 2
_SQRT_2_OVER_PI = 0.7978845608028654


# The interpreter cannot run inline PTX: there _tanh_approx computes tanh exactly.
_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def _tanh_approx(x):
    # One MUFU.TANH (PTX tanh.approx.f32, sm75+), relative error ~2^-11: below the rounding
    # of the 16-bit outputs it is used for, where sigmoid costs an exp and a division.
    if _INTERPRETING:
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gelu(x, APPROX: tl.constexpr):
    # gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u): one sigmoid, no tanh
    # (libdevice tanh fails in the interpreter); APPROX: the hardware's approximate tanh.
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if APPROX:
        half_x = 0.5 * x
        return half_x + half_x * _tanh_approx(u)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def _gelu_grad(x, APPROX: tl.constexpr):
    """d gelu_tanh / dx, at the rounded pre-activation the forward stored, as autograd would use."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    if APPROX:
        t = _tanh_approx(u)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    s = tl.sigmoid(2.0 * u)
    return s + x * s * (1.0 - s) * 2.0 * du


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row tiles sweep the columns together, so the B tiles they
    # share are still in L2 when the next row tile needs them.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (tile // pids_per_group) * GROUP_M
    group_size = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % pids_per_group) % group_size
    pid_n = (tile % pids_per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _tile_product(A, B, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n, k_first, k_steps,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) fp32 tile (pid_m, pid_n) of A @ B over the K steps
    [k_first, k_first + k_steps); steps past K add zeros."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Wrapped indices stay in bounds; the rows and columns they duplicate are never stored,
    # and only K is masked, so the common loads are unpredicated.
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_first, k_first + k_steps):
        kk = k * BLOCK_K + rk
        k_ok = kk < K
        # int64: in the weight gradients K is the token count and stride_ak/bk a row of the
        # M x 4C hidden, so kk * stride passes 2^31 past ~700k tokens at C = 768.
        kk = kk.to(tl.int64)
        a = tl.load(A + am[:, None] * stride_am + kk[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
        b = tl.load(B + kk[:, None] * stride_bk + bn[None, :] * stride_bn, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _epilogue(acc, pid_m, pid_n, Out, Bias, Aux, ColSum, M, N,
              stride_om, stride_on, stride_xm, stride_xn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, COL_SUM: tl.constexpr,
              APPROX_GELU: tl.constexpr):
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    om = rm.to(tl.int64)[:, None]
    on = rn.to(tl.int64)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:
        if STORE_PRE:
            tl.store(Aux + om * stride_xm + on * stride_xn, acc.to(Aux.dtype.element_ty), mask=mask)
        acc = _gelu(acc, APPROX_GELU)
    if EPILOGUE == 2:
        pre = tl.load(Aux + om * stride_xm + on * stride_xn, mask=mask, other=0.0).to(tl.float32)
        acc = acc * _gelu_grad(pre, APPROX_GELU)
    if COL_SUM:
        # Wrapped rows repeat real ones: they must not count twice.
        sums = tl.sum(tl.where((rm < M)[:, None], acc, 0.0), axis=0)
        tl.store(ColSum + pid_m.to(tl.int64) * N + rn, sums, mask=rn < N)
    tl.store(Out + om * stride_om + on * stride_on, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(
    A, B, Out, Bias, Aux, ColSum,
    M, N, K, splits,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_xm, stride_xn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, COL_SUM: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT_K: tl.constexpr, APPROX_GELU: tl.constexpr,
):
    """Out = epilogue(A @ B + Bias), one output tile (of one K slice) per program; A (M, K),
    B (K, N), any strides; fp32 accumulation.

    EPILOGUE 1: Out = gelu(pre), and Aux = pre when STORE_PRE.  EPILOGUE 2: Out = (A @ B) *
    gelu'(Aux).  COL_SUM: ColSum (cdiv(M, BLOCK_M), N) fp32 = Out's columns summed over
    each row tile (before rounding to Out's dtype). SPLIT_K (no bias, no epilogue): Out
    is (splits, M, N) fp32 and slice s of K adds its partial product at Out[s] (see _k_splits).
    """
    if SPLIT_K:  # constexpr, so that unsplit products compile exactly as before
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        unit = tl.program_id(0)
        pid_m, pid_n = _tile_coords(unit % tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), splits)
        k_first = (unit // tiles) * k_steps
        Out += (unit // tiles).to(tl.int64) * M * N
    else:
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        k_first = 0
        k_steps = tl.cdiv(K, BLOCK_K)
    acc = _tile_product(A, B, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                        k_first, k_steps, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    _epilogue(acc, pid_m, pid_n, Out, Bias, Aux, ColSum, M, N, stride_om, stride_on, stride_xm, stride_xn,
              BLOCK_M, BLOCK_N, HAS_BIAS, EPILOGUE, STORE_PRE, COL_SUM, APPROX_GELU)


@triton.jit
def _matmul_tma_kernel(
    DescA, DescB, DescOut, DescAux, Bias, ColSum,
    M, N, K, num_programs, first_tile, tile_count, splits, split_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_ROWS_FIRST: tl.constexpr, B_K_FIRST: tl.constexpr,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, COL_SUM: tl.constexpr,
    PRECISION: tl.constexpr, HALVES: tl.constexpr, APPROX_GELU: tl.constexpr,
):
    """_matmul_kernel with every tile moved by the TMA engine (host tensor descriptors)
    instead of the threads -- one instruction a tile, no per-element addresses in
    registers, and zero fill past every edge for loads (clipping for stores), so neither
    M, N nor K needs a mask or a wrap -- on a persistent schedule: num_programs programs
    each walk units num_programs apart, the tile loop flattened into the K loop (the
    Triton persistent-matmul tutorial's schedule), so that the next tile's first loads
    run during this tile's epilogue.

    A_ROWS_FIRST: DescA holds A as stored, (M, K) row-major; else A^T, (K, M) row-major, a
    tile of which is read and transposed in shared memory (dW = dy^T @ h). B_K_FIRST: DescB
    holds B, (K, N) row-major; else B^T (N, K), an nn.Linear weight as stored. DescOut
    and DescAux are (M, N) in (BLOCK_M, BLOCK_N) tiles, half as wide with HALVES (the
    epilogue in two halves); DescAux holds the pre-activation (EPILOGUE 1 with STORE_PRE
    writes it, EPILOGUE 2 reads it).

    splits > 1 (products without bias or epilogue): K is cut into that many slices, each
    a unit of work that stores an fp32 partial tile in DescOut, (splits * split_rows, N)
    with slice s at rows [s * split_rows, s * split_rows + M) and split_rows a multiple of
    BLOCK_M (a 2-D stack: warp specialisation cannot split a 3-D tile); the caller sums
    them. For weight gradients whose few output tiles would leave SMs idle in the last
    round (GPT-2 small: 144 tiles on 132 SMs).

    A launch covers tile_count tiles from first_tile on (in the grouped order): with
    _split_plan's tail split, one launch takes the tiles of the whole rounds unsplit and a
    second cuts only the last round's few tiles.
    """
    _tma_units(DescA, DescB, DescOut, DescAux, Bias, ColSum, M, N, K, num_programs, first_tile, tile_count,
               splits, split_rows,
               BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, A_ROWS_FIRST, B_K_FIRST, HAS_BIAS, EPILOGUE, STORE_PRE, COL_SUM,
               PRECISION, HALVES, False, APPROX_GELU)


@triton.jit
def _matmul_ws_kernel(
    A, B, Out, Aux, Bias, ColSum,
    M, N, K, num_programs, first_tile, tile_count, splits, split_rows, out_rows, stride_a, stride_b, stride_aux,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_ROWS_FIRST: tl.constexpr, B_K_FIRST: tl.constexpr,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, COL_SUM: tl.constexpr,
    PRECISION: tl.constexpr, APPROX_GELU: tl.constexpr,
):
    """_matmul_tma_kernel warp-specialised (Triton's automatic warp specialisation on
    Hopper): a producer warp group issues the TMA loads while consumer warp groups run the
    MMAs and the epilogue, so loads for the next tile never wait on this tile's epilogue,
    the schedule cuBLAS's Hopper kernels use.

    Triton (3.6, 3.7) specialises no loop that reads host descriptors, so these are built
    on the device: A (A_ROWS_FIRST: (M, K) with row stride stride_a, else (K, M)), B
    (B_K_FIRST: (K, N), else (N, K)), Out (out_rows, N) contiguous, and Aux (M, N) with
    row stride stride_aux. out_rows is M, or splits * split_rows when split; it comes from
    the host because a select between the two here stops the specialisation, as do a
    reduction across the tile's rows (COL_SUM: each consumer holds some of the rows), a
    tile split in halves (the TMA kernel's HALVES) and a 3-D descriptor; 8 warps are not
    specialised.
    """
    if A_ROWS_FIRST:
        desc_a = tl.make_tensor_descriptor(A, [M, K], [stride_a, 1], [BLOCK_M, BLOCK_K])
    else:
        desc_a = tl.make_tensor_descriptor(A, [K, M], [stride_a, 1], [BLOCK_K, BLOCK_M])
    if B_K_FIRST:
        desc_b = tl.make_tensor_descriptor(B, [K, N], [stride_b, 1], [BLOCK_K, BLOCK_N])
    else:
        desc_b = tl.make_tensor_descriptor(B, [N, K], [stride_b, 1], [BLOCK_N, BLOCK_K])
    desc_out = tl.make_tensor_descriptor(Out, [out_rows, N], [N, 1], [BLOCK_M, BLOCK_N])
    desc_aux = tl.make_tensor_descriptor(Aux, [M, N], [stride_aux, 1], [BLOCK_M, BLOCK_N])
    _tma_units(desc_a, desc_b, desc_out, desc_aux, Bias, ColSum, M, N, K, num_programs, first_tile, tile_count,
               splits, split_rows,
               BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, A_ROWS_FIRST, B_K_FIRST, HAS_BIAS, EPILOGUE, STORE_PRE, COL_SUM,
               PRECISION, False, True, APPROX_GELU)


@triton.jit
def _tma_units(
    DescA, DescB, DescOut, DescAux, Bias, ColSum, M, N, K, num_programs, first_tile, tile_count, splits, split_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_ROWS_FIRST: tl.constexpr, B_K_FIRST: tl.constexpr,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, COL_SUM: tl.constexpr,
    PRECISION: tl.constexpr, HALVES: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, APPROX_GELU: tl.constexpr,
):
    """The work of _matmul_tma_kernel and _matmul_ws_kernel, given their descriptors."""
    # Every slice walks the same number of K steps, so the flattened loop keeps a fixed trip
    # count; steps past K read zero fill.
    k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), splits)
    start = tl.program_id(0)
    # The epilogue's own unit counter, so that it does not depend on the prologue's.
    unit_out = start - num_programs
    # Units run slice-major: the programs running side by side share a K slice and,
    # through the grouped tile order, the operand tiles in L2.
    # Warp specialisation needs the tile loop unflattened (Triton 3.6, Hopper).
    for unit in tl.range(start, tile_count * splits, num_programs, flatten=not WARP_SPECIALIZE,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(first_tile + unit % tile_count, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        k_first = (unit // tile_count) * k_steps
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_steps):
            off_k = (k_first + k) * BLOCK_K
            if A_ROWS_FIRST:
                a = DescA.load([off_m, off_k])
            else:
                a = DescA.load([off_k, off_m]).T
            if B_K_FIRST:
                b = DescB.load([off_k, off_n])
            else:
                b = DescB.load([off_n, off_k]).T
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

        unit_out += num_programs
        pid_m, pid_n = _tile_coords(first_tile + unit_out % tile_count, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        first_row = (unit_out // tile_count) * split_rows  # of this unit's K slice in DescOut
        if HALVES:
            # The epilogue a half-width tile at a time: half the staging buffers in shared
            # memory (at 128 x 256 they would not fit beside three pipeline stages) and half
            # the GELU's temporaries in registers.
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _tma_epilogue(left, first_row, pid_m, pid_n * BLOCK_N, DescOut, DescAux, Bias, ColSum, M, N,
                          BLOCK_M, BLOCK_N // 2, HAS_BIAS, EPILOGUE, STORE_PRE, COL_SUM, APPROX_GELU)
            _tma_epilogue(right, first_row, pid_m, pid_n * BLOCK_N + BLOCK_N // 2, DescOut, DescAux, Bias,
                          ColSum, M, N, BLOCK_M, BLOCK_N // 2, HAS_BIAS, EPILOGUE, STORE_PRE, COL_SUM, APPROX_GELU)
        else:
            _tma_epilogue(acc, first_row, pid_m, pid_n * BLOCK_N, DescOut, DescAux, Bias, ColSum, M, N,
                          BLOCK_M, BLOCK_N, HAS_BIAS, EPILOGUE, STORE_PRE, COL_SUM, APPROX_GELU)


@triton.jit
def _tma_epilogue(acc, out_first_row, pid_m, out_n, DescOut, DescAux, Bias, ColSum, M, N,
                  BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
                  HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, COL_SUM: tl.constexpr,
                  APPROX_GELU: tl.constexpr):
    """_epilogue for _matmul_tma_kernel: the (BLOCK_M, WIDTH) tile at row tile pid_m and
    column out_n, its pre-activation and output moved by TMA (stores clipped at M and N),
    the output at rows from out_first_row (its K slice's)."""
    out_m = pid_m * BLOCK_M
    rn = out_n + tl.arange(0, WIDTH)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:
        if STORE_PRE:
            DescAux.store([out_m, out_n], acc.to(DescAux.dtype))
        acc = _gelu(acc, APPROX_GELU)
    if EPILOGUE == 2:
        acc = acc * _gelu_grad(DescAux.load([out_m, out_n]).to(tl.float32), APPROX_GELU)
    if COL_SUM:
        # Rows past M read zero fill, but a bias would not be zero there: mask them.
        rm = out_m + tl.arange(0, BLOCK_M)
        sums = tl.sum(tl.where((rm < M)[:, None], acc, 0.0), axis=0)
        tl.store(ColSum + pid_m.to(tl.int64) * N + rn, sums, mask=rn < N)
    DescOut.store([out_first_row + out_m, out_n], acc.to(DescOut.dtype))


@triton.jit
def _sum_slices_kernel(Part, Out, M, N, slice_size, splits, first_tile,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, ROWS: tl.constexpr):
    """A split product's output tile first_tile + program_id(0) (the matmul's tile order),
    ROWS of its rows a program (program_id(1)): the sum of its `splits` fp32 K slices,
    (M, N) each and slice_size elements apart in Part, rounded once into Out (M, N), both
    contiguous. One pass over the slices, where torch's sum then copy made three."""
    pid_m, pid_n = _tile_coords(first_tile + tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    part = Part + offs  # stepped a slice at a time: 64-bit addresses, whatever slice_size's type
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    # Pipelined: the next slices' loads are in flight while this one is added.
    for _ in tl.range(splits, num_stages=3):
        acc += tl.load(part, mask=mask, other=0.0)
        part += slice_size
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas's cap, e.g. 128 for two 8-warp programs per SM
    persistent: int = 0  # with tma: programs per SM (0: one)
    tma: bool = False  # operands through TMA descriptors, on a persistent schedule, any layout
    split_k: bool = False  # cut K where the output tiles alone would leave SMs idle (products without bias or epilogue)
    warp_specialize: bool = False  # with tma: a producer warp group loads, consumers multiply (Hopper, 4 warps)
    tail_split: bool = False  # with tma and split_k: cut only the last round's tiles (_split_plan)
    approx_gelu: bool = False  # 16-bit outputs: GELU and its gradient on the hardware's approximate tanh


# The kinds of product, which take different tiles.
_PLAIN, _EPILOGUE, _WEIGHT_GRAD, _FEW_ROWS = "plain", "epilogue", "weight_grad", "few_rows"
# Products with at most this many rows (a decode step's tokens) take _FEW_ROWS tiles.
_FEW_ROWS_MAX = 64

# 16-bit tile tables, keyed by (capability major, kind).
# Hopper: 128 x 256 tiles over two warpgroups (wgmma) with three stages of 64-deep K tiles,
# the Triton matmul tutorial's best H100 shape, for the plain matmuls (y, dx); the GELU
# epilogues hold a second fp32 tile and take 128 x 128, as do the weight gradients, whose
# outputs are small (C x 4C: 144 tiles of 128 x 128 at C = 768 on 132 SMs). On an H200
# (Triton 3.6) 128 x 256 weight-gradient kernels, then with the bias sums in their main
# loop, gave wrong results at C = 768 and 1024, so they stay at the shape verified there.
# sm8x: the tutorial's A100 shapes, 8 warps where the epilogue holds a second fp32 tile.
# Few rows (generation): the product streams the weights once, so the tiles are as short
# as tl.dot allows (16 rows) and narrow (16 columns), for enough programs to keep every SM
# loading -- 192 for the 3072-wide fc weight, 48 for the 768-wide proj -- with 256-deep K
# steps four stages deep (64 KiB in flight per program).
_TILES: dict[tuple[int, str], _Tiles] = {
    (9, _FEW_ROWS): _Tiles(16, 16, 256, 4, 4, 4),
    (8, _FEW_ROWS): _Tiles(16, 16, 256, 4, 4, 4),
    (9, _PLAIN): _Tiles(128, 256, 64, 8, 8, 3),
    (9, _EPILOGUE): _Tiles(128, 128, 64, 8, 8, 3),
    (9, _WEIGHT_GRAD): _Tiles(128, 128, 64, 8, 8, 3),
    (8, _PLAIN): _Tiles(128, 128, 32, 8, 4, 4),
    (8, _EPILOGUE): _Tiles(128, 128, 32, 8, 8, 3),
    (8, _WEIGHT_GRAD): _Tiles(128, 128, 32, 8, 4, 4),
}
# Hopper with TMA, the default for 16-bit inputs there (_tiles; the table above is the
# pointer kernel's, for products whose strides a descriptor cannot take): descriptors
# instead of per-thread address arithmetic, and the persistent schedule for every product,
# since TMA reads transposed operands as well as K-contiguous ones. 128 x 128 tiles keep
# four 32 KiB stages in shared memory beside the epilogue's staging, 128 x 256 three
# stages of 48 KiB. Run 5's sweep (H200, C = 768 and 1024): each alternative was slower
# somewhere (128 x 256 weight gradients: +6% fwd+bwd at 1024, -5% at 768).
_TMA_TILES: dict[str, _Tiles] = {
    _PLAIN: _Tiles(128, 256, 64, 8, 8, 3, tma=True, split_k=True),
    _EPILOGUE: _Tiles(128, 128, 64, 8, 8, 4, tma=True, split_k=True),
    _WEIGHT_GRAD: _Tiles(128, 128, 64, 8, 8, 4, tma=True, split_k=True),
}
# The TMA kernel warp-specialised (_matmul_ws_kernel), a sweep candidate: 4 warps make
# one consumer warp group, to which Triton adds a second and a producer (384 threads).
# The GELU epilogue's 128 x 256 tiles with a full-width epilogue fit three stages (213 KiB
# of shared memory); products that may be split along K (plain, weight gradients) stage
# fp32 partial tiles and take 128 x 128 with four (at 128 x 256 a split dx asked for
# 279000 bytes on an H200, run 5).
_WS_TILES: dict[str, _Tiles] = {
    _PLAIN: _Tiles(128, 128, 64, 8, 4, 4, tma=True, split_k=True, warp_specialize=True),
    _EPILOGUE: _Tiles(128, 256, 64, 8, 4, 3, tma=True, split_k=True, warp_specialize=True),
    _WEIGHT_GRAD: _Tiles(128, 128, 64, 8, 4, 4, tma=True, split_k=True, warp_specialize=True),
}
_FP32 = _Tiles(64, 64, 32, 8, 4, 3)
# Rows of one tile a program of _sum_slices_kernel sums: 8 programs a 128 x 128 tile, so
# that even a few tiles' slices are read by many SMs.
_SUM_ROWS = 16
# The interpreter pays per program: tiles as large as the tests' shapes, K still tiled so
# that the tests walk several K steps with a ragged last one.
_INTERPRETER = _Tiles(32, 64, 16, 2, 4, 1)


def _tiles(t: Tensor, kind: str) -> _Tiles:
    capability = device_capability(t.device.index or 0) if t.is_cuda else (0, 0)
    if capability == (0, 0):
        return _INTERPRETER
    if t.dtype == torch.float32:
        return _FP32
    if capability[0] == 9 and kind != _FEW_ROWS:
        return _TMA_TILES[kind]
    return _TILES[(9 if capability[0] == 9 else 8, kind)]


def _specialised(t: _Tiles, epilogue: int, col_sums: bool) -> _Tiles:
    """The products the warp-specialised tiles cannot take as they are."""
    if not t.warp_specialize:
        return t
    if col_sums:
        # Triton's Hopper warp specialisation gives each consumer warp group some of the
        # tile's rows and cannot sum across them: these take the TMA kernel unspecialised.
        return t._replace(warp_specialize=False, block_n=min(t.block_n, 128), num_warps=8)
    if epilogue == _GELU_GRAD:
        # Its second input tile (the pre-activation) spills 8-16 bytes at 128 x 256 under
        # Triton 3.8 and 3.9 (none under 3.6 and 3.7): 128 x 128 spills under none.
        return t._replace(block_n=128, num_stages=4)
    return t


def _matmul(
    a: Tensor,
    b: Tensor,
    bias: Tensor | None = None,
    epilogue: int = _NONE,
    aux: Tensor | None = None,
    col_sums: bool = False,
    kind: str = _PLAIN,
) -> tuple[Tensor, Tensor | None]:
    """epilogue(a @ b + bias) as a new contiguous (M, N) tensor, and its fp32 column sums if asked."""
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out, torch.zeros(N, dtype=torch.float32, device=a.device) if col_sums else None
    if M <= _FEW_ROWS_MAX:
        kind = _FEW_ROWS
    elif epilogue != _NONE:
        kind = _EPILOGUE
    t = _specialised(_tiles(a, kind), epilogue, col_sums)
    row_tiles = cdiv(M, t.block_m)
    tiles = row_tiles * cdiv(N, t.block_n)
    partial = torch.empty((row_tiles, N), dtype=torch.float32, device=a.device) if col_sums else None
    aux_arg = out if aux is None else aux  # never touched without an epilogue that needs it
    outputs = (out, out if bias is None else bias, aux_arg, out if partial is None else partial)
    flags = dict(
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, STORE_PRE=aux is not None and epilogue == _GELU,
        COL_SUM=col_sums,
        # tl.dot would round fp32 inputs to tf32; 16-bit inputs take the backend's default.
        PRECISION="ieee" if a.dtype == torch.float32 else None,
        APPROX_GELU=t.approx_gelu and a.dtype != torch.float32,
        num_warps=t.num_warps, num_stages=t.num_stages,
        **({} if t.max_registers is None else {"maxnreg": t.max_registers}),
    )
    # Programs the TMA kernel keeps resident (two stand for the SMs when interpreting).
    slots = max(t.persistent, 1) * (sm_count(a.device.index or 0) if a.is_cuda else 2)
    views = _tma_views(a, b) if t.tma else None
    whole, splits = tiles, 1  # tiles [0, whole) take all of K, the others are cut into `splits` slices
    if t.split_k and epilogue == _NONE and bias is None:
        whole, splits = _split_plan(tiles, cdiv(K, t.block_k), slots, t.tail_split and views is not None)
    if views is not None:
        _launch_tma(a, b, views, out, aux_arg, outputs[1], outputs[3], t, tiles, whole, splits, slots, flags)
    else:
        # A split product's slices store fp32 partials, summed below.
        target = out if splits == 1 else torch.empty((splits, M, N), dtype=torch.float32, device=a.device)
        _matmul_kernel[(tiles * splits,)](
            a, b, target, *outputs[1:], M, N, K, splits,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), N, 1, aux_arg.stride(0), aux_arg.stride(1),
            SPLIT_K=splits > 1, **flags,
        )
        if splits > 1:
            _sum_slices(target, out, 0, tiles, M, splits, t)
    return out, None if partial is None else partial.sum(0)


def _k_splits(tiles: int, k_steps: int, slots: int) -> int:
    """How many K slices to cut a product into so that its units of work fill the `slots`
    programs' rounds: the fewest slices (up to 8, each 16 or more K steps) whose rounds per
    tile come within 15% of perfect balance, as wave quantisation otherwise leaves SMs idle
    (144 tiles on 132 SMs take two rounds: 55% busy; cut in four, 576 units take five
    rounds of 4.4 units' work: 87%)."""
    ideal = tiles / slots
    best, best_rounds = 1, float(cdiv(tiles, slots))
    for s in range(1, 9):
        if s > 1 and k_steps < 16 * s:
            break
        rounds = cdiv(tiles * s, slots) / s
        if rounds <= 1.15 * ideal:
            return s
        if rounds < best_rounds:
            best, best_rounds = s, rounds
    return best


def _split_plan(tiles: int, k_steps: int, slots: int, tail_only: bool) -> tuple[int, int]:
    """(whole, splits): tiles [0, whole) take all of K, the others are cut into `splits` K
    slices. Where _k_splits cuts a product, every tile is cut (whole = 0), unless
    `tail_only` and the tiles fill a round: then only the last round's are, into as many
    slices as there are programs for them (each 16 or more K steps). 144 tiles on 132 SMs:
    132 whole, then 12 cut in 11 (132 units of 1/11 the work): 1.09 rounds' time against
    1.25 for all cut in four, and fp32 slices of 12 tiles, not 144 (dWproj at C = 768:
    8 MiB written and summed against 36 MiB)."""
    splits = _k_splits(tiles, k_steps, slots)
    if splits == 1:
        return tiles, 1
    if not tail_only or tiles < slots:
        return 0, splits
    left = tiles % slots
    splits = min(slots // left, k_steps // 16)
    return (tiles - left, splits) if splits > 1 else (tiles, 1)


def _launch_tma(a: Tensor, b: Tensor, views: tuple[tuple[Tensor, bool], ...], out: Tensor, aux: Tensor,
                bias: Tensor, col_sums: Tensor, t: _Tiles, tiles: int, whole: int, splits: int, slots: int,
                flags: dict) -> None:
    """out = a @ b (epilogue in flags) on _matmul_tma_kernel, or _matmul_ws_kernel if
    t.warp_specialize; `views` from _tma_views. Tiles [0, whole) are launched whole into
    out; the others, cut into `splits` K slices, stack their fp32 slices in a scratch
    tensor, each slice padded to whole row tiles, then summed into out."""
    (M, K), N = a.shape, b.shape[1]
    (view_a, a_rows_first), (view_b, b_k_first) = views
    split_rows = cdiv(M, t.block_m) * t.block_m
    flags = dict(flags, A_ROWS_FIRST=a_rows_first, B_K_FIRST=b_k_first)
    slices = None if splits == 1 else torch.empty((splits * split_rows, N), dtype=torch.float32, device=a.device)
    for first, count, s, target in ((0, whole, 1, out), (whole, tiles - whole, splits, slices)):
        if count == 0:
            continue
        programs = min(count * s, slots)
        if t.warp_specialize:
            with_device_scratch(a.device, lambda: _matmul_ws_kernel[(programs,)](
                view_a, view_b, target, aux, bias, col_sums, M, N, K, programs, first, count, s, split_rows,
                target.shape[0], view_a.stride(0), view_b.stride(0), aux.stride(0), **flags))
        else:
            halves = t.block_n >= 256
            width = t.block_n // (1 + halves)
            block_a = (t.block_m, t.block_k) if a_rows_first else (t.block_k, t.block_m)
            block_b = (t.block_k, t.block_n) if b_k_first else (t.block_n, t.block_k)
            _matmul_tma_kernel[(programs,)](
                _descriptor(view_a, block_a), _descriptor(view_b, block_b), _descriptor(target, (t.block_m, width)),
                _descriptor(aux, (t.block_m, width)), bias, col_sums, M, N, K, programs, first, count, s, split_rows,
                HALVES=halves, **flags)
    if splits > 1:
        _sum_slices(slices, out, whole, tiles - whole, split_rows, splits, t)


def _sum_slices(slices: Tensor, out: Tensor, first_tile: int, tile_count: int, split_rows: int, splits: int,
                t: _Tiles) -> None:
    """out's tiles [first_tile, first_tile + tile_count) = the sums of their fp32 K slices."""
    M, N = out.shape
    rows = min(t.block_m, _SUM_ROWS)
    _sum_slices_kernel[(tile_count, t.block_m // rows)](
        slices, out, M, N, split_rows * N, splits, first_tile,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, GROUP_M=t.group_m, ROWS=rows, num_warps=4)


def _tma_views(a: Tensor, b: Tensor) -> tuple[tuple[Tensor, bool], ...] | None:
    """a (M, K) and b (K, N) as TMA reads them (see _tma_view), or None where TMA cannot
    address an operand or the (M, N) output's rows, or K is 0 (a descriptor needs every
    dimension positive; the pointer kernel writes the bias)."""
    if b.shape[1] * a.element_size() % 16 or a.shape[1] == 0:
        return None
    view_a, view_b = _tma_view(a), _tma_view(b)
    return None if view_a is None or view_b is None else (view_a, view_b)


def _tma_view(x: Tensor) -> tuple[Tensor, bool] | None:
    """The 2-D operand x as a row-major view TMA can describe, and True if that is x as
    stored, False if x^T (x a transposed view: the kernel reads tiles reversed and
    transposes them). None where TMA cannot address x: start or row stride not 16-byte
    aligned, a row stride of 0 (a broadcast), or neither dimension contiguous."""
    if x.data_ptr() % 16:
        return None
    for as_stored, view in ((True, x), (False, x.t())):
        if view.stride(1) == 1 and view.stride(0) > 0 and view.stride(0) * x.element_size() % 16 == 0:
            return view, as_stored
    return None


def _descriptor(view: Tensor, block: tuple[int, int]) -> TensorDescriptor:
    return TensorDescriptor(view, list(view.shape), [view.stride(0), 1], list(block))


def _check(x: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None) -> None:
    check_inputs(_OP, _REFERENCE, x=x, fc_weight=fc_weight, fc_bias=fc_bias, proj_weight=proj_weight, proj_bias=proj_bias)
    if fc_weight.dim() != 2 or proj_weight.dim() != 2:
        raise ValueError(
            f"{_OP}: fc_weight and proj_weight must be 2-D (out, in) like nn.Linear.weight, "
            f"got {tuple(fc_weight.shape)} and {tuple(proj_weight.shape)}"
        )
    hidden, C = fc_weight.shape
    if x.dim() == 0 or x.shape[-1] != C:
        raise ValueError(f"{_OP}: x's last dim must be fc_weight's in-features {C}, got x of shape {tuple(x.shape)}")
    if 0 in (C, hidden, proj_weight.shape[0]):
        raise ValueError(
            f"{_OP}: zero-width weights {tuple(fc_weight.shape)} and {tuple(proj_weight.shape)}; use {_REFERENCE}"
        )
    if proj_weight.shape[1] != hidden:
        raise ValueError(
            f"{_OP}: proj_weight's in-features must be fc_weight's out-features {hidden}, "
            f"got proj_weight of shape {tuple(proj_weight.shape)}"
        )
    for name, bias, n in (("fc_bias", fc_bias, hidden), ("proj_bias", proj_bias, proj_weight.shape[0])):
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"{_OP}: {name} must have shape ({n},), got {tuple(bias.shape)}")
    # Row, column and K indices are int32 and run up to a tile (8 K steps split) past their
    # dimension: past 2^31 they wrapped (loads and stores at negative rows). 2^30 leaves room.
    if max(x.numel() // C, C, hidden, proj_weight.shape[0]) >= 2**30:
        raise ValueError(f"{_OP}: every size must be below 2^30 (the kernels index in int32), got tokens="
                         f"{x.numel() // C}, C={C}, hidden={hidden}, C_out={proj_weight.shape[0]}; split the batch")


@on_input_device
def _ffn_fwd(
    x2: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None, save_pre: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """y (M, C_out), the pre-activation (M, H) if save_pre else None, and h = gelu(pre)."""
    pre = torch.empty((x2.shape[0], fc_weight.shape[0]), dtype=x2.dtype, device=x2.device) if save_pre else None
    h, _ = _matmul(x2, fc_weight.t(), fc_bias, _GELU, aux=pre)
    y, _ = _matmul(h, proj_weight.t(), proj_bias)
    return y, pre, h


@on_input_device
def _ffn_bwd(
    dy2: Tensor, x2: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, proj_weight: Tensor, pre: Tensor | None,
    h: Tensor, needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """dx (M, C), dfc_weight, dfc_bias, dproj_weight, dproj_bias, each None unless `needs` it."""
    need_x, need_wfc, need_bfc, need_wproj, need_bproj = needs
    if pre is None:  # recompute_pre: one more matmul instead of the stored tensor
        pre, _ = _matmul(x2, fc_weight.t(), fc_bias)
    dx = dwfc = dbfc = dwproj = dbproj = None
    if need_bproj:
        dbproj = dy2.sum(0, dtype=torch.float32).to(proj_weight.dtype)
    if need_wproj:
        dwproj, _ = _matmul(dy2.t(), h, kind=_WEIGHT_GRAD)
    if need_x or need_wfc or need_bfc:
        dpre, dbfc = _matmul(dy2, proj_weight, epilogue=_GELU_GRAD, aux=pre, col_sums=need_bfc)
        if need_wfc:
            dwfc, _ = _matmul(dpre.t(), x2, kind=_WEIGHT_GRAD)
        if need_x:
            dx, _ = _matmul(dpre, fc_weight)
    if dbfc is not None:
        dbfc = dbfc.to(fc_bias.dtype)
    return dx, dwfc, dbfc, dwproj, dbproj


class FFNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, proj_weight: Tensor,
                proj_bias: Tensor | None, recompute_pre: bool, grad_enabled: bool) -> Tensor:
        _check(x, fc_weight, fc_bias, proj_weight, proj_bias)
        x2 = x.reshape(-1, x.shape[-1])  # a view whenever one exists; the kernel takes any strides
        # needs_input_grad is set under no_grad too (an eval model's weights require grad):
        # only the caller's grad mode says whether a backward can come.
        training = grad_enabled and any(ctx.needs_input_grad[:5])
        y, pre, h = _ffn_fwd(x2, fc_weight, fc_bias, proj_weight, proj_bias, training and not recompute_pre)
        if training:
            ctx.save_for_backward(x2, fc_weight, fc_bias, proj_weight, pre, h)
        ctx.set_materialize_grads(False)
        return y.view(*x.shape[:-1], proj_weight.shape[0])

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        refuse_double_backward("ffn")
        if dy is None:
            return None, None, None, None, None, None, None
        x2, fc_weight, fc_bias, proj_weight, pre, h = ctx.saved_tensors
        grads = _ffn_bwd(dy.reshape(-1, dy.shape[-1]), x2, fc_weight, fc_bias, proj_weight, pre, h,
                         ctx.needs_input_grad[:5])
        dx = None if grads[0] is None else grads[0].view(*dy.shape[:-1], x2.shape[1])
        return dx, *grads[1:], None, None


# Eager calls go through torch.compiler.disable: where Dynamo runs the public function's
# frame eagerly (it marks a frame to skip after an error in it, e.g. eager's ValueError
# while tracing), it would otherwise trace the launches below it (see kernels/__init__.py).
_ffn_apply = torch.compiler.disable(FFNFunction.apply)


# Under torch.compile the launches run as custom ops, as in kernels/layer_norm.py. The
# gradients a backward does not need come back empty (an op returns tensors, not None).
@torch.library.custom_op("tritongpt::ffn", mutates_args=())
def _ffn_op(
    x: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None,
    save_pre: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """y, the pre-activation (empty unless save_pre) and h, for the backward."""
    y, pre, h = _ffn_fwd(x.reshape(-1, x.shape[-1]), fc_weight, fc_bias, proj_weight, proj_bias, save_pre)
    return y.view(*x.shape[:-1], proj_weight.shape[0]), x.new_empty(0) if pre is None else pre, h


@_ffn_op.register_fake
def _(x: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None,
      save_pre: bool) -> tuple[Tensor, Tensor, Tensor]:
    M, hidden = x.numel() // x.shape[-1], fc_weight.shape[0]
    pre = x.new_empty((M, hidden) if save_pre else 0)
    return x.new_empty((*x.shape[:-1], proj_weight.shape[0])), pre, x.new_empty((M, hidden))


@torch.library.custom_op("tritongpt::ffn_backward", mutates_args=())
def _ffn_backward_op(
    dy: Tensor, x: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, proj_weight: Tensor, pre: Tensor | None,
    h: Tensor, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _ffn_bwd(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), fc_weight, fc_bias, proj_weight,
                     pre, h, tuple(needs))
    dx = grads[0].view(x.shape) if grads[0] is not None else None
    return tuple(x.new_empty(0) if g is None else g for g in (dx, *grads[1:]))


@_ffn_backward_op.register_fake
def _(dy: Tensor, x: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, proj_weight: Tensor, pre: Tensor | None,
      h: Tensor, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    shapes = (x.shape, fc_weight.shape, fc_weight.shape[:1], proj_weight.shape, proj_weight.shape[:1])
    return tuple(x.new_empty(shape if need else 0) for shape, need in zip(shapes, needs))


def _ffn_setup(ctx, inputs: tuple, output: tuple) -> None:
    x, fc_weight, fc_bias, proj_weight, _, save_pre = inputs
    _, pre, h = output
    ctx.save_for_backward(x, fc_weight, fc_bias, proj_weight, pre if save_pre else None, h)


def _ffn_backward(ctx, dy: Tensor, _dpre: Tensor, _dh: Tensor) -> tuple:
    x, fc_weight, fc_bias, proj_weight, pre, h = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = _ffn_backward_op(dy, x, fc_weight, fc_bias, proj_weight, pre, h, needs)
    return *(g if need else None for g, need in zip(grads, needs)), None


_ffn_op.register_autograd(_ffn_backward, setup_context=_ffn_setup)


def ffn(
    x: Tensor,
    fc_weight: Tensor,
    fc_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    recompute_pre: bool = False,
) -> Tensor:
    """linear(gelu_tanh(linear(x, fc_weight, fc_bias)), proj_weight, proj_bias).

    x (..., C); fc_weight (H, C), proj_weight (C_out, H) in nn.Linear layout; biases (H,),
    (C_out,) or None. All one dtype (fp16/bf16 on CUDA; fp32 too, exact but slow), CUDA
    tensors or CPU tensors under TRITON_INTERPRET=1. Differentiable in all five inputs.
    recompute_pre trades the saved M x H pre-activation for one more matmul in backward.
    """
    if torch.compiler.is_compiling():
        _check(x, fc_weight, fc_bias, proj_weight, proj_bias)  # eager's ValueError, while tracing
        tensors = (x, fc_weight, fc_bias, proj_weight, proj_bias)
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return _ffn_op(x, fc_weight, fc_bias, proj_weight, proj_bias, training and not recompute_pre)[0]
    return _ffn_apply(x, fc_weight, fc_bias, proj_weight, proj_bias, recompute_pre, torch.is_grad_enabled())
