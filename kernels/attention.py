"""Flash attention in Triton, forward and backward (FlashAttention-2's algorithm).

    attention(q, k, v, causal, scale) == F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

except that with Tq < Tk the causal mask is aligned to the end, as in
kernels.reference.attention: query i sits at absolute position Tk - Tq + i, so the last
query sees every key (a chunk of new tokens against a longer KV cache).

Forward: one program per (BLOCK_M queries, batch x head) walks the key/value tiles with
an online softmax in fp32 -- exp2, with log2(e) folded into the scale -- and writes O plus
each row's log-sum-exp (base 2, fp32), the only statistic the backward needs; the Tq x Tk
scores never reach memory. For causal attention the key loop has two stages: tiles wholly
below the diagonal run without any mask, tiles crossing it (and the ragged end of the keys)
run masked, and tiles wholly above it are never visited (the loop stops short of them).

Backward, three launches, no atomics, so gradients are bit-for-bit reproducible:
  1. delta = rowsum(dO * O) in fp32, one program per block of query rows;
  2. dK, dV: one program per BLOCK_N keys holds K and V and walks the query tiles that see
     them, recomputing P from the saved log-sum-exp (masked near the diagonal only);
  3. dQ: one program per BLOCK_M queries walks the key tiles as the forward does.
QK^T and dO V^T are recomputed in both 2 and 3 (7 matmuls where 5 would do with atomic dQ
updates), the price of determinism, as in the Triton fused-attention tutorial.

Dropout (training): each kernel redraws the keep mask from Philox at the score's position
(_dropout_keep, one call for 8 scores), so it is never stored; O is P∘mask V / (1 - p), and
delta = rowsum(dO O) stays the softmax's correction term as in FlashAttention-2.

return_lse hands out the log-sum-exp (in base e). Its gradient g enters the backward as
delta - g: the lse's derivative with respect to a score is its probability.

Grouped-query attention (enable_gqa, as SDPA's flag): k and v have H / GROUP heads and
query head h reads head h // GROUP. The forward and dQ only index K and V by it; each dK/dV
program walks the query tiles of its group's heads in one loop (GROUP = 1 folds away), or
of a part of the group where whole groups would leave SMs idle (_group_splits).

A causal sliding window (window=W: each query sees its W latest keys) adds a masked stage
before the unmasked one, for the tiles at the window's trailing edge, and skips the tiles
behind it: the forward and dQ start their key loop at the window's first tile, dK/dV stop
their query loop at the last query whose window reaches the key tile. WINDOW is a
constexpr: without a window every kernel builds as before (tests/codegen.py's builds
keep their instruction and register counts).

On Hopper, TMA descriptors can move the tiles each kernel loops over (_Launch.tma, timed
by bench_attention --sweep; the default only for the D = 128 dQ).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels._utils import (
    HEAD_DIMS, cdiv, check_inputs, device_capability, on_input_device, refuse_double_backward, sm_count,
)


@triton.jit
def _batch_head(H, SPLIT_GRID: tl.constexpr):
    """This program's batch, head and b * H + h: the grid is (tiles, B * H), or (tiles, H, B)
    where B * H passes the programs CUDA allows on axis 1 (SPLIT_GRID; see _grid)."""
    if SPLIT_GRID:
        pid_b = tl.program_id(2)
        pid_h = tl.program_id(1)
        bh = pid_b * H + pid_h
    else:
        bh = tl.program_id(1)
        pid_b = bh // H
        pid_h = bh % H
    return pid_b, pid_h, bh


@triton.jit
def _dropout_keep(seed, dropout_p, bh, start_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  TRANSPOSED: tl.constexpr = False):
    """Which probabilities of the (queries start_m + [0, BLOCK_M)) x (keys start_n +
    [0, BLOCK_N)) tile dropout keeps: (BLOCK_M, BLOCK_N), or its transpose. start_m is a
    multiple of 16, start_n of 32.

    FlashAttention's scheme: the forward and both backward kernels redraw the mask from
    Philox at each score's position, so it is never stored. A 10-round Philox call costs
    ~50 integer instructions for 128 bits, so each call serves 8 scores, 16 bits each (kept
    where they reach dropout_p * 2^16; the launcher rounds p to a multiple of 2^-16): query
    16 a + 8 h + u and key 32 b + 8 i + r take half h of word i of the call at counter
    (8 b + r, 8 a + u, bh, 0) under the seed. Those are 2 queries 8 apart by 4 keys 8
    apart, which an mma result (rows lane / 4 and 8 more, columns 2 (lane % 4) + [0, 1]
    and 8 more) gives one thread in either orientation. So the forward and dQ draw each
    call once, dK/dV (keys on its rows) once or twice (where a warp holds 16 of its rows),
    and the mask needs no layout conversion."""
    keys = (start_n // 32 + tl.arange(0, BLOCK_N // 32))[:, None] * 8 + tl.arange(0, 8)[None, :]
    queries = (start_m // 16 + tl.arange(0, BLOCK_M // 16))[:, None] * 8 + tl.arange(0, 8)[None, :]
    threshold = tl.cast(dropout_p * 65536.0, tl.uint32)
    if TRANSPOSED:  # (key // 32, i, key % 8, query // 16, h, query % 8)
        r0, r1, r2, r3 = tl.philox(seed, keys[:, None, :, None, None, None], queries[None, None, None, :, None, :], bh, 0)
        i = tl.arange(0, 4)[None, :, None, None, None, None]
        h = tl.arange(0, 2)[None, None, None, None, :, None]
    else:  # (query // 16, h, query % 8, key // 32, i, key % 8)
        r0, r1, r2, r3 = tl.philox(seed, keys[None, None, None, :, None, :], queries[:, None, :, None, None, None], bh, 0)
        i = tl.arange(0, 4)[None, None, None, None, :, None]
        h = tl.arange(0, 2)[None, :, None, None, None, None]
    word = tl.where(i < 2, tl.where(i < 1, r0, r1), tl.where(i < 3, r2, r3))
    keep = ((word >> (h * 16)) & 0xFFFF) >= threshold
    return tl.reshape(keep, (BLOCK_N, BLOCK_M) if TRANSPOSED else (BLOCK_M, BLOCK_N))


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, K, V,
    stride_kt, stride_vt, b, h, bh,
    start_m, offs_m, offs_d, lo, hi, Tq, Tk, offset, qk_scale, seed, dropout_p, window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    NEGATIVE_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Folds key tiles [lo, hi) into the running (acc, l_i, m_i) of one query tile.

    Without MASK every tile must be in bounds and wholly visible to every query row. With
    MASK and WINDOW, keys `window` or more positions behind a query are masked too.
    TMA: K and V are (B, H, T, D) descriptors, read at head (b, h), zero-filled past Tk;
    else pointers already at the head. DROPOUT zeroes the dropped probabilities after
    they entered the row sums (the caller scales by 1 / (1 - dropout_p)).
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)[:, None]
        if MASK:
            n_ok = offs_n < Tk
        if TMA:
            k = K.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif MASK:
            k = tl.load(K + rows * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(K + rows * stride_kt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASK:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
            if WINDOW:
                keep = keep & (offs_n[None, :] > offs_m[:, None] + offset - window)
            # Every valid row sees key 0 in its first tile, so m_i is finite after it and
            # a row fully masked in a later tile adds exp2(-inf) = 0, never a NaN.
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_ij
            if WINDOW:
                # ...but under a window a row may have seen no key yet: its max stays -inf,
                # and exp2(-inf - -inf) would be NaN. Exponents taken from 0 give P = 0.
                m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(qk - m_use[:, None])
        elif NEGATIVE_SCALE:
            qk = qk * qk_scale
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_ij
            p = tl.math.exp2(qk - m_ij[:, None])
        else:
            # The scale folded into one FMA per score (the Triton tutorial's form): with
            # scale >= 0 the row max of the scaled scores is the scaled row max. This
            # loop is where the forward spends its time, and at D = 64 the softmax's
            # per-score instructions, not the matmuls, set its pace.
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_ij
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = V.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif MASK:
            v = tl.load(V + rows * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        else:
            v = tl.load(V + rows * stride_vt + offs_d[None, :])
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, dropout_p, bh, start_m, start_n, BLOCK_M, BLOCK_N), p, 0.0)
        # P goes into the second matmul in the input dtype, as in FlashAttention.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _window_tiles(start_m, BLOCK_M: tl.constexpr, offset, window, mid, BLOCK_N: tl.constexpr):
    """For the query tile at start_m under a causal window: the first key tile any of its
    rows sees (lo), and the first from which every row sees every key up to mid (full)."""
    lo = tl.maximum(start_m + offset - window + 1, 0) // BLOCK_N * BLOCK_N
    full = tl.cdiv(tl.maximum(start_m + BLOCK_M + offset - window, 0), BLOCK_N) * BLOCK_N
    return lo, tl.maximum(tl.minimum(full, mid), lo)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, Tq, Tk, qk_scale, seed, dropout_p, window,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    NEGATIVE_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    SPLIT_GRID: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """One BLOCK_M tile of queries of one (batch, head). TMA: Q, K and V are (B, H, T, D)
    tensor descriptors, tiles moved by the TMA engine (no per-thread addresses; zero fill
    past T), else pointers with the given strides. GROUP query heads share a key/value head
    (grouped-query attention; 1 for multi-head): head h reads K and V at head h // GROUP."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        # The last query tiles see the most keys: launch them first so that the short
        # ones fill the tail of the schedule (FlashAttention-2 does the same).
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_b, pid_h, bh = _batch_head(H, SPLIT_GRID)
    pid_hk = pid_h // GROUP
    b = pid_b.to(tl.int64)
    h = pid_h.to(tl.int64)
    hk = pid_hk.to(tl.int64)
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * Tq

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    if TMA:
        q = Q.load([pid_b, pid_h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + hk * stride_kh
        V += b * stride_vb + hk * stride_vh
        q = tl.load(Q + offs_m.to(tl.int64)[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key tiles [0, mid) are in bounds and visible to every row of the tile; [mid, hi)
    # need a mask; keys from hi on are above the diagonal for every row and are skipped.
    if CAUSAL:
        offset = Tk - Tq  # absolute position of query 0
        hi = tl.minimum(start_m + BLOCK_M + offset, Tk)
        mid = (start_m + offset + 1) // BLOCK_N * BLOCK_N
    else:
        offset = 0
        hi = Tk
        mid = Tk // BLOCK_N * BLOCK_N
    lo = 0
    if WINDOW:
        # Keys before lo are out of every row's window (skipped); [lo, full) are out of some
        # rows' (masked); [full, mid) are in every row's.
        lo, full = _window_tiles(start_m, BLOCK_M, offset, window, mid, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K, V, stride_kt, stride_vt, pid_b, pid_hk, bh, start_m, offs_m, offs_d, lo, full, Tq,
            Tk, offset, qk_scale, seed, dropout_p, window, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            MASK=True, CAUSAL=CAUSAL, NEGATIVE_SCALE=NEGATIVE_SCALE, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT,
            WINDOW=True,
        )
        lo = full
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kt, stride_vt, pid_b, pid_hk, bh, start_m, offs_m, offs_d, lo, mid, Tq, Tk,
        offset, qk_scale, seed, dropout_p, window, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=False,
        CAUSAL=CAUSAL, NEGATIVE_SCALE=NEGATIVE_SCALE, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT, WINDOW=False,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kt, stride_vt, pid_b, pid_hk, bh, start_m, offs_m, offs_d, mid, hi, Tq, Tk, offset,
        qk_scale, seed, dropout_p, window, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=True, CAUSAL=CAUSAL,
        NEGATIVE_SCALE=NEGATIVE_SCALE, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT, WINDOW=WINDOW,
    )

    o = acc / l_i[:, None]
    if DROPOUT:
        o = o / (1.0 - dropout_p)
    o_ptrs = O + offs_m.to(tl.int64)[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_ok[:, None])
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, Tq,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_GRID: tl.constexpr,
):
    pid_b, pid_h, bh = _batch_head(H, SPLIT_GRID)
    b = pid_b.to(tl.int64)
    h = pid_h.to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    rows = offs_m.to(tl.int64)[:, None]
    # O as stored (rounded to its dtype), like FlashAttention: dO.O is what the chain rule
    # through the stored output gives.
    O += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    o = tl.load(O + rows * stride_ot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + rows * stride_dot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, Q, DO, LSE, DELTA,
    stride_qh, stride_qt, stride_doh, stride_dot, b, h, bh,
    start_n, offs_n, offs_d, lo, hi, Tq, Tk, offset, qk_scale, seed, dropout_p, window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Adds the query tiles [lo, hi) of query heads h, h + 1, ..., h + GROUP - 1 to one
    key tile's dK (unscaled) and dV.

    Works on transposed scores (keys x queries) so that P^T and dS^T feed the matmuls
    directly. Query rows past Tq load zeros and a log-sum-exp of +inf: P = 0 there, so
    they add nothing; MASK applies the causal mask (and with WINDOW the window's). TMA: Q and DO are (B, H, T, D)
    descriptors read at head (b, h), else pointers already at the head, as are LSE and
    DELTA (bh: the head's b * H + h). DROPOUT: dV takes the kept probabilities, dP the
    kept entries scaled by 1 / (1 - dropout_p) (the caller scales dV by it).
    The group's heads run as one loop over (head, query tile), which the compiler
    pipelines as it does one head's (a loop per head, nested, cost the D = 128 tiles
    35-40 registers and spilled).
    """
    span = tl.cdiv(hi - lo, BLOCK_M) * BLOCK_M  # one head's tiles
    for step in range(lo, lo + GROUP * span if GROUP > 1 else hi, BLOCK_M):
        if GROUP > 1:
            g = (step - lo) // span
            start_m = step - g * span
            Qg, DOg, LSEg, DELTAg, hg, bhg = Q, DO, LSE + g * Tq, DELTA + g * Tq, h + g, bh + g
            if not TMA:
                Qg, DOg = Q + g * stride_qh, DO + g * stride_doh
        else:
            start_m = step
            Qg, DOg, LSEg, DELTAg, hg, bhg = Q, DO, LSE, DELTA, h, bh
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        rows = offs_m.to(tl.int64)[:, None]
        if TMA:
            q = Qg.load([b, hg, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            q = tl.load(Qg + rows * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        lse = tl.load(LSEg + offs_m, mask=m_ok, other=float("inf"))
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASK:
            if WINDOW:
                seen = (offs_m[None, :] + offset >= offs_n[:, None]) & (offs_m[None, :] + offset - window < offs_n[:, None])
                pT = tl.where(seen, pT, 0.0)
            else:
                pT = tl.where(offs_m[None, :] + offset >= offs_n[:, None], pT, 0.0)
        if TMA:
            do = DOg.load([b, hg, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            do = tl.load(DOg + rows * stride_dot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        if DROPOUT:
            keepT = _dropout_keep(seed, dropout_p, bhg, start_m, start_n, BLOCK_M, BLOCK_N, TRANSPOSED=True)
            dv = tl.dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(DELTAg + offs_m, mask=m_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            dpT = tl.where(keepT, dpT / (1.0 - dropout_p), 0.0)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, Tq, Tk, scale, qk_scale, seed, dropout_p, window,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    SPLIT_GRID: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUP: tl.constexpr,
    KV_SPLITS: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """One BLOCK_N tile of keys of one (batch, key/value head) against the queries that
    see it, in each of the GROUP query heads that share the head (GROUP is 1 for
    multi-head attention). dK and dV sum over the group in registers: no atomics.
    With KV_SPLITS > 1 the heads of a key/value head's group are split over KV_SPLITS
    programs (H counts these parts; part p reads K and V at head p // KV_SPLITS) and DK,
    DV are fp32 (B, H, Tk, D) partial sums, summed by the launcher.
    TMA: Q and DO (the tiles of the loop) are (B, H * GROUP, T, D) descriptors."""
    # Programs in launch order hold keys 0, BLOCK_N, ...: under a causal mask the first
    # ones see the most queries, which already puts the long programs first.
    pid_n = tl.program_id(0)
    pid_b, pid_part, bpart = _batch_head(H, SPLIT_GRID)
    b = pid_b.to(tl.int64)
    part = pid_part.to(tl.int64)
    hk = (pid_part // KV_SPLITS).to(tl.int64)
    pid_h = pid_part * GROUP  # the first query head of this program's part of the group
    bh = bpart * GROUP
    h = pid_h.to(tl.int64)
    if not TMA:
        Q += b * stride_qb + h * stride_qh
        DO += b * stride_dob + h * stride_doh
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    DK += b * stride_dkb + part * stride_dkh
    DV += b * stride_dvb + part * stride_dvh
    LSE += bh.to(tl.int64) * Tq
    DELTA += bh.to(tl.int64) * Tq

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < Tk
    rows = offs_n.to(tl.int64)[:, None]
    # Keys past Tk load as zeros; their dK, dV rows are computed but never stored.
    k = tl.load(K + rows * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + rows * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        offset = Tk - Tq
        # Queries before lo see none of these keys (skipped); queries from full on see
        # all of them. Tiles from lo up to the first tile start at or past full are masked.
        lo = tl.maximum(start_n - offset, 0)
        if DROPOUT:
            lo = lo // 16 * 16  # _dropout_keep's query tiles start at multiples of 16
        full = tl.maximum(start_n + BLOCK_N - 1 - offset, lo)
        mid = tl.minimum(lo + tl.cdiv(full - lo, BLOCK_M) * BLOCK_M, Tq)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q, DO, LSE, DELTA, stride_qh, stride_qt, stride_doh, stride_dot, pid_b, pid_h, bh,
            start_n, offs_n, offs_d, lo, mid, Tq, Tk, offset, qk_scale, seed, dropout_p, window,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=True, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT,
            GROUP=GROUP, WINDOW=WINDOW,
        )
    else:
        offset = 0
        mid = 0
    stop = Tq
    if WINDOW:
        # Queries from mid see all of these keys until `last`, the first whose window starts
        # past start_n; from last to hi they see some (masked), from hi on none (skipped).
        last = start_n + window - offset
        stop = tl.minimum(mid + tl.maximum(last - mid, 0) // BLOCK_M * BLOCK_M, Tq)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, LSE, DELTA, stride_qh, stride_qt, stride_doh, stride_dot, pid_b, pid_h, bh,
        start_n, offs_n, offs_d, mid, stop, Tq, Tk, offset, qk_scale, seed, dropout_p, window,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=False, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT,
        GROUP=GROUP, WINDOW=False,
    )
    if WINDOW:
        hi = tl.minimum(start_n + BLOCK_N - 1 + window - offset, Tq)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q, DO, LSE, DELTA, stride_qh, stride_qt, stride_doh, stride_dot, pid_b, pid_h, bh,
            start_n, offs_n, offs_d, stop, hi, Tq, Tk, offset, qk_scale, seed, dropout_p, window,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=True, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT,
            GROUP=GROUP, WINDOW=True,
        )

    if DROPOUT:
        dv = dv / (1.0 - dropout_p)
    tl.store(DV + rows * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=n_ok[:, None])
    # dS = P (dP - delta) is the gradient of the scaled scores; the scale enters once here.
    dk = dk * scale
    tl.store(DK + rows * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, K, V,
    stride_kt, stride_vt, b, h, bh,
    start_m, offs_m, offs_d, lo, hi, Tq, Tk, offset, qk_scale, seed, dropout_p, window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Adds the key tiles [lo, hi) to one query tile's dQ (unscaled); bounds, TMA and
    dropout as in the forward and _attn_bwd_dkdv_inner."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)[:, None]
        if MASK:
            n_ok = offs_n < Tk
        if TMA:
            k = K.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = V.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif MASK:
            k = tl.load(K + rows * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(V + rows * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(K + rows * stride_kt + offs_d[None, :])
            v = tl.load(V + rows * stride_vt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
            if WINDOW:
                keep = keep & (offs_n[None, :] > offs_m[:, None] + offset - window)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, dropout_p, bh, start_m, start_n, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, Tq, Tk, scale, qk_scale, seed, dropout_p, window,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    SPLIT_GRID: tl.constexpr,
    DROPOUT: tl.constexpr,
    GROUP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """One BLOCK_M tile of queries of one (batch, head) against the keys it sees (at
    key/value head h // GROUP). TMA: K and V (the tiles of the loop) are (B, H // GROUP,
    T, D) descriptors."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest programs first, as in the forward
    pid_b, pid_h, bh = _batch_head(H, SPLIT_GRID)
    pid_hk = pid_h // GROUP
    b = pid_b.to(tl.int64)
    h = pid_h.to(tl.int64)
    hk = pid_hk.to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    if not TMA:
        K += b * stride_kb + hk * stride_kh
        V += b * stride_vb + hk * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += bh.to(tl.int64) * Tq
    DELTA += bh.to(tl.int64) * Tq

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + rows * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + rows * stride_dot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        offset = Tk - Tq
        hi = tl.minimum(start_m + BLOCK_M + offset, Tk)
        mid = (start_m + offset + 1) // BLOCK_N * BLOCK_N
    else:
        offset = 0
        hi = Tk
        mid = Tk // BLOCK_N * BLOCK_N
    lo = 0
    if WINDOW:  # as in the forward
        lo, full = _window_tiles(start_m, BLOCK_M, offset, window, mid, BLOCK_N)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, K, V, stride_kt, stride_vt, pid_b, pid_hk, bh, start_m, offs_m, offs_d, lo, full, Tq,
            Tk, offset, qk_scale, seed, dropout_p, window, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            MASK=True, CAUSAL=CAUSAL, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT, WINDOW=True,
        )
        lo = full
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K, V, stride_kt, stride_vt, pid_b, pid_hk, bh, start_m, offs_m, offs_d, lo, mid, Tq, Tk,
        offset, qk_scale, seed, dropout_p, window, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=False,
        CAUSAL=CAUSAL, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT, WINDOW=False,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K, V, stride_kt, stride_vt, pid_b, pid_hk, bh, start_m, offs_m, offs_d, mid, hi, Tq, Tk,
        offset, qk_scale, seed, dropout_p, window, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=True,
        CAUSAL=CAUSAL, PRECISION=PRECISION, TMA=TMA, DROPOUT=DROPOUT, WINDOW=WINDOW,
    )
    dq = dq * scale
    tl.store(DQ + rows * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


_OP = "attention"
_REFERENCE = "kernels.reference.attention"
_LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))
_LN2 = 0.6931471805599453  # the kernels' base-2 log-sum-exp times ln(2) is the natural one
# Elements of O (and dO) per delta program: 32 per thread at 4 warps, a few 16-byte loads
# each, so the memory-bound preprocess keeps loads in flight without spilling.
_PRE_ELEMENTS = 4096


class _Launch(NamedTuple):
    BLOCK_M: int  # query rows per tile
    BLOCK_N: int  # keys per tile
    num_warps: int
    num_stages: int
    tma: bool = False  # the tiles moved by TMA descriptors where TMA can address them (Hopper)


class _Settings(NamedTuple):
    fwd: _Launch  # one program per BLOCK_M queries
    dkdv: _Launch  # one program per BLOCK_N keys, looping over BLOCK_M queries
    dq: _Launch  # one program per BLOCK_M queries, looping over BLOCK_N keys


# Per (capability major, head dim), 16-bit inputs. Starting points from the Triton
# fused-attention tutorial and FlashAttention-2, checked offline with ptxas (every entry
# compiles for its target within its shared memory and without register spills), then
# re-tuned with bench_attention --sweep on the GPU:
# - Hopper (sm90, H100/H200; 227 KiB shared memory): 128-row query tiles split over two
#   warpgroups (8 warps, 64 rows each for wgmma), three K/V stages in flight. D=64 and 128
#   by run 5's sweep (H200, T=4096): the D=64 forward on 64-key tiles (378 TFLOP/s against
#   311 on 128), the D=128 one on 128 (434 against 399); dQ on 64-key tiles, 8 warps
#   (+4.5% fwd+bwd at D=64, +7% at 128), at D=128 with K and V by TMA, which beat pointers
#   by 1.9%, 1.1% and 2.7% fwd+bwd at T = 1024, 4096 and 8192 (the only TMA setting ahead
#   at more than one T; it falls back to pointers where a stride is not 16-byte aligned);
#   the D=64 dK/dV on 64-key programs stepping through 32 queries, 4 warps (+11%;
#   (32, 128, 4, 5) measured 1% faster but spills 4 bytes under Triton 3.7). D=16 and 32
#   are untimed.
# - sm8x (A100, and the fallback for anything else): mma.sync over 4 warps (8 at D=128)
#   with fewer stages, as sm86/sm89 have only ~100 KiB of shared memory.
# Backward: dK/dV programs own 128 keys and step through 32 queries, dQ programs the
# transpose (the tutorial's shapes); dK and dV (2 x 128 x D fp32) are what must fit in
# registers, hence 8 warps wherever 4 would spill; 16 warps (FlexAttention's Hopper D=128
# backward tiles in recent torch) cap a thread at 128 registers, and our D=128 dK/dV then
# spills 60 bytes at (32, 128) and 312 at (64, 128) (sm90 build, Triton 3.7). At D=64 on sm8x, 4 warps sit at the 255
# register ceiling: the forward and dQ spill 52 and 20 bytes under Triton 3.8 and 3.9 (none
# under 3.6 and 3.7), so they take 8 warps, which spill under none; Triton 3.6 spills 8-52
# bytes in every pipelined dK/dV setting that steps through 32 queries, so that one steps
# through 16 (none spills under 3.6-3.9). Not yet timed on an A100.
_CONFIGS: dict[tuple[int, int], _Settings] = {
    (9, 16): _Settings(_Launch(128, 128, 8, 3), _Launch(32, 128, 4, 5), _Launch(128, 32, 4, 5)),
    (9, 32): _Settings(_Launch(128, 128, 8, 3), _Launch(32, 128, 4, 5), _Launch(128, 32, 4, 5)),
    (9, 64): _Settings(_Launch(128, 64, 8, 3), _Launch(32, 64, 4, 4), _Launch(128, 64, 8, 3)),
    (9, 128): _Settings(_Launch(128, 128, 8, 3), _Launch(32, 128, 8, 3), _Launch(128, 64, 8, 3, tma=True)),
    (8, 16): _Settings(_Launch(128, 64, 4, 3), _Launch(32, 128, 4, 3), _Launch(128, 32, 4, 3)),
    (8, 32): _Settings(_Launch(128, 64, 4, 3), _Launch(32, 128, 4, 3), _Launch(128, 32, 4, 3)),
    (8, 64): _Settings(_Launch(128, 64, 8, 3), _Launch(16, 128, 8, 3), _Launch(128, 32, 8, 3)),
    (8, 128): _Settings(_Launch(128, 64, 8, 3), _Launch(32, 128, 8, 2), _Launch(128, 32, 8, 2)),
}
# fp32 tiles take twice the shared memory and run as exact fp32 ("ieee") matmuls on CUDA
# cores: small tiles over 8 warps that fit everywhere (on sm90 the D=128 forward still
# spills a little). fp32 on the GPU is for checking, not for speed.
_FP32 = _Settings(_Launch(32, 32, 8, 2), _Launch(16, 32, 8, 2), _Launch(32, 32, 8, 2))
# The interpreter pays per program and per op: small tiles, but unequal ones, so that the
# tests walk the same BLOCK_M != BLOCK_N paths as the GPU configurations.
_INTERPRETER = _Settings(_Launch(32, 16, 4, 1), _Launch(16, 32, 4, 1), _Launch(32, 16, 4, 1))


def _settings(head_dim: int, dtype: torch.dtype, capability: tuple[int, int], dropout: bool = False,
              grouped: bool = False, window: bool = False) -> _Settings:
    """Tiles and launch parameters for one call; capability (0, 0) means the interpreter.
    grouped: grouped-query attention (k and v with fewer heads than q); window: a sliding one."""
    if capability == (0, 0):
        settings = _INTERPRETER
    elif dtype == torch.float32:
        settings = _FP32
    else:
        settings = _CONFIGS[(9 if capability[0] == 9 else 8, head_dim)]
        if (grouped or window) and capability[0] != 9:
            # dK/dV's loop over (head, query tile) near sm8x's 255-register ceiling spills on
            # the table's 32 queries a step (tests/codegen.py: 8 bytes at D = 128 under
            # Triton 3.7, 4 at D = 32 under 3.6): 16, as dropout takes there. So does the
            # window's masked stage (112 bytes at D = 128 under Triton 3.6).
            settings = settings._replace(dkdv=settings.dkdv._replace(BLOCK_M=16))
    return _dropout_settings(settings, head_dim, capability[0] == 9) if dropout else settings


def _dropout_settings(s: _Settings, head_dim: int, hopper: bool) -> _Settings:
    """Dropout draws for 32 keys at a time (_dropout_keep), so key tiles take 32 keys at
    least; and its draws hold registers: the D = 128 forward takes half as many keys, and
    the dK/dV kernels on Hopper, and at D = 128 on Ampere, step through half as many
    queries, as those settings spill otherwise (4-28 bytes under Triton 3.6-3.9;
    tests/codegen.py). Untimed."""
    fwd_keys = s.fwd.BLOCK_N // 2 if head_dim == 128 else s.fwd.BLOCK_N
    dkdv_queries = max(16, s.dkdv.BLOCK_M // 2) if hopper or head_dim == 128 else s.dkdv.BLOCK_M
    return _Settings(s.fwd._replace(BLOCK_N=max(32, fwd_keys)),
                     s.dkdv._replace(BLOCK_M=dkdv_queries, BLOCK_N=max(32, s.dkdv.BLOCK_N)),
                     s.dq._replace(BLOCK_N=max(32, s.dq.BLOCK_N)))


def _precision(dtype: torch.dtype) -> str | None:
    # tl.dot would round fp32 inputs to tf32; for 16-bit inputs, the backend's default.
    return "ieee" if dtype == torch.float32 else None


# CUDA caps grid axes 1 and 2 at 65535 programs, which B * H passes at short T (4096
# sequences x 16 heads): the grid is then (tiles, H, B), not (tiles, B * H). Only then, as
# dividing by H is what the sm80 dQ at D = 64 fits in 128 registers with (2 programs per
# SM; with the split grid everywhere it took 140, one program).
_MAX_GRID_AXIS = 65535
# Dropout seeds stay below 2^31 so that the kernels see one integer type (Triton
# specialises an int argument as 32- or 64-bit by its value).
_MAX_SEED = 1 << 31


def _dropout_step(dropout_p: float) -> float:
    """dropout_p to the nearest multiple of 2^-16 below 1, the steps the kernels' 16-bit
    draws resolve (_dropout_keep); the kept scores are scaled by this p's 1 / (1 - p), so
    the output's expectation stays exact."""
    return min(round(dropout_p * 65536), 65535) / 65536


def _dkdv_slots(device: torch.device) -> int:
    """dK/dV programs that keep a GPU busy: two an SM (0 in the interpreter, whose programs
    run one at a time)."""
    return 2 * sm_count(device.index or 0) if device.type == "cuda" else 0


def _group_splits(group: int, programs: int, slots: int) -> int:
    """Parts to split each group of query heads into for dK/dV: 1 (a program walks the whole
    group) unless that leaves fewer programs than slots -- multi-query attention at a small
    batch: 16 query heads on one key/value head, B * T = 16384, T = 16384, makes 128
    programs of 16 heads each, where multi-head attention makes 2048. Then the fewest parts
    (a divisor of the group) that fill the slots, each summing into fp32 slices of dK and dV
    that are added after (FlashAttention-2 writes one per query head). Untimed."""
    if group == 1 or programs >= slots:
        return 1
    return next((s for s in range(2, group) if group % s == 0 and programs * s >= slots), group)


def _grid(tiles: int, B: int, H: int) -> tuple[int, ...]:
    return (tiles, H, B) if B * H > _MAX_GRID_AXIS else (tiles, B * H)


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, seed: int, enable_gqa: bool,
           window: int | None = None) -> None:
    check_inputs(_OP, _REFERENCE, q=q, k=k, v=v)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{_OP}: window must be a positive int (keys a query sees, itself included) or None, "
                             f"got {window!r}")
        if not causal:
            raise ValueError(f"{_OP}: window is a causal sliding window; pass causal=True (or window=None)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"{_OP}: seed must be an int in [0, 2^31), got {seed!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{_OP}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim")
    Hq, Hk = q.shape[1], k.shape[1]
    if Hq != Hk and not enable_gqa:
        raise ValueError(f"{_OP}: q has {Hq} heads and k {Hk}; they must agree, or pass enable_gqa=True "
                         f"(grouped-query attention, as in SDPA)")
    if Hq != Hk and (Hk == 0 or Hq % Hk):
        raise ValueError(f"{_OP}: grouped-query attention needs q's heads ({Hq}) to be a multiple of k's ({Hk})")
    D, Tq, Tk = q.shape[3], q.shape[2], k.shape[2]
    if D not in HEAD_DIMS:
        raise ValueError(
            f"{_OP}: head dim {D} is not supported; the kernel takes 16, 32, 64 or 128 (else use {_REFERENCE})"
        )
    if causal and Tq > Tk:
        raise ValueError(
            f"{_OP}: causal attention needs Tq <= Tk (queries are the last Tq of Tk positions), got Tq={Tq}, Tk={Tk}"
        )
    if Tk == 0 and Tq > 0:
        raise ValueError(f"{_OP}: k and v have no positions (Tk = 0) for {Tq} queries")
    if q.shape[0] > _MAX_GRID_AXIS or q.shape[1] > _MAX_GRID_AXIS:
        raise ValueError(f"{_OP}: batch {q.shape[0]} and heads {q.shape[1]} must each be at most {_MAX_GRID_AXIS} "
                         f"(CUDA's grid limit); split the batch")
    if q.shape[0] * q.shape[1] >= 2**31:  # the kernels number (batch, head) pairs in int32
        raise ValueError(f"{_OP}: batch x heads ({q.shape[0]} x {q.shape[1]}) must be below 2^31; split the batch")
    # Positions are int32 and run up to a tile past T: from a tile short of 2^31 they wrapped
    # (the key loop's counter, rows stored at negative positions). 2^30 leaves room.
    if max(Tq, Tk) >= 2**30:
        raise ValueError(f"{_OP}: Tq={Tq} and Tk={Tk} must be below 2^30 (the kernels index positions in int32); "
                         f"use {_REFERENCE}")


def _unit_stride(t: Tensor) -> Tensor:
    """t itself when its last dim is contiguous (any other strides go to the kernel), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _descriptors(tma: bool, *tensors: tuple[Tensor, int]) -> list[TensorDescriptor | None]:
    """TMA descriptors over (B, H, T, D) tensors read in (1, 1, rows, D) tiles, for each
    (tensor, rows) -- or all None, unless `tma` and TMA can address every one of them
    (start and strides 16-byte aligned; a broadcast stride of 0 cannot be described)."""
    if not tma or not all(_tma_addressable(t) for t, _ in tensors):
        return [None] * len(tensors)
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[3]]) for t, rows in tensors]


def _tma_addressable(t: Tensor) -> bool:
    """TMA can address t (B, H, T, D): start and strides 16-byte aligned; a broadcast
    stride of 0 cannot be described."""
    return t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:3])


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _window(window: int | None, Tk: int) -> int:
    """The window the kernels apply, 0 for none: one of Tk keys or more masks nothing a causal
    mask leaves, and takes the kernels without the window's masks."""
    return 0 if window is None or window >= Tk else window


@on_input_device
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, dropout_p: float, seed: int,
                   enable_gqa: bool, window: int | None = None):
    """o (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32 in base 2, the q/k/v used, the scale."""
    _check(q, k, v, causal, dropout_p, seed, enable_gqa, window)
    window = _window(window, k.shape[2])
    dropout_p = _dropout_step(dropout_p)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    # (B, Tq, H, D) in memory, like FlashAttention's output: the model's o.transpose(1, 2)
    # back to (B, T, C) is then a view, not a copy.
    o = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse, q, k, v, scale
    cfg = _settings(D, q.dtype, device_capability(q.device.index or 0), dropout_p > 0, H != k.shape[1], window > 0).fwd
    grid = _grid(cdiv(Tq, cfg.BLOCK_M), B, H)
    split = len(grid) == 3
    descriptors = _descriptors(cfg.tma, (q, cfg.BLOCK_M), (k, cfg.BLOCK_N), (v, cfg.BLOCK_N))
    tma = descriptors[0] is not None
    _attn_fwd_kernel[grid](
        *(descriptors if tma else (q, k, v)), o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Tq, Tk, scale * _LOG2E, seed, dropout_p, window,
        HEAD_DIM=D, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, CAUSAL=causal, NEGATIVE_SCALE=scale < 0, SPLIT_GRID=split,
        PRECISION=_precision(q.dtype), TMA=tma, DROPOUT=dropout_p > 0, GROUP=H // k.shape[1], WINDOW=window > 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse, q, k, v, scale


@on_input_device
def _attention_bwd(
    do: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, scale: float,
    dropout_p: float, seed: int, dlse: Tensor | None = None, window: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the dtypes (and, where dense, the layouts) of q, k, v. do: None where
    only the log-sum-exp was used; dlse: the gradient of the base-2 lse, None if unused."""
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    window = _window(window, Tk)
    do = torch.zeros_like(o) if do is None else _unit_stride(do.to(o.dtype))
    dropout_p = _dropout_step(dropout_p)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dk.numel() == 0:
        return dq, dk, dv
    if q.numel() == 0:  # no queries: nothing flows back to the keys
        return dq, dk.zero_(), dv.zero_()
    settings = _settings(D, q.dtype, device_capability(q.device.index or 0), dropout_p > 0, H != Hk, window > 0)
    precision = _precision(q.dtype)
    split = B * H > _MAX_GRID_AXIS
    delta = torch.empty_like(lse)
    pre_rows = _PRE_ELEMENTS // D
    _attn_bwd_preprocess_kernel[_grid(cdiv(Tq, pre_rows), B, H)](
        o, do, delta, *_strides(o), *_strides(do), H, Tq,
        HEAD_DIM=D, BLOCK_M=pre_rows, SPLIT_GRID=split, num_warps=4,
    )
    if dlse is not None:
        # The natural lse's gradient wrt a (scaled) score is its probability P: dS gains
        # P * dlse_e, i.e. delta loses dlse_e = dlse_2 * log2(e) (FlashAttention's trick).
        delta.sub_(dlse * _LOG2E)
    cfg = settings.dkdv
    q_tiles, do_tiles = _descriptors(cfg.tma, (q, cfg.BLOCK_M), (do, cfg.BLOCK_M))
    tiles = cdiv(Tk, cfg.BLOCK_N)
    splits = _group_splits(H // Hk, tiles * B * Hk, _dkdv_slots(q.device))
    # A program per key tile of a key/value head, or of a part of its group of query heads.
    grid = _grid(tiles, B, Hk * splits)
    dk_out, dv_out = (dk, dv) if splits == 1 else (
        torch.empty((B, Hk * splits, Tk, D), dtype=torch.float32, device=q.device) for _ in range(2))
    _attn_bwd_dkdv_kernel[grid](
        q_tiles or q, k, v, do_tiles or do, dk_out, dv_out, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk_out), *_strides(dv_out),
        Hk * splits, Tq, Tk, scale, scale * _LOG2E, seed, dropout_p, window,
        HEAD_DIM=D, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, CAUSAL=causal, PRECISION=precision,
        SPLIT_GRID=len(grid) == 3, TMA=q_tiles is not None, DROPOUT=dropout_p > 0, GROUP=H // Hk // splits,
        KV_SPLITS=splits, WINDOW=window > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:  # the parts' fp32 sums, rounded once
        dk.copy_(dk_out.unflatten(1, (Hk, splits)).sum(2))
        dv.copy_(dv_out.unflatten(1, (Hk, splits)).sum(2))
    cfg = settings.dq
    k_tiles, v_tiles = _descriptors(cfg.tma, (k, cfg.BLOCK_N), (v, cfg.BLOCK_N))
    _attn_bwd_dq_kernel[_grid(cdiv(Tq, cfg.BLOCK_M), B, H)](
        q, k_tiles or k, v_tiles or v, do, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, Tq, Tk, scale, scale * _LOG2E, seed, dropout_p, window,
        HEAD_DIM=D, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, CAUSAL=causal, PRECISION=precision, SPLIT_GRID=split,
        TMA=k_tiles is not None, DROPOUT=dropout_p > 0, GROUP=H // Hk, WINDOW=window > 0, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, dropout_p: float, seed: int | None,
        enable_gqa: bool, window: int | None,
    ) -> tuple[Tensor, Tensor]:
        """o and the base-2 log-sum-exp (B, H, Tq), fp32."""
        seed = _seed(seed, dropout_p)
        o, lse, q, k, v, scale = _attention_fwd(q, k, v, causal, scale, dropout_p, seed, enable_gqa, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed, ctx.window = causal, scale, dropout_p, seed, window
        ctx.set_materialize_grads(False)  # an unused lse's gradient stays None, not zeros to add
        return o, lse

    @staticmethod
    def backward(ctx, do: Tensor | None, dlse: Tensor | None):
        refuse_double_backward("attention")
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed, dlse,
                                    ctx.window)
        return dq, dk, dv, None, None, None, None, None, None


# Eager calls go through torch.compiler.disable: where Dynamo runs the public function's
# frame eagerly (it marks a frame to skip after an error in it, e.g. eager's ValueError
# while tracing), it would otherwise trace the launches below it (see kernels/__init__.py).
_attention_apply = torch.compiler.disable(AttentionFunction.apply)


def _seed(seed: int | None, dropout_p: float) -> int:
    """seed, or one from torch's CPU generator (torch.manual_seed repeats it, and no GPU sync)."""
    if seed is None:
        return int(torch.randint(_MAX_SEED, (), dtype=torch.int64)) if dropout_p else 0
    return seed


# Under torch.compile the launches run as custom ops, as in kernels/layer_norm.py. The
# dropout seed is a CPU tensor, drawn by an op of its own (_dropout_seed_op) from the
# generator eager draws from, and kept for the backward (empty without dropout). That op
# is tagged nondeterministic_seeded: where the forward is recomputed for the backward
# (torch.utils.checkpoint under torch.compile), AOTAutograd replays the CPU generator's
# state around it and the recomputed mask is the forward's; drawn inside the attention
# op, the recomputation drew a new seed and gave wrong gradients. With dropout, forward
# and backward are ops of their own, tagged cudagraph_unsafe (as is the draw): replayed
# in a CUDA graph (mode="reduce-overhead"), the forward would repeat the first step's
# mask, the backward redraw the first step's, so Inductor leaves them out of its graphs.
def _attention_impl(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, dropout_p: float, seed: int | None,
    enable_gqa: bool, window: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    seed = _seed(seed, dropout_p)
    o, lse, *_ = _attention_fwd(q, k, v, causal, scale, dropout_p, seed, enable_gqa, window)
    return o, lse, torch.tensor(seed) if dropout_p else _no_seed(q)


def _attention_dropout_impl(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, dropout_p: float, seed: Tensor,
    enable_gqa: bool, window: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    o, lse, *_ = _attention_fwd(q, k, v, causal, scale, dropout_p, int(seed), enable_gqa, window)
    return o, lse, seed.clone()  # an op's output may not alias its input


def _dropout_seed_impl(cpu: Tensor) -> Tensor:
    """A seed from torch's CPU generator, as eager draws it. `cpu`, an empty CPU tensor,
    tells AOTAutograd which generator's state to replay when it recomputes the draw."""
    return torch.tensor(_seed(None, 1.0))


def _dropout_seed_fake(cpu: Tensor) -> Tensor:
    return cpu.new_empty(())


def _attention_fake(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, dropout_p: float,
                    seed: int | None, enable_gqa: bool, window: int | None) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Tq, D = q.shape
    o = q.new_empty((B, Tq, H, D)).transpose(1, 2)
    seed = torch.empty((), dtype=torch.int64) if dropout_p else _no_seed(q)
    return o, q.new_empty((B, H, Tq), dtype=torch.float32), seed


def _no_seed(q: Tensor) -> Tensor:
    return q.new_empty(0, dtype=torch.int64)


def _attention_backward_impl(
    do: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, scale: float,
    dropout_p: float, seed: Tensor, dlse: Tensor | None, window: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    return _attention_bwd(do, q, k, v, o, lse, causal, scale, dropout_p, int(seed) if dropout_p else 0, dlse, window)


def _attention_backward_fake(do: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                             scale: float, dropout_p: float, seed: Tensor, dlse: Tensor | None, window: int | None,
                             ) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(_unit_stride(t)) for t in (q, k, v))


def _attention_setup(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, causal, scale, dropout_p, _, _, window = inputs
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.dropout_p, ctx.window = causal, dropout_p, window
    ctx.scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    ctx.set_materialize_grads(False)  # an unused lse's gradient stays None, compiled too: nothing to subtract


def _attention_backward(ctx, do: Tensor | None, dlse: Tensor | None, _dseed: Tensor) -> tuple:
    q, k, v, o, lse, seed = ctx.saved_tensors
    op = _attention_dropout_backward_op if ctx.dropout_p else _attention_backward_op
    dq, dk, dv = op(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.dropout_p, seed, dlse, ctx.window)
    return dq, dk, dv, None, None, None, None, None, None


def _custom_op(name: str, impl, fake, unsafe_in_cuda_graphs: bool = False, tags: tuple = ()) -> torch.library.CustomOpDef:
    if unsafe_in_cuda_graphs and hasattr(torch.Tag, "cudagraph_unsafe"):
        tags += (torch.Tag.cudagraph_unsafe,)
    op = torch.library.custom_op(f"tritongpt::{name}", impl, mutates_args=(), tags=tags)
    op.register_fake(fake)
    return op


_attention_op = _custom_op("attention", _attention_impl, _attention_fake)
_attention_dropout_op = _custom_op(
    "attention_dropout", _attention_dropout_impl, _attention_fake, unsafe_in_cuda_graphs=True
)
_dropout_seed_op = _custom_op("dropout_seed", _dropout_seed_impl, _dropout_seed_fake, unsafe_in_cuda_graphs=True,
                              tags=(torch.Tag.nondeterministic_seeded,))
_attention_backward_op = _custom_op("attention_backward", _attention_backward_impl, _attention_backward_fake)
_attention_dropout_backward_op = _custom_op(
    "attention_dropout_backward", _attention_backward_impl, _attention_backward_fake, unsafe_in_cuda_graphs=True
)
_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)
_attention_dropout_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
    dropout_p: float = 0.0, seed: int | None = None, enable_gqa: bool = False, return_lse: bool = False,
    window: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention, flash style; q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D).

    Same result as F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
    dropout_p=dropout_p, enable_gqa=enable_gqa), except that a causal mask with Tq < Tk is aligned to the end
    (query i is position Tk - Tq + i), as kernels.reference.attention; causal needs
    Tq <= Tk. scale defaults to 1/sqrt(D). D must be 16, 32, 64 or 128; any T >= 1.

    dropout_p in [0, 1) zeroes each attention probability with that chance and scales the
    kept ones by 1 / (1 - dropout_p); p is rounded to a multiple of 2^-16. The mask is never stored: the backward redraws it
    from `seed` (an int in [0, 2^31); default: drawn from torch's CPU generator, so
    torch.manual_seed makes runs repeat). Pass 0.0 outside training, as with SDPA.

    fp16 or bf16 on CUDA (fp32 works too, as exact but slow fp32 matmuls); CPU tensors only
    under TRITON_INTERPRET=1.

    enable_gqa: grouped-query (or multi-query) attention, as SDPA's flag: k and v have
    H // G heads, each shared by G consecutive query heads (query head h reads key/value
    head h // G), with no copy of k and v; dk and dv sum over each group's query heads.

    return_lse: also return each query's log-sum-exp of its scaled scores, (B, H, Tq) fp32,
    natural log (before dropout), as FlashAttention and FlexAttention return it -- what
    merging attention over chunks of keys needs (ring attention, split KV caches). It is
    differentiable too: its gradient enters the backward as a correction to rowsum(dO O).

    window: a causal sliding window (Mistral's and Gemma's sliding_window, FlashAttention's
    window_size=(window - 1, 0)): each query sees its `window` latest keys, itself
    included. Key tiles out of every row's window are skipped, not masked, so the work falls
    from ~T^2 / 2 to ~T * window. Needs causal=True.

    Inputs may be strided views (the model passes slices of one
    fused QKV projection): only a non-unit stride in the last dim costs a copy. The output
    is laid out as (B, Tq, H, D) in memory, so output.transpose(1, 2) is contiguous.
    Differentiable in q, k and v.
    """
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = int(seed)  # a numpy integer too; anything else _check refuses
    if torch.compiler.is_compiling():
        scale = None if scale is None else float(scale)  # eager's float(scale): a numpy float, a 0-d tensor
        # eager's ValueError, while tracing
        _check(q, k, v, causal, dropout_p, 0 if seed is None else seed, bool(enable_gqa), window)
        if not dropout_p:
            o, lse, _ = _attention_op(q, k, v, bool(causal), scale, 0.0, seed, bool(enable_gqa), window)
        else:
            drawn = _dropout_seed_op(torch.empty(0, dtype=torch.int64)) if seed is None else torch.tensor(seed)
            o, lse, _ = _attention_dropout_op(q, k, v, bool(causal), scale, float(dropout_p), drawn, bool(enable_gqa),
                                              window)
    else:
        o, lse = _attention_apply(q, k, v, bool(causal), scale, float(dropout_p), seed, bool(enable_gqa), window)
    return (o, lse * _LN2) if return_lse else o
