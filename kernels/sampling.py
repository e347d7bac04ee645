"""Top-k sampling in Triton: a few kernels draw the next token of every row of logits.

    sample(logits, seed, offsets, temperature, top_k)[b]
        ~ Categorical(softmax(logits[b] / temperature) restricted to its top_k largest logits)

torch's way (topk, softmax, multinomial) is about 50 small kernels a token, ~90 us of
device time at batch 1 on an H200 (bench_sampling). Here each row is cut into chunks of
CHUNK logits, one program each, so that a single row still spreads over many SMs (one
program a row took 54-63 us: a row is too much work for one SM), and four launches do it:
  1. _stats: each chunk's max, and sum and count of finite logits;
  2. _window_counts: from all chunks' stats, the row's max m and mean; for the windows
     [m - f (m - mean), m], f = 2^-6, 2^-5 ... 1, plus one holding every logit, how many
     of the chunk's logits each holds;
  3. _compact: the narrowest window holding k logits in the row; the chunk writes its
     (key, index) pairs in it to the row's scratch, after those of the chunks before it --
     typically a few times k candidates in all;
  4. _draw, one program a row: the exact k-th largest candidate, by bisection over unsigned
     32-bit keys that sort like the floats (in registers when the candidates fit
     CANDIDATES; ties are kept: every logit >= it survives, as with
     gpt.generate.filter_logits), then the Gumbel-max trick: argmax over kept i of
     (logits[i] - max) / temperature + Gumbel noise is an exact draw from the softmax over
     the kept tokens, so no softmax and no cumulative sum.
Without top-k, two launches: _gumbel_chunks (each chunk's best score) and _pick_best.
A radix select by histograms, as GPU sort libraries do it, was the first design: Triton's
tl.histogram costs ~100 warp instructions per 32 keys.

The noise is Philox (tl.randint) keyed by seed, at counter (offsets[b] << 32) + b * V + i;
each call advances offsets[b] by one on the device. Seed and offsets are tensors, so the
call never synchronises with the host and can be captured in a CUDA graph and replayed:
every replay draws fresh noise. The draws differ from torch.multinomial's, not their law.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._utils import cdiv, check_inputs, interpreting, next_power_of_2, on_input_device

# CHUNK logits a program (4 warps, 16 a thread); up to CANDIDATES candidates are searched
# in registers by one program, more (flat rows, large k) through scratch. WINDOWS windows:
# 16 in steps of sqrt 2 cost the window counts 5 us at batch 1 on an H200, against ~2 for
# the other chunk kernels.
CHUNK, CANDIDATES, WINDOWS, NUM_WARPS, DRAW_WARPS = 2048, 2048, 8, 4, 8
_TEMPERATURES = (1e-20, 1e30)  # the range the kernels see (sample)


@triton.jit
def _sort_key(x):
    # Unsigned keys ordered like the floats: flip every bit of a negative float, and only
    # the sign bit of a positive one.
    # -0.0 is first made +0.0: the two are equal logits, and -0.0 sorted below a +0.0 at
    # the k-th place would be cut, where gpt.generate.filter_logits keeps it.
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, 0, bits)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)


@triton.jit
def _from_key(key):
    bits = tl.where((key >> 31) != 0, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _shifted(x, m, inv_temperature):
    # (x - m) / T, and exactly 0 where x is the max m (+-inf included): logits tied at the
    # max then differ by their noise alone. x / T + noise rounds to the ulp of x / T, which
    # at T = 1e-5 and logits ~10 is 0.06: the noises of tied tokens often rounded equal,
    # and the argmax gave the lower index (P = 0.62 for two tied at T = 1e-5).
    return tl.where(x == m, 0.0, (x - m) * inv_temperature)


@triton.jit
def _gumbel_score(x, m, index, seed, first, inv_temperature):
    # 23 random bits to a uniform in (0, 1) that is never 0 or 1, so the noise
    # -log(-log(u)) is always finite: k + 0.5 is exact in fp32 below 2^23. With 24 bits,
    # (2^24 - 1) + 0.5 rounds to 2^24, u to 1.0, and that token wins whatever its logit.
    bits = tl.randint(seed, first + index)
    u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return _shifted(x, m, inv_temperature) - tl.log(-tl.log(u))


@triton.jit
def _load_chunk(LOGITS, stride_lb, stride_lv, V, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    ok = idx < V
    # int64: idx * stride_lv passes 2^31 for a strided vocabulary (a transposed (V, B)
    # tensor's view: stride B); a unit stride is specialised away.
    x = tl.load(LOGITS + row.to(tl.int64) * stride_lb + idx.to(tl.int64) * stride_lv, mask=ok, other=float("-inf"))
    return x.to(tl.float32), idx, ok


@triton.jit
def _window_keys(STATS_MAX, STATS_SUM, STATS_N, P, P2: tl.constexpr, WINDOWS: tl.constexpr):
    """Keys of the lower bounds of the row's windows, narrowest first; the last is 0 (all)."""
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, P2)
    m = tl.max(tl.load(STATS_MAX + row * P + p, mask=p < P, other=float("-inf")), 0)
    total = tl.sum(tl.load(STATS_SUM + row * P + p, mask=p < P, other=0.0), 0)
    n = tl.sum(tl.load(STATS_N + row * P + p, mask=p < P, other=0), 0)
    spread = m - total / tl.maximum(n, 1).to(tl.float32)
    w = tl.arange(0, WINDOWS)
    lo = _sort_key(m - spread * tl.exp2((w - (WINDOWS - 2)).to(tl.float32)))
    # A bound that is not a number (infinite logits) has a key above the max: never chosen.
    return tl.where((w < WINDOWS - 1) & (lo <= _sort_key(m)), lo, 0)


@triton.jit
def _chosen_window(COUNTS, top_k, P, P2: tl.constexpr, WINDOWS: tl.constexpr):
    """(window, per-chunk counts in it (P2,)): the narrowest window with >= top_k logits."""
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, P2)
    w = tl.arange(0, WINDOWS)
    counts = tl.load(COUNTS + (row * P + p[:, None]) * WINDOWS + w[None, :], mask=(p < P)[:, None], other=0)
    window = tl.min(tl.where(tl.sum(counts, 0) >= top_k, w, WINDOWS - 1), 0)
    return window, tl.sum(tl.where(w[None, :] == window, counts, 0), 1)


@triton.jit
def _stats_kernel(LOGITS, STATS_MAX, STATS_SUM, STATS_N, stride_lb, stride_lv, V, CHUNK: tl.constexpr):
    x, idx, ok = _load_chunk(LOGITS, stride_lb, stride_lv, V, CHUNK)
    is_finite = x > float("-inf")
    at = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    tl.store(STATS_MAX + at, tl.max(x, 0))
    tl.store(STATS_SUM + at, tl.sum(tl.where(is_finite, x, 0.0), 0))
    tl.store(STATS_N + at, tl.sum(is_finite.to(tl.int32), 0))


@triton.jit
def _window_counts_kernel(LOGITS, STATS_MAX, STATS_SUM, STATS_N, COUNTS, stride_lb, stride_lv, V,
                          CHUNK: tl.constexpr, P2: tl.constexpr, WINDOWS: tl.constexpr):
    P = tl.num_programs(1)
    lo = _window_keys(STATS_MAX, STATS_SUM, STATS_N, P, P2, WINDOWS)
    x, idx, ok = _load_chunk(LOGITS, stride_lb, stride_lv, V, CHUNK)
    inside = ok[:, None] & (_sort_key(x)[:, None] >= lo[None, :])
    at = tl.program_id(0).to(tl.int64) * P + tl.program_id(1)
    tl.store(COUNTS + at * WINDOWS + tl.arange(0, WINDOWS), tl.sum(inside.to(tl.int32), 0))


@triton.jit
def _compact_kernel(LOGITS, STATS_MAX, STATS_SUM, STATS_N, COUNTS, KEYS, INDEX, stride_lb, stride_lv, V, top_k,
                    CHUNK: tl.constexpr, P2: tl.constexpr, WINDOWS: tl.constexpr):
    P = tl.num_programs(1)
    chunk = tl.program_id(1)
    lo = _window_keys(STATS_MAX, STATS_SUM, STATS_N, P, P2, WINDOWS)
    window, counts = _chosen_window(COUNTS, top_k, P, P2, WINDOWS)
    lo = tl.sum(tl.where(tl.arange(0, WINDOWS) == window, lo, 0), 0)
    first = tl.sum(tl.where(tl.arange(0, P2) < chunk, counts, 0), 0)  # the chunks before this one
    x, idx, ok = _load_chunk(LOGITS, stride_lb, stride_lv, V, CHUNK)
    key = _sort_key(x)
    take = ok & (key >= lo)
    at = tl.program_id(0).to(tl.int64) * V + first + tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(KEYS + at, key.to(tl.int32, bitcast=True), mask=take)
    tl.store(INDEX + at, idx, mask=take)


@triton.jit
def _draw_kernel(COUNTS, KEYS, INDEX, OUT, SEED, OFFSETS, stride_ob, V, top_k, inv_temperature, P,
                 P2: tl.constexpr, WINDOWS: tl.constexpr, CANDIDATES: tl.constexpr):
    row = tl.program_id(0)
    window, counts = _chosen_window(COUNTS, top_k, P, P2, WINDOWS)
    n = tl.sum(counts, 0)
    keys_row = KEYS + row.to(tl.int64) * V
    index_row = INDEX + row.to(tl.int64) * V
    seed = tl.load(SEED)
    counter = tl.load(OFFSETS + row)
    first = (counter << 32) + row.to(tl.int64) * V
    c_offs = tl.arange(0, CANDIDATES)

    # The largest key t with at least k candidates >= t, fixed from the top bit down, from
    # 0 (which has). Each step is one block reduction, bound by its barriers: steps whose
    # answer is forced (the trial above the largest candidate, or at most the smallest) skip
    # it. Trying 16 values of 4 bits a step in one 2-D reduction measured 2.5x slower.
    threshold = tl.zeros((), dtype=tl.uint32)
    if n <= CANDIDATES:
        c_ok = c_offs < n
        c_key = tl.load(keys_row + c_offs, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
        top = tl.max(c_key, 0)
        bottom = tl.min(tl.where(c_ok, c_key, 0xFFFFFFFF), 0)
        for b in range(31, -1, -1):
            trial = threshold | (tl.full((), 1, tl.uint32) << b)
            if trial <= bottom:
                threshold = trial
            elif trial <= top:
                if tl.sum((c_ok & (c_key >= trial)).to(tl.int32), 0) >= top_k:
                    threshold = trial
        c_index = tl.load(index_row + c_offs, mask=c_ok, other=0)
        score = _gumbel_score(_from_key(c_key), _from_key(top), c_index, seed, first, inv_temperature)
        score = tl.where(c_ok & (c_key >= threshold), score, float("-inf"))
        best_index = tl.sum(tl.where(c_offs == tl.argmax(score, 0), c_index, 0), 0)
    else:
        top = tl.zeros((), dtype=tl.uint32)
        bottom = tl.full((), 0xFFFFFFFF, dtype=tl.uint32)
        for c_start in range(0, n, CANDIDATES):
            c_ok = c_start + c_offs < n
            c_key = tl.load(keys_row + c_start + c_offs, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
            top = tl.maximum(top, tl.max(c_key, 0))
            bottom = tl.minimum(bottom, tl.min(tl.where(c_ok, c_key, 0xFFFFFFFF), 0))
        for b in range(31, -1, -1):
            trial = threshold | (tl.full((), 1, tl.uint32) << b)
            if trial <= bottom:
                threshold = trial
            elif trial <= top:
                count = tl.zeros((), dtype=tl.int32)
                for c_start in range(0, n, CANDIDATES):
                    c_ok = c_start + c_offs < n
                    c_key = tl.load(keys_row + c_start + c_offs, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
                    count += tl.sum((c_ok & (c_key >= trial)).to(tl.int32), 0)
                if count >= top_k:
                    threshold = trial
        best = tl.full((), float("-inf"), dtype=tl.float32)
        best_index = tl.zeros((), dtype=tl.int32)
        for c_start in range(0, n, CANDIDATES):
            c_ok = c_start + c_offs < n
            c_key = tl.load(keys_row + c_start + c_offs, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
            c_index = tl.load(index_row + c_start + c_offs, mask=c_ok, other=0)
            score = _gumbel_score(_from_key(c_key), _from_key(top), c_index, seed, first, inv_temperature)
            score = tl.where(c_ok & (c_key >= threshold), score, float("-inf"))
            block_best = tl.max(score, 0)
            block_index = tl.sum(tl.where(c_offs == tl.argmax(score, 0), c_index, 0), 0)
            best_index = tl.where(block_best > best, block_index, best_index)
            best = tl.maximum(best, block_best)
    tl.store(OUT + row.to(tl.int64) * stride_ob, best_index.to(tl.int64))
    tl.store(OFFSETS + row, counter + 1)


@triton.jit
def _gumbel_chunks_kernel(LOGITS, SEED, OFFSETS, BEST, BEST_INDEX, CHUNK_MAX, stride_lb, stride_lv, V,
                          inv_temperature, CHUNK: tl.constexpr):
    # Scores relative to the chunk's max (see _shifted); _pick_best_kernel puts the chunks
    # on the row's max.
    row = tl.program_id(0)
    x, idx, ok = _load_chunk(LOGITS, stride_lb, stride_lv, V, CHUNK)
    m = tl.max(x, 0)
    first = (tl.load(OFFSETS + row) << 32) + row.to(tl.int64) * V
    score = tl.where(ok, _gumbel_score(x, m, idx, tl.load(SEED), first, inv_temperature), float("-inf"))
    at = row.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    tl.store(BEST + at, tl.max(score, 0))
    tl.store(BEST_INDEX + at, tl.sum(tl.where(tl.arange(0, CHUNK) == tl.argmax(score, 0), idx, 0), 0))
    tl.store(CHUNK_MAX + at, m)


@triton.jit
def _pick_best_kernel(BEST, BEST_INDEX, CHUNK_MAX, OUT, OFFSETS, stride_ob, P, inv_temperature, P2: tl.constexpr):
    row = tl.program_id(0)
    p = tl.arange(0, P2)
    ok = p < P
    m = tl.load(CHUNK_MAX + row.to(tl.int64) * P + p, mask=ok, other=float("-inf"))
    best = tl.load(BEST + row.to(tl.int64) * P + p, mask=ok, other=float("-inf"))
    best = tl.where(ok, _shifted(m, tl.max(m, 0), inv_temperature) + best, float("-inf"))
    index = tl.load(BEST_INDEX + row.to(tl.int64) * P + p, mask=ok, other=0)
    token = tl.sum(tl.where(p == tl.argmax(best, 0), index, 0), 0)
    tl.store(OUT + row.to(tl.int64) * stride_ob, token.to(tl.int64))
    tl.store(OFFSETS + row, tl.load(OFFSETS + row) + 1)


def _check(logits: Tensor, seed: Tensor, offsets: Tensor, temperature: float, top_k: int | None,
           out: Tensor | None) -> None:
    op = "sample"
    check_inputs(op, "gpt.generate.sample_next", logits=logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{op}: logits must be (B, V) with V >= 1, got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if B * V >= 2**32:  # b * V + i would carry into the offset's word: rows would share noise
        raise ValueError(f"{op}: batch x vocabulary ({B} x {V}) must be below 2^32, the noise counter's room "
                         f"per call; split the batch")
    for name, t, shape in (("seed", seed, (1,)), ("offsets", offsets, (B,)), ("out", out, (B, 1))):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.shape != shape:
            raise ValueError(f"{op}: {name} must be an int64 tensor of shape {shape}")
        if t.device != logits.device:
            raise ValueError(f"{op}: {name} is on {t.device} but logits on {logits.device}; keep it on the device")
    if not offsets.is_contiguous():
        raise ValueError(f"{op}: offsets must be contiguous (the kernel advances it in place)")
    if not isinstance(temperature, float) or not 0 < temperature < math.inf:
        raise ValueError(f"{op}: temperature must be a positive finite number, got {temperature!r}; take the "
                         f"argmax for greedy decoding")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"{op}: top_k must be an int >= 1 or None, got {top_k!r}")


@on_input_device
def _sample(logits: Tensor, seed: Tensor, offsets: Tensor, temperature: float, top_k: int | None,
            out: Tensor | None) -> Tensor:
    B, V = logits.shape
    out = torch.empty(B, 1, dtype=torch.int64, device=logits.device) if out is None else out
    if B == 0:
        return out
    # The interpreter pays per program and per op: small chunks, still several a row.
    chunk, candidates = (64, 32) if interpreting() else (CHUNK, CANDIDATES)
    num_warps, draw_warps = (1, 1) if interpreting() else (NUM_WARPS, DRAW_WARPS)
    P = cdiv(V, chunk)
    P2 = max(2, next_power_of_2(P))
    grid = (B, P)
    f32 = dict(dtype=torch.float32, device=logits.device)
    i32 = dict(dtype=torch.int32, device=logits.device)
    strides = (logits.stride(0), logits.stride(1))
    if top_k is None or top_k >= V:
        best, best_index, chunk_max = torch.empty(B, P, **f32), torch.empty(B, P, **i32), torch.empty(B, P, **f32)
        _gumbel_chunks_kernel[grid](logits, seed, offsets, best, best_index, chunk_max, *strides, V,
                                    1.0 / temperature, CHUNK=chunk, num_warps=num_warps)
        _pick_best_kernel[(B,)](best, best_index, chunk_max, out, offsets, out.stride(0), P, 1.0 / temperature,
                                P2=P2, num_warps=1)
        return out
    # Scratch is never cleared: every value read was written earlier in this call.
    stats = (torch.empty(B, P, **f32), torch.empty(B, P, **f32), torch.empty(B, P, **i32))
    counts = torch.empty(B, P, WINDOWS, **i32)
    keys, index = torch.empty(B, V, **i32), torch.empty(B, V, **i32)
    _stats_kernel[grid](logits, *stats, *strides, V, CHUNK=chunk, num_warps=num_warps)
    _window_counts_kernel[grid](logits, *stats, counts, *strides, V, CHUNK=chunk, P2=P2, WINDOWS=WINDOWS,
                                num_warps=num_warps)
    _compact_kernel[grid](logits, *stats, counts, keys, index, *strides, V, top_k, CHUNK=chunk, P2=P2,
                          WINDOWS=WINDOWS, num_warps=num_warps)
    _draw_kernel[(B,)](counts, keys, index, out, seed, offsets, out.stride(0), V, top_k, 1.0 / temperature, P,
                       P2=P2, WINDOWS=WINDOWS, CANDIDATES=candidates, num_warps=draw_warps)
    return out


@torch.compiler.disable  # see kernels/__init__.py
def sample(
    logits: Tensor, seed: Tensor, offsets: Tensor, temperature: float = 1.0, top_k: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Draws one token id per row of logits (B, V) from softmax(logits / temperature), kept to
    the top_k largest logits of the row (all of them when top_k is None or >= V).

    logits: float16, bfloat16 or float32, any strides, on a CUDA device (or CPU under
    TRITON_INTERPRET=1). seed: int64 (1,), the Philox key. offsets: int64 (B,), contiguous,
    each row's draw counter, advanced by one per call in place -- the same seed and offsets
    give the same tokens. out: int64 (B, 1) to write into (a CUDA graph's static input);
    allocated when None. Returns out.
    """
    with contextlib.suppress(TypeError, ValueError):  # numpy and 0-d tensor scalars too
        temperature = float(temperature)
    _check(logits, seed, offsets, temperature, top_k, out)
    # Kept where fp32 holds logits / T: below 1e-20 the draw is the argmax already (the
    # noise spans ~20, logits that differ at all differ by far more over T), past 1e30 a
    # uniform draw among the finite logits; beyond, 1 / T would overflow (every large
    # logit +inf, the first winning) or vanish (-inf * 0 = NaN, a banned token winning).
    temperature = min(max(temperature, _TEMPERATURES[0]), _TEMPERATURES[1])
    return _sample(logits, seed, offsets, temperature, None if top_k is None else int(top_k), out)
