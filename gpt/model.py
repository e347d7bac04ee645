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


class KVCache:
    """Preallocated keys and values of every layer for generation, with per-sequence lengths.

    Prompts of different lengths are right-padded: sequence b's valid keys are
    positions [0, lengths[b]) of its rows. All shapes are fixed at creation, and
    lengths live on the device, so a decode step can be captured in a CUDA graph.
    k[layer], v[layer]: (B, H, block_size, D), one tensor a layer -- not slices of one
    stacked tensor, which torch.compile would copy whole to update every step.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.step_lengths = torch.ones(batch_size, dtype=torch.long, device=device)
        self.kernels = config.kernels

    def tensors(self) -> list[Tensor]:
        """Every tensor a decode step updates in place."""
        return [*self.k, *self.v, self.lengths, self.step_lengths]

    def begin_step(self) -> None:
        """Keys each sequence attends to in this decode step: computed once, not per layer."""
        torch.add(self.lengths, 1, out=self.step_lengths)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Stores this step's k/v (B, H, T, D) and attends; T > 1 is a prefill from position 0."""
        T = q.size(2)
        if T > 1:
            self.k[layer][:, :, :T] = k
            self.v[layer][:, :, :T] = v
            return ops.attention(q, k, v, causal=True, mode=self.kernels)
        # The kernel stores this step's k/v at position lengths[b] itself, then attends. Under
        # autocast q, k and v come in its dtype and the cache is the model's: the kernel takes
        # one dtype, and the new k/v are stored in the cache's anyway (no-op casts otherwise).
        dtype = self.k[layer].dtype
        y = ops.decode_attention(
            q[:, :, 0].to(dtype), self.k[layer], self.v[layer], self.step_lengths, k[:, :, 0].to(dtype),
            v[:, :, 0].to(dtype), mode=self.kernels,
        )
        return y.unsqueeze(2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kernels = config.kernels

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3, H, D) -> three (B, H, T, D) views; the kernels take strided inputs.
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            # As nanoGPT and GPT-2: config.dropout also drops attention probabilities.
            dropout = self.resid_dropout.p if self.training else 0.0
            y = ops.attention(q, k, v, causal=True, mode=self.kernels, dropout_p=dropout)
        else:
            y = cache.attend(layer, q, k, v)
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

    def forward(self, x: Tensor, branch: Tensor | None, cache: KVCache | None = None, layer: int = 0) -> tuple[Tensor, Tensor]:
        # Equivalent to: x = x + branch; x = x + attn(ln_1(x)); return x, mlp(ln_2(x))
        x, h = self.ln_1(x, branch)
        x, h = self.ln_2(x, self.attn(h, cache, layer))
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

    @classmethod
    def from_hf(cls, path: str, kernels: str = "auto") -> "GPT":
        """A GPT with the weights of a local Hugging Face GPT-2 directory (see gpt.hf)."""
        from gpt.hf import load_hf

        return load_hf(path, kernels)

    def save_hf(self, path: str) -> None:
        """Writes config.json and model.safetensors that transformers' GPT2LMHeadModel loads."""
        from gpt.hf import save_hf

        save_hf(self, path)

    def set_kernels(self, mode: str) -> "GPT":
        """Switches every op to another implementation ("auto", "triton", "torch"; see gpt/ops.py)."""
        self.config = self.config.updated(kernels=mode)
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = mode
        return self

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
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None, at: Tensor | None = None,
        return_logits: bool = True,
    ) -> Tensor | tuple[Tensor | None, Tensor]:
        """idx (B, T) int64 -> logits (B, T, vocab); with targets (B, T), (logits, loss).

        Targets equal to -1 are ignored in the loss. return_logits=False gives (None, loss)
        from the head and loss fused (gpt/ops.py), which never hold the logits: what
        training needs, with ~6 GB less memory at GPT-2's batch. With a cache, T > 1 is a prefill
        from position 0 and T == 1 a decode step at each sequence's cache.lengths
        (the caller sets lengths after a prefill and advances them after a step).
        With `at` (B,) positions, only those positions get logits, (B, 1, vocab): generation
        needs one row per sequence, and the vocabulary projection is the costliest matmul.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {self.config.block_size}"
            )
        if cache is not None and T == 1:
            pos = cache.lengths.view(B, 1)  # each sequence at its own position
            cache.begin_step()
        else:
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        branch = None
        for i, block in enumerate(self.transformer.h):
            x, branch = block(x, branch, cache, i)
        if at is not None:
            rows = torch.arange(B, device=idx.device)
            x, branch = x[rows, at].unsqueeze(1), branch[rows, at].unsqueeze(1)
        _, x = self.transformer.ln_f(x, branch)
        if targets is not None and not return_logits:
            return None, ops.linear_cross_entropy(x, self.lm_head.weight, targets, -1, self.config.kernels)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss
