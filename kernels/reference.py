"""Pure-torch implementations of every op the model uses.

This is the CPU path of the model and the oracle every Triton kernel is tested
against (in float64). Keep it obviously correct rather than fast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension; x (..., N), weight/bias (N,)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Returns (x + residual, layer_norm(x + residual))."""
    s = x + residual
    return s, layer_norm(s, weight, bias, eps)


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> Tensor:
    """Boolean (t_q, t_k) mask, True where a query may attend to a key.

    Aligned to the end: query i sits at absolute position t_k - t_q + i, so the
    last query sees every key (what generation with a KV cache needs).
    """
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)


def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None, dropout_p: float = 0.0,
    enable_gqa: bool = False, return_lse: bool = False, window: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention; q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D).

    dropout_p: the chance that each attention probability is zeroed (the rest scaled by
    1 / (1 - dropout_p)), drawn from torch's generator. enable_gqa: k and v may have
    H // G heads, query head h reading head h // G (SDPA's flag, which torch 2.4 lacks).
    return_lse: also the log-sum-exp of each query's scaled, masked scores (B, H, Tq).
    window (causal only): each query sees its `window` latest keys, itself included.
    """
    if window is not None:
        t_q, t_k = q.shape[-2], k.shape[-2]
        seen = causal_mask(t_q, t_k, q.device)
        mask = seen & ~seen.tril(t_k - t_q - window)  # keys `window` or more behind the query
        if enable_gqa and q.shape[-3] != k.shape[-3]:
            group = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)
        if not return_lse:
            return out
        scores = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~mask, float("-inf"))
        return out, torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    t_q, t_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if return_lse:
        scores = (q @ k.transpose(-2, -1)) * scale
        if causal:
            scores = scores.masked_fill(~causal_mask(t_q, t_k, q.device), float("-inf"))
        out = attention(q, k, v, causal, scale, dropout_p)
        return out, torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p)
    if t_q == t_k and scale > 0:  # is_causal scales q and k by sqrt(scale): NaN for scale <= 0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
    mask = causal_mask(t_q, t_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation (GPT-2's)."""
    return F.gelu(x, approximate="tanh")


def ffn(
    x: Tensor,
    fc_weight: Tensor,
    fc_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
) -> Tensor:
    """linear(gelu(linear(x, fc))) with nn.Linear layouts: fc_weight (4C, C), proj_weight (C, 4C)."""
    return F.linear(gelu(F.linear(x, fc_weight, fc_bias)), proj_weight, proj_bias)


def linear_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the logits F.linear(x, weight, bias), taken in fp32 (or wider);
    x (..., C), weight (V, C), targets (...) -> a scalar ("mean", "sum") or (...) ("none")."""
    logits = F.linear(x, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long(), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, scale: float | None = None,
    k_new: Tensor | None = None, v_new: Tensor | None = None, enable_gqa: bool = False,
) -> Tensor:
    """One query per sequence against its KV cache; q (B, H, D), k/v_cache (B, H, S, D) -> (B, H, D).

    seq_lens (B,), integer, on q's device: sequence b attends to cache positions
    [0, seq_lens[b]) (its new token included). A length of 0 gives NaN. k_new, v_new
    (B, H, D), if given, are first written into the caches at position seq_lens[b] - 1
    (nowhere for a length of 0, as the kernel). enable_gqa: the caches and k_new, v_new
    may have H // G heads, query head h reading head h // G.
    """
    if k_new is not None:
        rows, at = torch.arange(q.shape[0], device=q.device), (seq_lens - 1).clamp(min=0)
        written = (seq_lens > 0).view(-1, 1, 1)  # a length-0 row rewrites its position 0 as it was
        # An index_put, which torch.compile does in place; it copied the whole cache for a scatter_.
        for cache, new in ((k_cache, k_new), (v_cache, v_new)):
            cache[rows, :, at] = torch.where(written, new.to(cache.dtype), cache[rows, :, at])
    if enable_gqa and q.shape[1] != k_cache.shape[1]:
        group = q.shape[1] // k_cache.shape[1]
        k_cache, v_cache = k_cache.repeat_interleave(group, 1), v_cache.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhd,bhsd->bhs", q, k_cache) * scale
    positions = torch.arange(k_cache.shape[2], device=q.device)
    valid = positions[None, :] < seq_lens[:, None]  # (B, S)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(dim=-1), v_cache)
