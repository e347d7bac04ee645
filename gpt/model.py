"""A decoder-only GPT, GPT-2 style: pre-LayerNorm blocks, tied output head.

Every LayerNorm, attention and feed-forward call goes through `gpt.ops`, which
picks the Triton kernels or the pure-torch reference in one place.

The residual stream is carried as (x, branch): `branch` is the last sub-layer's
output, not yet added. The next LayerNorm adds it and normalises in one fused
op, so each block boundary reads the residual stream once.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gpt import ops
from gpt.config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias that first adds a pending residual branch.

    forward(x, branch) returns (x + branch, layer_norm(x + branch)); branch may be None.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if config.bias else None
        self.eps = config.layer_norm_eps
        self.kernels = config.kernels

    def forward(self, x: Tensor, branch: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if branch is None:
            return x, ops.layer_norm(x, self.weight, self.bias, self.eps, self.kernels)
        return ops.add_layer_norm(x, branch, self.weight, self.bias, self.eps, self.kernels)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kernels = config.kernels

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3, H, D) -> three (B, H, T, D) views; the kernels take strided inputs.
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = ops.attention(q, k, v, causal=True, mode=self.kernels)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.kernels = config.kernels

    def forward(self, x: Tensor) -> Tensor:
        fc, proj = self.c_fc, self.c_proj
        y = ops.ffn(x, fc.weight, fc.bias, proj.weight, proj.bias, mode=self.kernels)
        return self.dropout(y)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, branch: Tensor | None) -> tuple[Tensor, Tensor]:
        # Equivalent to: x = x + branch; x = x + attn(ln_1(x)); return x, mlp(ln_2(x))
        x, h = self.ln_1(x, branch)
        x, h = self.ln_2(x, self.attn(h))
        return x, self.mlp(h)


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position embeddings (Vaswani et al.), called like nn.Embedding."""

    def __init__(self, block_size: int, n_embd: int):
        super().__init__()
        pos = torch.arange(block_size, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd))
        table = torch.zeros(block_size, n_embd)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)[:, : n_embd // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, pos: Tensor) -> Tensor:
        return self.table[pos]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        wpe = (
            nn.Embedding(config.block_size, config.n_embd)
            if config.pos_embedding == "learned"
            else SinusoidalPositions(config.block_size, config.n_embd)
        )
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=wpe,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

        # GPT-2 init; residual projections scaled by 1/sqrt(2 * n_layer).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (as in GPT-2's papers)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and isinstance(self.transformer.wpe, nn.Embedding):
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B."""
        c = self.config
        t = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * t

    def forward(
        self, idx: Tensor, targets: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """idx (B, T) int64 -> logits (B, T, vocab); with targets (B, T), (logits, loss).

        Targets equal to -1 are ignored in the loss.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {self.config.block_size}"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        branch = None
        for block in self.transformer.h:
            x, branch = block(x, branch)
        _, x = self.transformer.ln_f(x, branch)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss
