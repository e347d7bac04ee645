"""Decode attention in Triton: one new query per sequence against its KV cache (flash-decoding).

    decode_attention(q, k_cache, v_cache, seq_lens, scale)[b, h]
        == softmax(q[b, h] . k_cache[b, h, :L]^T * scale) . v_cache[b, h, :L],  L = seq_lens[b]

Forward only: it serves generation, where nothing is differentiated, so there is no
autograd.Function and no statistic is saved.

A single query row leaves a GPU idle if one program walks all keys of a (batch, head), so
the key axis is cut into NUM_SPLITS contiguous chunks (Dao et al., "Flash-Decoding"), one
launch, grid (B*H, NUM_SPLITS):
  1. each program folds its chunk, BLOCK_N keys at a time, into a running max, sum and
     weighted value sum -- an online softmax in fp32 with exp2, log2(e) folded into the
     scale -- and writes the partial (m, l, acc) to fp32 scratch. The query is one row, so
     q.k is an elementwise product and a row sum, not a tl.dot; the kernel is bound by
     reading the cache, not by arithmetic.
  2. the last program of a (batch, head) to finish, as counted by an atomic counter,
     merges its splits by log-sum-exp and writes the output in the input dtype, then
     zeroes the counter for the next call. A second combine launch did this before: at
     batch 1 on an H200 it took 21 us of a 124M decode step's ~470, 12 launches.
seq_lens is read on the device: chunks wholly beyond a sequence's length return at once
and are neither counted nor combined. NUM_SPLITS, BLOCK_N and the scratch
depend only on the shapes and the GPU's SM count, never on the lengths, so the call never
synchronises with the host and can be captured in a CUDA graph and replayed as the
lengths grow in place.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._utils import HEAD_DIMS, cdiv, check_inputs, interpreting, next_power_of_2, on_input_device, sm_count

MAX_SPLITS = 64
# K and V tiles in flight per program (shared memory: 2 x BLOCK_N x D x 2 bytes = 16 KiB a stage).
_STAGES = 3


@triton.jit
def _decode_attention_kernel(
    Q, K, V, K_NEW, V_NEW, SEQ_LENS, M, L, ACC, COUNTERS, O,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_knb, stride_knh, stride_knd,
    stride_vnb, stride_vnh, stride_vnd,
    stride_ob, stride_oh, stride_od,
    H, S, chunk, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_NEW: tl.constexpr,
    STAGES: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Split `program_id(1)` of query head (b, h) = divmod(program_id(0), H); the head reads
    the caches (and K_NEW, V_NEW) at key/value head h // GROUP (grouped-query attention;
    GROUP = 1 for multi-head)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    # Clamped so that a bad length can never read outside the cache: the launcher cannot
    # check values it would have to copy to the host to see.
    seq_len = tl.minimum(tl.maximum(tl.load(SEQ_LENS + b), 0), S).to(tl.int32)
    start = split * chunk
    offs_d = tl.arange(0, HEAD_DIM)
    out = O + b.to(tl.int64) * stride_ob + (bh % H).to(tl.int64) * stride_oh + offs_d * stride_od
    if start >= seq_len:
        if (split == 0) & (seq_len == 0):  # no keys at all: zeros rather than 0/0
            tl.store(out, tl.zeros([HEAD_DIM], dtype=O.dtype.element_ty))
        return
    end = tl.minimum(start + chunk, seq_len)

    b = b.to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    # int64: q, the caches and the new key and value take any strides, and d times a head-dim
    # stride passes 2^31 where D is the outer dim of a tensor of 2^31 elements or more.
    d64 = offs_d.to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + d64 * stride_qd).to(tl.float32)
    q = q * qk_scale  # scores come out in log2 units, ready for exp2
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    if HAS_NEW:
        # This step's key and value belong at position seq_len - 1: the tiles below use the
        # register copy in place of that row, and the split that covers it stores it after
        # its loop (a store before the loads would race with them across threads).
        pos = seq_len - 1
        k_new = tl.load(K_NEW + b * stride_knb + hk * stride_knh + d64 * stride_knd).to(K.dtype.element_ty)
        v_new = tl.load(V_NEW + b * stride_vnb + hk * stride_vnh + d64 * stride_vnd).to(V.dtype.element_ty)

    # 0-d fp32 running max and sum; the first tile always holds a valid key (start < end),
    # so m_i is finite after it and alpha = exp2(-inf) = 0 wipes the empty initial state.
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    # Pipelined: a plain loop whose loads feed no tl.dot is not, and a batch-32 step walks
    # chunks of several tiles per program.
    for start_n in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        rows = offs_n.to(tl.int64)[:, None]
        # Both tiles are requested before either is used: more bytes in flight per program.
        k = tl.load(K + rows * stride_ks + d64[None, :] * stride_kd, mask=n_ok[:, None], other=0.0)
        v = tl.load(V + rows * stride_vs + d64[None, :] * stride_vd, mask=n_ok[:, None], other=0.0)
        if HAS_NEW:
            is_new = (offs_n == pos)[:, None]
            k = tl.where(is_new, k_new[None, :], k)
            v = tl.where(is_new, v_new[None, :], v)
        qk = tl.sum(q[None, :] * k.to(tl.float32), 1)
        qk = tl.where(n_ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        p = tl.math.exp2(qk - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new

    if HAS_NEW:
        # One head of a group writes the shared row (the others use the register copy).
        if (pos >= start) & (pos < end) & (h % GROUP == 0):
            tl.store(K + pos.to(tl.int64) * stride_ks + d64 * stride_kd, k_new)
            tl.store(V + pos.to(tl.int64) * stride_vs + d64 * stride_vd, v_new)
    num_splits = tl.num_programs(1)
    part = bh.to(tl.int64) * num_splits + split
    tl.store(M + part, m_i)
    tl.store(L + part, l_i)
    tl.store(ACC + part * HEAD_DIM + offs_d, acc)

    # Every thread's stores before the count (the atomic is one thread's, acq_rel at GPU
    # scope): the program that counts last sees all splits' partials.
    tl.debug_barrier()
    active = tl.cdiv(seq_len, chunk)
    if tl.atomic_add(COUNTERS + bh, 1, sem="acq_rel") == active - 1:
        tl.store(COUNTERS + bh, 0)
        offs_s = tl.arange(0, SPLITS_P2)
        s_ok = offs_s < active
        first = bh.to(tl.int64) * num_splits
        # .cg: from L2, where the other programs' partials are; this SM's L1 may hold a
        # previous call's.
        parts_m = tl.load(M + first + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        parts_l = tl.load(L + first + offs_s, mask=s_ok, other=0.0, cache_modifier=".cg")
        parts_acc = tl.load(ACC + (first + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None],
                            other=0.0, cache_modifier=".cg")
        w = tl.math.exp2(parts_m - tl.max(parts_m, 0))
        o = tl.sum(w[:, None] * parts_acc, 0) / tl.sum(w * parts_l, 0)
        tl.store(out, o.to(O.dtype.element_ty))


_COUNTERS: dict[torch.device, list[Tensor]] = {}


def _counters(device: torch.device, n: int) -> Tensor:
    """n zeroed int32 split counters on device, kept between calls: each call leaves them
    at zero. Allocated outside any CUDA-graph capture when the caller warms up first (as
    the docstring asks); two streams must not decode at once on one device. Outgrown
    buffers are kept, never freed: a captured graph still holds their address."""
    kept = _COUNTERS.setdefault(device, [])
    if not kept or kept[-1].numel() < n:
        kept.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return kept[-1]


def _settings(B: int, H: int, S: int, D: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, chunk, NUM_SPLITS, num_warps) from the shapes and the SM count only.

    BLOCK_N keeps a (BLOCK_N, D) tile at 4096 elements (32 fp32 registers a thread for each
    of K and V with 4 warps). Splits aim at 4 programs an SM over all (batch, head) pairs --
    enough loads in flight to stream the cache at full bandwidth -- but never below one
    tile a split, and at most MAX_SPLITS, so that the combine holds all partials of a
    (batch, head) in one (splits, D) tile without spilling. Chunk is rounded to whole tiles
    and the split count recomputed so that no split starts beyond the cache.
    """
    if interpreting():
        # The interpreter pays per program and per op: few splits, small tiles.
        block_n, target_splits, num_warps = 16, 2, 1
    else:
        block_n = max(16, min(128, 4096 // D))
        programs = 4 * sm_count(device.index)
        target_splits, num_warps = cdiv(programs, B * H), 4
    n_tiles = cdiv(S, block_n)
    splits = max(1, min(target_splits, n_tiles, MAX_SPLITS))
    chunk = cdiv(n_tiles, splits) * block_n
    return block_n, chunk, cdiv(S, chunk), num_warps


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor,
           k_new: Tensor | None, v_new: Tensor | None, enable_gqa: bool) -> None:
    op, ref = "decode_attention", "kernels.reference.decode_attention"
    check_inputs(op, ref, q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: give both k_new and v_new, or neither")
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be (B, H, D), got shape {tuple(q.shape)}")
    B, H, D = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4 or (t.shape[0], t.shape[3]) != (B, D):
            raise ValueError(f"{op}: {name} must be (B, H, S, D) = ({B}, {H}, S, {D}) to match q, got {tuple(t.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    Hk = k_cache.shape[1]
    if Hk != H and not enable_gqa:
        raise ValueError(f"{op}: k_cache must be (B, H, S, D) = ({B}, {H}, S, {D}) to match q, got "
                         f"{tuple(k_cache.shape)}; or pass enable_gqa=True (grouped-query attention)")
    if Hk != H and (Hk == 0 or H % Hk):
        raise ValueError(f"{op}: grouped-query attention needs q's heads ({H}) to be a multiple of the caches' ({Hk})")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is not None and t.shape != (B, Hk, D):
            raise ValueError(f"{op}: {name} must have shape {(B, Hk, D)} (q's batch and head dim, the caches' "
                             f"heads), got {tuple(t.shape)}")
    if k_cache.shape[2] == 0:
        raise ValueError(f"{op}: the cache has no positions (S = 0)")
    # Positions are int32 and a split's end runs up to a chunk past S: from 2^31 lengths
    # wrapped, and the splits' ends and tile counters from a few tiles short of it. 2^30
    # leaves room.
    if k_cache.shape[2] >= 2**30:
        raise ValueError(f"{op}: the cache's {k_cache.shape[2]} positions must be fewer than 2^30 "
                         f"(the kernel indexes positions in int32)")
    if D not in HEAD_DIMS:
        raise ValueError(f"{op}: head dim {D} is not supported; use one of {HEAD_DIMS}")
    if not isinstance(seq_lens, Tensor):
        raise ValueError(f"{op}: seq_lens must be a torch.Tensor, got {type(seq_lens).__name__}")
    if seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: seq_lens has dtype {seq_lens.dtype}; use int32 or int64")
    if seq_lens.shape != (B,):
        raise ValueError(f"{op}: seq_lens must be ({B},), got shape {tuple(seq_lens.shape)}")
    if seq_lens.device != q.device:
        raise ValueError(f"{op}: seq_lens is on {seq_lens.device} but q on {q.device}; keep it on the device")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k_new, v_new)):
        raise ValueError(f"{op}: the kernel is forward-only (no autograd); call it under torch.no_grad(), "
                         f"or use kernels.reference.{op} for gradients")


@on_input_device
def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, scale: float | None,
                      k_new: Tensor | None, v_new: Tensor | None, enable_gqa: bool) -> Tensor:
    _check(q, k_cache, v_cache, seq_lens, k_new, v_new, enable_gqa)
    B, H, D = q.shape
    S = k_cache.shape[2]
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    if B * H == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_n, chunk, splits, num_warps = _settings(B, H, S, D, q.device)
    # Scratch never needs clearing: the combine reads only the splits that wrote.
    m = torch.empty(B * H, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * H, splits, D, device=q.device, dtype=torch.float32)
    seq_lens = seq_lens.contiguous()
    has_new = k_new is not None
    k_new = q if k_new is None else k_new  # never read without HAS_NEW
    v_new = q if v_new is None else v_new
    _decode_attention_kernel[(B * H, splits)](
        q, k_cache, v_cache, k_new, v_new, seq_lens, m, l, acc, _counters(q.device, B * H), out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(), *out.stride(),
        H, S, chunk, scale * math.log2(math.e),
        HEAD_DIM=D, BLOCK_N=block_n, HAS_NEW=has_new, STAGES=_STAGES, SPLITS_P2=next_power_of_2(splits),
        GROUP=H // k_cache.shape[1], num_warps=num_warps,
    )
    return out


@torch.compiler.disable  # see kernels/__init__.py
def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, scale: float | None = None,
    k_new: Tensor | None = None, v_new: Tensor | None = None, enable_gqa: bool = False,
) -> Tensor:
    """Attention of one new query per sequence over its cached keys and values.

    q (B, H, D), any strides; k_cache and v_cache (B, H, S, D), any strides (contiguous is
    fastest); float16, bfloat16 or float32, one dtype, on one CUDA device (or CPU under
    TRITON_INTERPRET=1). D in {16, 32, 64, 128}. seq_lens (B,) int32/int64 on the same
    device: sequence b sees cache positions [0, seq_lens[b]), its new token included.
    Lengths are clamped to [0, S] on the device; a length of 0 gives zeros (the reference
    gives NaN). scale defaults to 1/sqrt(D). Returns (B, H, D) in q's dtype.

    k_new, v_new (B, H, D), optional: this step's key and value, written into the caches
    at position seq_lens[b] - 1 by the kernel itself (saving a scatter per cache) and
    attended to like the rest; a length of 0 writes nothing.

    enable_gqa: grouped-query attention, as SDPA's flag: the caches (and k_new, v_new) may
    have H // G heads, query head h reading head h // G. Each query head is still a
    program of its own, which reads its group's cache (from L2 where the group's
    programs run together, as they are launched side by side).

    Forward only (inference), so no autograd. No host synchronisation: with fixed shapes
    the call can be captured in a CUDA graph (call it once before capturing, so Triton
    compiles outside the capture) and replayed after seq_lens is updated in place.
    """
    return _decode_attention(q, k_cache, v_cache, seq_lens, scale, k_new, v_new, enable_gqa)
