"""LayerNorm over the last dimension in Triton, forward and backward, plus a fused residual add.

    layer_norm(x, weight, bias, eps)               == F.layer_norm(x, (N,), weight, bias, eps)
    add_layer_norm(x, residual, weight, bias, eps) == (x + residual, layer_norm(x + residual))

A whole row sits in registers, so each pass reads its inputs once: the forward writes y
(and the sum) plus fp32 mean and rstd per row; the backward recomputes x_hat from them,
writes dx in the same pass and reduces dweight/dbias through one fp32 partial row per
program, summed afterwards (Liger-Kernel's scheme: deterministic, no atomics, no locks).
Unlike Liger's, the backward's row loop is software-pipelined (tl.range num_stages): the
next rows' x and dy stream into shared memory while this row is reduced, so a program
that owns a long chunk of rows is not left waiting on one load at a time.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._utils import (
    LAYER_NORM_MAX_ROW_BYTES, cdiv, check_inputs, interpreting, is_hopper, next_power_of_2, on_input_device,
    refuse_double_backward, sm_count,
)


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_s, stride_y,
    M, N, eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SHIFT: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Normalises BLOCK_M rows per step. STAGES 0: one step per program. STAGES >= 1: the
    grid is smaller than the tiles and each program walks tiles num_programs apart, its
    loop pipelined STAGES deep, so that the next rows stream in while these are reduced
    (a one-tile program leaves its SM's load slots idle through its reductions)."""
    if STAGES == 0:
        _layer_norm_fwd_tile(X, R, S, Y, W, B, Mean, Rstd, stride_x, stride_r, stride_s, stride_y,
                             tl.program_id(0) * BLOCK_M, M, N, eps, 0.0, 0.0,
                             BLOCK_M, BLOCK_N, HAS_RESIDUAL, HAS_BIAS, SHIFT, False)
    else:
        # Weight and bias once a program, as stored (16-bit ones two to a register), not
        # once a tile: a tile of one row otherwise reads 3 rows' bytes through L2 for 1 of x.
        cols = tl.arange(0, BLOCK_N)
        w = tl.load(W + cols, mask=cols < N, other=0.0)
        b = tl.load(B + cols, mask=cols < N, other=0.0) if HAS_BIAS else 0.0
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
            _layer_norm_fwd_tile(X, R, S, Y, W, B, Mean, Rstd, stride_x, stride_r, stride_s, stride_y,
                                 tile * BLOCK_M, M, N, eps, w, b, BLOCK_M, BLOCK_N, HAS_RESIDUAL, HAS_BIAS, SHIFT, True)


@triton.jit
def _layer_norm_fwd_tile(
    X, R, S, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_s, stride_y,
    start, M, N, eps, w_held, b_held,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SHIFT: tl.constexpr,
    HELD: tl.constexpr,
):
    """BLOCK_M rows from `start`; weight and bias from w_held and b_held (loaded by the
    caller) if HELD, else loaded here."""
    rows = start + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]

    # Load, then widen at once: all arithmetic is fp32 whatever the storage dtype.
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Normalise the sum as stored (rounded to its dtype): the backward re-reads that
        # tensor, and x + residual in torch rounds the same way before layer_norm sees it.
        s = x.to(S.dtype.element_ty)
        tl.store(S + r64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    if HELD:
        w = w_held.to(tl.float32)
        if HAS_BIAS:
            b = b_held.to(tl.float32)
    else:
        # Issued before the reductions so their latency hides behind them.
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)

    if SHIFT:
        # Rows whose sum may round (_sum_may_round) are shifted by their first element (the
        # sum as stored, with a residual), so a constant row sums to exactly 0. The first
        # elements are loaded apart: picking them out of the tile is one more reduction.
        x0 = tl.load(X + rows.to(tl.int64) * stride_x, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x0 += tl.load(R + rows.to(tl.int64) * stride_r, mask=row_ok, other=0.0).to(tl.float32)
            x0 = x0.to(S.dtype.element_ty).to(tl.float32)
        x = tl.where(mask, x - x0[:, None], 0.0)
    # One Newton step on the mean: Triton's fp32 / is PTX div.full, up to 2 ulps off, and
    # a constant row's mean an ulp off its value is magnified by rstd = 1 / sqrt(eps)
    # (316 at eps 1e-5, 1e6 at BERT's 1e-12) into y, dx and dweight. After the step the
    # mean of an exact sum is exactly the value and x_hat exactly 0, as torch gives.
    # (div_rn, the rounded division, took the persistent N = 8192 tile from 63 to 90
    # registers on sm90, one program an SM where two run; the step keeps 63.)
    total = tl.sum(x, axis=1)
    mean = total / N
    mean += tl.fma(-mean, N * 1.0, total) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    if SHIFT:
        mean += x0
    # Two-pass variance from registers: no cancellation, unlike E[x^2] - E[x]^2.
    var = tl.sum(xc * xc, axis=1) / N
    rstd = tl.rsqrt(var + eps)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)

    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += b[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, Mean, Rstd, DY, DS, DX, DW, DB,
    stride_x, stride_dy, stride_ds, stride_dx,
    M, N, rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STAGES: tl.constexpr,
):
    # Each program walks its own contiguous chunk of rows, BLOCK_M at a time, and keeps
    # dweight/dbias for the chunk in registers; one fp32 partial row per program goes out.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # A plain range is not pipelined (its loads feed no tl.dot): two programs per SM would
    # then have one tile's loads in flight during the loads and none during the reductions.
    for start in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)

        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(x_hat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DSUM:
            # The sum output of add_layer_norm is the residual stream and has its own
            # gradient; x and residual both receive the total.
            dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        dw += dy * x_hat
        if HAS_BIAS:
            db += dy

    partial = pid.to(tl.int64) * N + cols
    tl.store(DW + partial, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + partial, tl.sum(db, axis=0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(DW, DB, OutW, OutB, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Both partial buffers in one launch, cast to the parameters' dtypes on the way out:
    # one kernel where torch would run two sums and two casts.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dw += tl.load(DW + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(DB + offsets, mask=mask, other=0.0)
    tl.store(OutW + cols, tl.sum(dw, axis=0).to(OutW.dtype.element_ty), mask=col_ok)
    if HAS_BIAS:
        tl.store(OutB + cols, tl.sum(db, axis=0).to(OutB.dtype.element_ty), mask=col_ok)


# Elements one program covers per step; short rows are stacked to reach it.
_TILE = 4096
# Rows of these block widths take the forward's own tile (_settings): 32 elements of the
# block a thread, two rows a program up to _FWD_TWO_ROWS_N.
_FWD_TILE_NS = (1024, 2048, 4096, 8192)
_FWD_TWO_ROWS_N = 2048
_FWD_PER_THREAD = 32
# Backward programs when interpreting: each costs milliseconds there.
_INTERPRET_PROGRAMS = 4
# The partial-row sum: 32 fp32 columns (one 128-byte line per row) by 64 rows per step,
# so that N = 768 still spreads over 24 programs.
_SUM_ROWS, _SUM_COLUMNS = 64, 32
# Shared memory the backward's pipeline may take: per SM (Hopper has 228 KiB, Ampere 164)
# and per program (A100's 163 KiB block limit, less the reductions' scratch).
_SHARED_PER_SM, _SHARED_PER_PROGRAM = 192 * 1024, 160 * 1024


class _Settings(NamedTuple):
    block_n: int  # the whole row, rounded up to a power of two
    fwd_block_m: int  # rows per forward program step
    fwd_warps: int
    bwd_block_m: int  # rows per backward program step
    bwd_warps: int
    bwd_stages: int  # tiles of x and dy the backward's row loop keeps in flight
    fwd_stages: int = 0  # 0: a forward program per tile; else persistent, its row loop this deep
    fwd_programs_per_sm: int = 1  # persistent forward programs launched per SM


@functools.lru_cache(maxsize=None)
def _settings(N: int, element_size: int) -> _Settings:
    """Launch settings for rows of N elements of element_size bytes, like Liger's calculate_settings.

    Rows shorter than _TILE are stacked BLOCK_M to a program, so that a program at N=768
    still moves as many bytes as one at N=4096. num_warps gives each thread 16 elements of
    the tile: 8 warps up to 4096, 16 at 8192, 32 from 16384 -- several 16-byte loads in
    flight per thread without spilling in the backward, which keeps ~6 fp32 values per
    element live (compiled for sm90: 117-128 registers, two 8-warp programs per SM).
    The forward has its own tile (fwd_block_m, fwd_warps): it keeps ~2 fp32 values per
    element live, and few warps a row, 32 elements of the block a thread, lead at every
    width swept: two rows a program up to N = 2048, one above. In the sweeps (H200, bf16,
    copy and Liger timed beside; bench/RESULTS.md) that read 3667-3823, 3830, 3708 and 3479
    GB/s at N = 768-1024, 2048, 4096 and 8192 (run 6 for 768 and 1024, run 7 above), against
    the backward's tile at 3458 and 3560 (2048, 4096; 8 warps), the persistent forward at
    3314 (8192; 16 warps, three stages, two programs an SM; Liger 2861, copy ~4020).
    Narrower rows keep the backward's tile, which matched or led Liger (run 5); few warps
    a tile there is untimed, as are the widths above 8192.
    The backward keeps up to three stages of x, dy (and dsum) in shared memory, as many as
    fit in _SHARED_PER_SM split among the programs an SM holds: three for bf16 up to
    N = 8192, two for fp32 up to 4096, none (a plain loop) where two would not fit.
    """
    block_n = next_power_of_2(N)
    block_m = max(1, _TILE // block_n)
    num_warps = min(32, max(4, block_m * block_n // (32 * 16)))
    stage_bytes = 3 * block_m * block_n * element_size
    budget = min(_SHARED_PER_PROGRAM, _SHARED_PER_SM // _programs_per_sm(num_warps))
    bwd_stages = max(1, min(3, budget // stage_bytes))
    fwd_block_m, fwd_warps = block_m, num_warps
    if block_n in _FWD_TILE_NS:
        fwd_block_m = 2 if block_n <= _FWD_TWO_ROWS_N else 1
        fwd_warps = fwd_block_m * block_n // (32 * _FWD_PER_THREAD)
    return _Settings(block_n, fwd_block_m, fwd_warps, block_m, num_warps, bwd_stages)


def _sum_may_round(dtype: torch.dtype, N: int) -> bool:
    """Whether the fp32 sum of a constant row of N dtype elements can round. Every partial
    sum is k * c for a whole k <= N, exact while it has at most 24 significant bits: always
    for bf16 (8 bits and k <= 2^15), for fp16 (11 bits) up to N = 8192 only, and not for
    fp32. Where it can round, the forward shifts each row by its first element first."""
    return dtype == torch.float32 or (dtype == torch.float16 and N > 8192)


def _programs_per_sm(num_warps: int) -> int:
    """Backward programs resident per SM: two while they are 8 warps or fewer."""
    return max(1, 16 // num_warps)


def _check(op: str, reference: str, weight: Tensor, bias: Tensor | None, **acts: Tensor) -> None:
    """ValueError for anything the kernels do not take; `acts` are x (and residual).

    Activations and parameters may differ in dtype (autocast keeps fp32 weights and an
    fp32 residual stream beside bf16 branch outputs), so check_inputs, which wants one
    dtype per call, sees each tensor alone and devices are compared here first.
    """
    if weight is None:
        raise ValueError(f"{op}: weight is required (the kernel always scales); use {reference} without one")
    tensors = {**acts, "weight": weight, "bias": bias}
    devices = {t.device for t in tensors.values() if isinstance(t, Tensor)}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {t.device}" for k, t in tensors.items() if isinstance(t, Tensor))
        raise ValueError(f"{op}: inputs must be on one device, got {desc}")
    for name, t in tensors.items():
        if t is not None:
            check_inputs(op, reference, **{name: t})
    x = acts["x"]
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x's last dimension is 0, there is nothing to normalise; use {reference}")
    for name, t in acts.items():
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"{op}: {name} must have shape ({N},) to match x's last dim, got {tuple(t.shape)}")
    limit = LAYER_NORM_MAX_ROW_BYTES // max(t.element_size() for t in acts.values())
    if N > limit:
        raise ValueError(
            f"{op}: rows of {N} elements exceed the kernel's limit of {limit} for {x.dtype} "
            f"(64 KiB per row); use {reference}"
        )
    # Row indices are int32: the forward's last tile ends up to 4095 rows past M, the
    # backward's last chunk up to a chunk (~M / programs) past it, and past 2^31 they
    # wrapped (stores at negative rows, a chunk of dx never written). Below 2^30 neither can.
    if x.numel() // N >= 2**30:
        raise ValueError(f"{op}: {x.numel() // N} rows must be fewer than 2^30 (the kernels index rows in int32); "
                         f"split the batch")


def _rows(t: Tensor, N: int) -> Tensor:
    """(M, N) view with unit column stride; copies only when no such view exists."""
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 else t.contiguous()


@on_input_device
def _layer_norm_fwd(
    op: str, x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """y, the sum (None without residual), mean and rstd (fp32, (M,)), x as (M, N), weight as used."""
    reference = f"kernels.reference.{op}"
    if residual is None:
        _check(op, reference, weight, bias, x=x)
    else:
        _check(op, reference, weight, bias, x=x, residual=residual)
    N = x.shape[-1]
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    x2 = _rows(x, N)
    M = x2.shape[0]
    r2 = x2 if residual is None else _rows(residual, N)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = None if residual is None else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s2 = y if s is None else s  # not written without a residual
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    cfg = _settings(N, x2.element_size())
    if cfg.fwd_stages and x2.is_cuda and not is_hopper(x2):
        cfg = cfg._replace(fwd_stages=0)  # two programs' stages fit only Hopper's shared memory
    programs = cdiv(M, cfg.fwd_block_m)
    if cfg.fwd_stages:
        slots = sm_count(x2.device.index or 0) * cfg.fwd_programs_per_sm if x2.is_cuda else _INTERPRET_PROGRAMS
        programs = min(programs, slots)
    if M > 0:
        _layer_norm_fwd_kernel[(programs,)](
            x2, r2, s2, y, weight, weight if bias is None else bias, mean, rstd,
            x2.stride(0), r2.stride(0), N, N,
            M, N, eps,
            BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.block_n,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            SHIFT=_sum_may_round(out_dtype, N), STAGES=cfg.fwd_stages, num_warps=cfg.fwd_warps,
        )
    return y, s, mean, rstd, x2, weight


@on_input_device
def _layer_norm_bwd(
    dy: Tensor, dsum: Tensor | None, x2: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
    bias_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """dx (M, N) in x2's dtype (plus dsum when given), dweight in weight's dtype and dbias
    in bias_dtype (None without a bias)."""
    M, N = x2.shape
    dy2 = _rows(dy, N)
    ds2 = dy2 if dsum is None else _rows(dsum, N)
    dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    dweight = torch.empty(N, dtype=weight.dtype, device=x2.device)
    dbias = None if bias_dtype is None else torch.empty(N, dtype=bias_dtype, device=x2.device)
    if M == 0:
        dweight.zero_()
        return dx, dweight, None if dbias is None else dbias.zero_()
    cfg = _settings(N, x2.element_size())
    tiles = cdiv(M, cfg.bwd_block_m)
    if interpreting() or not x2.is_cuda:
        programs = _INTERPRET_PROGRAMS
    else:
        # Enough programs to fill every SM, few enough that the partial rows stay a small
        # share of the traffic.
        programs = sm_count(x2.device.index or 0) * _programs_per_sm(cfg.bwd_warps)
    # Whole tiles per program, so that only the last tile of the last chunk is ragged.
    rows_per_program = max(1, cdiv(tiles, min(tiles, programs))) * cfg.bwd_block_m
    P = cdiv(M, rows_per_program)  # every program gets rows
    dw = torch.empty((P, N), dtype=torch.float32, device=x2.device)
    db = dw if dbias is None else torch.empty((P, N), dtype=torch.float32, device=x2.device)
    _layer_norm_bwd_kernel[(P,)](
        x2, weight, mean, rstd, dy2, ds2, dx, dw, db,
        x2.stride(0), dy2.stride(0), ds2.stride(0), N,
        M, N, rows_per_program,
        BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.block_n,
        HAS_DSUM=dsum is not None, HAS_BIAS=dbias is not None, STAGES=cfg.bwd_stages,
        num_warps=cfg.bwd_warps,
    )
    _sum_partials_kernel[(cdiv(N, _SUM_COLUMNS),)](
        dw, db, dweight, dweight if dbias is None else dbias, P, N,
        BLOCK_P=_SUM_ROWS, BLOCK_N=_SUM_COLUMNS, HAS_BIAS=dbias is not None,
        num_warps=4,
    )
    return dx, dweight, dbias


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
        y, _, mean, rstd, x2, w = _layer_norm_fwd("layer_norm", x, None, weight, bias, float(eps))
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        refuse_double_backward("layer_norm")
        if dy is None:
            return None, None, None, None
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _layer_norm_bwd(dy, None, x2, weight, mean, rstd, ctx.bias_dtype)
        return dx.view(dy.shape), dw, db, None


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float):
        y, s, mean, rstd, _, w = _layer_norm_fwd("add_layer_norm", x, residual, weight, bias, float(eps))
        ctx.save_for_backward(s, w, mean, rstd)
        ctx.dtypes = (x.dtype, residual.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)
        return s, y

    @staticmethod
    def backward(ctx, dsum: Tensor | None, dy: Tensor | None):
        refuse_double_backward("add_layer_norm")
        x_dtype, r_dtype, bias_dtype = ctx.dtypes
        if dy is None:  # only the sum was used downstream
            if dsum is None:
                return None, None, None, None, None
            return dsum.to(x_dtype), dsum.to(r_dtype), None, None, None
        s, weight, mean, rstd = ctx.saved_tensors
        ds, dw, db = _layer_norm_bwd(dy, dsum, _rows(s, s.shape[-1]), weight, mean, rstd, bias_dtype)
        ds = ds.view(s.shape)
        return ds.to(x_dtype), ds.to(r_dtype), dw, db, None


# Eager calls go through torch.compiler.disable: where Dynamo runs the public function's
# frame eagerly (it marks a frame to skip after an error in it, e.g. eager's ValueError
# while tracing), it would otherwise trace the launches below it (see kernels/__init__.py).
_layer_norm_apply = torch.compiler.disable(LayerNormFunction.apply)
_add_layer_norm_apply = torch.compiler.disable(AddLayerNormFunction.apply)


# Under torch.compile the same launches run as custom ops, which Dynamo and Inductor treat
# like aten ops (fake implementations give the output shapes): one graph, no break around
# them. The public functions check the inputs first, so that a bad one raises the eager
# ValueError while Dynamo traces. Eager calls keep the autograd.Functions: a custom op's
# dispatch costs ~17 us more a call (torch 2.13, CPU).
@torch.library.custom_op("tritongpt::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd, _, _ = _layer_norm_fwd("layer_norm", x, None, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty(x.shape), *_empty_stats(x))


@torch.library.custom_op("tritongpt::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, s, mean, rstd, _, _ = _layer_norm_fwd("add_layer_norm", x, residual, weight, bias, eps)
    return s, y, mean, rstd


@_add_layer_norm_op.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> tuple[Tensor, ...]:
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), *_empty_stats(x)


def _empty_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    M = x.numel() // x.shape[-1]
    return x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("tritongpt::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: Tensor, dsum: Tensor | None, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
    bias_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dx in x's shape and dtype (plus dsum when given), dweight, dbias (empty without a bias)."""
    dx, dw, db = _layer_norm_bwd(dy, dsum, _rows(x, x.shape[-1]), weight.contiguous(), mean, rstd, bias_dtype)
    return dx.view(x.shape), dw, weight.new_empty(0) if db is None else db


@_layer_norm_backward_op.register_fake
def _(dy: Tensor, dsum: Tensor | None, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
      bias_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    dbias = weight.new_empty(0) if bias_dtype is None else weight.new_empty(weight.shape, dtype=bias_dtype)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias


def _layer_norm_setup(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _layer_norm_backward(ctx, dy: Tensor, _dmean: Tensor, _drstd: Tensor) -> tuple:
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward_op(dy, None, x, weight, mean, rstd, ctx.bias_dtype)
    return dx, dw, None if ctx.bias_dtype is None else db, None


def _add_layer_norm_setup(ctx, inputs: tuple, output: tuple) -> None:
    x, residual, weight, bias, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, None if bias is None else bias.dtype)


def _add_layer_norm_backward(ctx, dsum: Tensor, dy: Tensor, _dmean: Tensor, _drstd: Tensor) -> tuple:
    x_dtype, r_dtype, bias_dtype = ctx.dtypes
    s, weight, mean, rstd = ctx.saved_tensors
    ds, dw, db = _layer_norm_backward_op(dy, dsum, s, weight, mean, rstd, bias_dtype)
    return ds.to(x_dtype), ds.to(r_dtype), dw, None if bias_dtype is None else db, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)
_add_layer_norm_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension: x (..., N) -> (..., N) in x's dtype.

    x in fp32, fp16 or bf16 with N up to 16384 (fp32) or 32768 (fp16/bf16); weight and
    bias (N,) may have their own float dtype (fp32 weights beside bf16 x, as under
    autocast); bias may be None. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    Differentiable in x, weight and bias.
    """
    if torch.compiler.is_compiling():
        _check("layer_norm", "kernels.reference.layer_norm", weight, bias, x=x)
        return _layer_norm_op(x, weight, bias, float(eps))[0]
    return _layer_norm_apply(x, weight, bias, eps)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """(x + residual, layer_norm(x + residual)) from one kernel; x, residual (..., N).

    Both outputs are in the promoted dtype of x and residual and both may carry gradients
    (the sum is the residual stream); x and residual get the same gradient, in their dtypes.
    """
    if torch.compiler.is_compiling():
        _check("add_layer_norm", "kernels.reference.add_layer_norm", weight, bias, x=x, residual=residual)
        return _add_layer_norm_op(x, residual, weight, bias, float(eps))[:2]
    return _add_layer_norm_apply(x, residual, weight, bias, eps)
