"""Top-k sampling in Triton: one kernel draws the next token of every row of logits.

    sample(logits, seed, offsets, temperature, top_k)[b]
        ~ Categorical(softmax(logits[b] / temperature) restricted to its top_k largest logits)

torch's way (topk, softmax, multinomial) is about 50 small kernels a token, and topk alone
took ~50 us of a 124M model's ~470 us decode step on an H200 at batch 1 (bench/RESULTS.md).
Here one program per row does it in a few passes over the row, which stays in L2:
  1. the row's max m and mean;
  2. how many logits each window [m - f (m - mean), m] holds, f = 1/8, 1/4, 1/2, 1: the
     narrowest holding k becomes the candidate set (all the row if none does), and its
     (key, index) pairs are compacted into scratch -- typically a few times k of them;
  3. the exact k-th largest candidate, by bisection over unsigned 32-bit keys that sort
     like the floats, in registers when the candidates fit a block (ties are kept: every
     logit >= it survives, as with gpt.generate.filter_logits);
  4. the Gumbel-max trick: argmax over kept i of logits[i] / temperature + Gumbel noise is
     an exact draw from the softmax over the kept tokens, so no softmax, no cumulative sum.
The histogram radix select of GPU sort libraries was the first design: Triton's
tl.histogram costs ~100 warp instructions per 32 keys, too slow for one program a row.
The noise is Philox (tl.randint) keyed by seed, at counter (offsets[b] << 32) + b * V + i;
each call advances offsets[b] by one on the device. Seed and offsets are tensors, so the
call never synchronises with the host and can be captured in a CUDA graph and replayed:
every replay draws fresh noise. The draws differ from torch.multinomial's, not their law.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._utils import check_inputs, interpreting, next_power_of_2

# Row chunks of 4096 (8 warps, 16 values a thread): at batch 1 this one program is all the
# GPU runs, so its passes are bound by load latency. Up to CANDIDATES candidates are
# searched in registers; more (flat rows, large k) go through scratch. The loads are not
# pipelined: masked at an unaligned V, they do not vectorise, which cp.async needs.
BLOCK, CANDIDATES, NUM_WARPS = 4096, 2048, 8


@triton.jit
def _sort_key(x):
    # Unsigned keys ordered like the floats: flip every bit of a negative float, and only
    # the sign bit of a positive one.
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)


@triton.jit
def _from_key(key):
    bits = tl.where((key >> 31) != 0, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gumbel_score(x, index, seed, first, inv_temperature):
    # 24 random bits to a uniform in (0, 1) that is never 0 or 1, so the noise
    # -log(-log(u)) is always finite.
    bits = tl.randint(seed, first + index)
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return x * inv_temperature - tl.log(-tl.log(u))


@triton.jit
def _sample_kernel(
    LOGITS, OUT, SEED, OFFSETS, KEYS, INDEX,
    stride_lb, stride_lv, stride_ob,
    V, top_k, inv_temperature,
    FILTER: tl.constexpr,
    BLOCK: tl.constexpr,
    CANDIDATES: tl.constexpr,
):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_lb
    offs = tl.arange(0, BLOCK)
    seed = tl.load(SEED)
    counter = tl.load(OFFSETS + row)
    first = (counter << 32) + row.to(tl.int64) * V
    best = tl.full((), float("-inf"), dtype=tl.float32)
    best_index = tl.zeros((), dtype=tl.int32)

    if FILTER:
        # Per-lane partials, reduced once after each pass: a block reduction per chunk would
        # cost more than the chunk's loads.
        m_acc = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        finite = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + (start + offs) * stride_lv, mask=start + offs < V, other=float("-inf")).to(tl.float32)
            m_acc = tl.maximum(m_acc, x)
            is_finite = x > float("-inf")
            total += tl.where(is_finite, x, 0.0)
            finite += is_finite.to(tl.int32)
        m = tl.max(m_acc, 0)
        spread = m - tl.sum(total, 0) / tl.maximum(tl.sum(finite, 0), 1).to(tl.float32)
        top = _sort_key(m)
        # Keys of the window bounds; a bound that is not a number (infinite logits) is never
        # the narrowest, the 0 key (every logit) always qualifies.
        lo1 = _sort_key(m - 0.125 * spread)
        lo2 = _sort_key(m - 0.25 * spread)
        lo3 = _sort_key(m - 0.5 * spread)
        lo4 = _sort_key(m - spread)
        n1 = tl.zeros([BLOCK], dtype=tl.int32)
        n2 = tl.zeros([BLOCK], dtype=tl.int32)
        n3 = tl.zeros([BLOCK], dtype=tl.int32)
        n4 = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            ok = start + offs < V
            key = _sort_key(tl.load(base + (start + offs) * stride_lv, mask=ok, other=0.0).to(tl.float32))
            n1 += (ok & (key >= lo1)).to(tl.int32)
            n2 += (ok & (key >= lo2)).to(tl.int32)
            n3 += (ok & (key >= lo3)).to(tl.int32)
            n4 += (ok & (key >= lo4)).to(tl.int32)
        n1 = tl.sum(n1, 0)
        n2 = tl.sum(n2, 0)
        n3 = tl.sum(n3, 0)
        n4 = tl.sum(n4, 0)
        lo = tl.where(n4 >= top_k, lo4, 0)
        lo = tl.where(n3 >= top_k, lo3, lo)
        lo = tl.where(n2 >= top_k, lo2, lo)
        lo = tl.where(n1 >= top_k, lo1, lo)
        lo = tl.where(lo <= top, lo, 0)  # a NaN bound's key lies above the max

        # Compact the candidates' keys and indices into this row's scratch.
        keys_row = KEYS + row.to(tl.int64) * V
        index_row = INDEX + row.to(tl.int64) * V
        n = tl.zeros((), dtype=tl.int32)
        for start in range(0, V, BLOCK):
            ok = start + offs < V
            key = _sort_key(tl.load(base + (start + offs) * stride_lv, mask=ok, other=0.0).to(tl.float32))
            take = ok & (key >= lo)
            at = n + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(keys_row + at, key.to(tl.int32, bitcast=True), mask=take)
            tl.store(index_row + at, start + offs, mask=take)
            n += tl.sum(take.to(tl.int32), 0)
        tl.debug_barrier()  # the stores above, by every thread, before the loads below

        # Bisection for the largest key t with at least k candidates >= t, from lo (which
        # has) a bit at a time; steps past the max key cannot qualify and are skipped.
        threshold = lo
        c_offs = tl.arange(0, CANDIDATES)
        if n <= CANDIDATES:
            c_ok = c_offs < n
            c_key = tl.load(keys_row + c_offs, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
            for b in range(31, -1, -1):
                step = tl.full((), 1, tl.uint32) << b
                trial = threshold + step
                if (trial > threshold) & (trial <= top):
                    if tl.sum((c_ok & (c_key >= trial)).to(tl.int32), 0) >= top_k:
                        threshold = trial
            c_index = tl.load(index_row + c_offs, mask=c_ok, other=0)
            score = _gumbel_score(_from_key(c_key), c_index, seed, first, inv_temperature)
            score = tl.where(c_ok & (c_key >= threshold), score, float("-inf"))
            best = tl.max(score, 0)
            best_index = tl.sum(tl.where(c_offs == tl.argmax(score, 0), c_index, 0), 0)
        else:
            for b in range(31, -1, -1):
                step = tl.full((), 1, tl.uint32) << b
                trial = threshold + step
                if (trial > threshold) & (trial <= top):
                    count = tl.zeros((), dtype=tl.int32)
                    for c_start in range(0, n, CANDIDATES):
                        c_ok = c_start + c_offs < n
                        c_key = tl.load(keys_row + c_start + c_offs, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
                        count += tl.sum((c_ok & (c_key >= trial)).to(tl.int32), 0)
                    if count >= top_k:
                        threshold = trial
            for c_start in range(0, n, CANDIDATES):
                c_ok = c_start + c_offs < n
                c_key = tl.load(keys_row + c_start + c_offs, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
                c_index = tl.load(index_row + c_start + c_offs, mask=c_ok, other=0)
                score = _gumbel_score(_from_key(c_key), c_index, seed, first, inv_temperature)
                score = tl.where(c_ok & (c_key >= threshold), score, float("-inf"))
                block_best = tl.max(score, 0)
                block_index = tl.sum(tl.where(c_offs == tl.argmax(score, 0), c_index, 0), 0)
                best_index = tl.where(block_best > best, block_index, best_index)
                best = tl.maximum(best, block_best)
    else:
        for start in range(0, V, BLOCK):
            ok = start + offs < V
            x = tl.load(base + (start + offs) * stride_lv, mask=ok, other=0.0).to(tl.float32)
            score = tl.where(ok, _gumbel_score(x, start + offs, seed, first, inv_temperature), float("-inf"))
            block_best = tl.max(score, 0)
            block_index = tl.argmax(score, 0) + start
            best_index = tl.where(block_best > best, block_index, best_index)
            best = tl.maximum(best, block_best)
    tl.store(OUT + row.to(tl.int64) * stride_ob, best_index.to(tl.int64))
    tl.store(OFFSETS + row, counter + 1)


def _check(logits: Tensor, seed: Tensor, offsets: Tensor, temperature: float, top_k: int | None,
           out: Tensor | None) -> None:
    op = "sample"
    check_inputs(op, "gpt.generate.sample_next", logits=logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{op}: logits must be (B, V) with V >= 1, got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    for name, t, shape in (("seed", seed, (1,)), ("offsets", offsets, (B,)), ("out", out, (B, 1))):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.shape != shape:
            raise ValueError(f"{op}: {name} must be an int64 tensor of shape {shape}")
        if t.device != logits.device:
            raise ValueError(f"{op}: {name} is on {t.device} but logits on {logits.device}; keep it on the device")
    if not offsets.is_contiguous():
        raise ValueError(f"{op}: offsets must be contiguous (the kernel advances it in place)")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}; take the argmax for greedy decoding")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{op}: top_k must be >= 1 or None, got {top_k}")


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
    _check(logits, seed, offsets, temperature, top_k, out)
    B, V = logits.shape
    out = torch.empty(B, 1, dtype=torch.int64, device=logits.device) if out is None else out
    if B == 0:
        return out
    if interpreting():
        block = candidates = min(256, next_power_of_2(V))
        num_warps = 1
    else:
        block, candidates, num_warps = BLOCK, CANDIDATES, NUM_WARPS
    filter = top_k is not None and top_k < V
    # Candidate scratch: written and read by the row's own program only, never cleared.
    keys = torch.empty(B if filter else 1, V if filter else 1, dtype=torch.int32, device=logits.device)
    index = torch.empty_like(keys)
    _sample_kernel[(B,)](
        logits, out, seed, offsets, keys, index, logits.stride(0), logits.stride(1), out.stride(0),
        V, top_k or V, 1.0 / temperature,
        FILTER=filter, BLOCK=block, CANDIDATES=candidates, num_warps=num_warps,
    )
    return out
