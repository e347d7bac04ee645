"""The one place that decides which implementation of each op runs.

mode (GPTConfig.kernels):
  "auto"   for CUDA tensors of models at least AUTO_MIN_WIDTH wide, whichever measured
           faster on the GPU (our Triton kernels for LayerNorm and attention; torch's
           cuBLAS FFN while AUTO_TRITON_FFN is off), the pure-torch reference otherwise;
           decode attention and sampling (CUDA-graph replays) stay on Triton at any width
           (all on the reference where Triton is missing: macOS, Windows, CPU wheels)
  "triton" always the Triton kernels (on CPU this needs TRITON_INTERPRET=1)
  "torch"  always the reference
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import TRITON_MISSING, reference

if TYPE_CHECKING:
    from gpt.config import GPTConfig


# "auto" runs the Triton FFN only once it beats cuBLAS: on an H200 (bench/RESULTS.md, run 5,
# bf16, GPT-2 widths) it gives 0.73-0.95x torch eager forward+backward, while the Triton
# LayerNorm (1.77-2.75x eager) and attention (1.24-1.49x SDPA's default FlashAttention-2
# backend) win, so those run on Triton and the FFN on cuBLAS: a GPT-2 124M training step at
# 1.07x eager (all on Triton: 0.97x). kernels="triton" forces the Triton FFN.
AUTO_TRITON_FFN = False
# Narrower models run on torch under "auto": their steps are bound by the host's launches,
# not by the GPU, and a Triton launch costs the host more than a torch op. Run 5 (H200):
# shakespeare-char (384 wide, batch 64 x 256) at 0.64x eager with Triton LayerNorm and
# attention, GPT-2 124M (768 wide) at 1.07x.
AUTO_MIN_WIDTH = 768
# Below this many rows (tokens) "auto" runs the FFN on cuBLAS: faster for decode, on an
# H200, than the Triton FFN's 128-row tiles (run 1) and its 16-row tiles for at most 64
# rows (1,888 against 1,937 tokens/s at batch 1; level at 32: bench/RESULTS.md).
FFN_MIN_ROWS = 256
# On that cuBLAS path, at inference, fold the bias and GELU into the first matmul's epilogue
# (torch._addmm_activation, cuBLASLt's GELU_BIAS: the tanh approximation, as here) instead
# of a separate GELU kernel: one launch fewer per layer in every decode step. Untimed: run
# 4's A/B of it (level, bench/RESULTS.md) captured its graphs with autograd on, where this
# path is off, so both sides ran the separate GELU.
GELU_EPILOGUE = True
# "auto" takes the fused head and loss (kernels.linear_cross_entropy) on CUDA in bf16 and fp32
# without a timing, by its memory traffic: torch's path writes and reads the logits' fp32
# copy, log-softmax and their gradients, ~20 GB a GPT-2 step (12 x 1024 tokens, vocabulary
# 50304) against ~6 GB here, the matmuls the same, and it holds ~6 GB more at its peak. Not
# in fp16: see kernels/cross_entropy.py. Run 7 (H200, bench_cross_entropy, C = 768): 1.84-1.89x
# torch's time, a quarter to a fourteenth of its peak memory; the 124M step's peak 4.8 GiB
# against 11.0.
AUTO_TRITON_LOSS = True


def _triton_kernels() -> ModuleType:
    import kernels

    return kernels


def _before_ampere(x: Tensor) -> bool:
    # Our tiles (the sm80/sm90 tables) need sm80's shared memory: on an sm75 (T4) the
    # attention backward asks 72-144 KiB a block at D >= 64, of the 64 it has.
    from kernels._utils import device_capability

    return device_capability(x.device.index or 0)[0] < 8


def backend(x: Tensor, mode: str = "auto") -> ModuleType:
    if mode == "torch" or (mode == "auto" and (not x.is_cuda or TRITON_MISSING or _before_ampere(x))):
        return reference
    if mode in ("auto", "triton"):
        return _triton_kernels()
    raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {mode!r}")


def triton_unsupported(config: GPTConfig, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run this model on device in dtype, or None.
    "auto" runs such models on torch; this is for refusing kernels="triton" at startup."""
    from kernels._utils import HEAD_DIMS, LAYER_NORM_MAX_ROW_BYTES, device_capability, interpreting

    if TRITON_MISSING:
        return TRITON_MISSING
    head_dim = config.n_embd // config.n_head
    if head_dim not in HEAD_DIMS:
        return (f"the attention kernel takes head dims {', '.join(map(str, HEAD_DIMS))}, and n_embd {config.n_embd} "
                f"over {config.n_head} heads is {head_dim}")
    if config.n_embd * 4 > LAYER_NORM_MAX_ROW_BYTES:  # the residual stream is fp32
        return f"the LayerNorm kernel takes rows of up to {LAYER_NORM_MAX_ROW_BYTES // 4} fp32 values, not {config.n_embd}"
    if device.type == "cuda" and device_capability(device.index or 0)[0] < 8:
        major, minor = device_capability(device.index or 0)
        return f"the kernels need an sm80 (Ampere) or newer GPU, and this one is sm{major}{minor}"
    if device.type != "cuda" and interpreting() and dtype == torch.bfloat16:
        return "Triton's interpreter computes bf16 wrongly"
    return None


def step_backend(x: Tensor, mode: str, width: int) -> ModuleType:
    """backend() for the ops of a training or prefill step of a model `width` wide: the
    reference under "auto" below AUTO_MIN_WIDTH. Decode steps keep backend(): they replay
    as CUDA graphs (gpt.generate.Decoder), where launches cost the host nothing."""
    return reference if mode == "auto" and width < AUTO_MIN_WIDTH else backend(x, mode)


def _layer_norm_backend(x: Tensor, mode: str, residual: Tensor | None = None) -> ModuleType:
    impl = step_backend(x, mode, x.shape[-1])
    # The kernel sizes its rows by the wider of x and the residual (an fp16 x beside an fp32 one).
    size = x.element_size() if residual is None else max(x.element_size(), residual.element_size())
    if mode == "auto" and impl is not reference and (
        x.dtype not in impl.FLOAT_DTYPES or x.shape[-1] * size > impl.LAYER_NORM_MAX_ROW_BYTES
    ):
        return reference  # float64, or a row wider than the kernel holds in registers
    return impl


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, mode: str = "auto") -> Tensor:
    return _layer_norm_backend(x, mode).layer_norm(x, weight, bias, eps)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, mode: str = "auto"
) -> tuple[Tensor, Tensor]:
    return _layer_norm_backend(x, mode, residual).add_layer_norm(x, residual, weight, bias, eps)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, mode: str = "auto", dropout_p: float = 0.0) -> Tensor:
    impl = step_backend(q, mode, q.shape[1] * q.shape[3])
    if mode == "auto" and impl is not reference and (q.shape[-1] not in impl.HEAD_DIMS or q.dtype not in impl.FLOAT_DTYPES):
        impl = reference  # e.g. n_embd 768 over 16 heads (D = 48): the kernel takes 16-128, powers of two
    return impl.attention(q, k, v, causal=causal, dropout_p=dropout_p)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, k_new: Tensor, v_new: Tensor, mode: str = "auto"
) -> Tensor:
    impl = backend(q, mode)
    # The decode kernel is forward-only: a cached forward that autograd records runs on torch.
    if mode == "auto" and impl is not reference and (
        q.shape[-1] not in impl.HEAD_DIMS or q.dtype not in impl.FLOAT_DTYPES or (torch.is_grad_enabled() and q.requires_grad)
    ):
        impl = reference
    return impl.decode_attention(q, k_cache, v_cache, seq_lens, k_new=k_new, v_new=v_new)


def ffn(
    x: Tensor,
    fc_weight: Tensor,
    fc_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    mode: str = "auto",
) -> Tensor:
    impl = step_backend(x, mode, x.shape[-1])
    if mode == "auto" and (not AUTO_TRITON_FFN or x.numel() < FFN_MIN_ROWS * x.shape[-1]):
        # cuBLAS's GEMV-like kernels stream the weights at full bandwidth (see FFN_MIN_ROWS).
        if GELU_EPILOGUE and x.is_cuda and fc_bias is not None and not torch.is_grad_enabled():
            # CUDA's autocast has no rule for _addmm_activation: under it (train.py's eval, an fp32
            # model generating under autocast) the matmul ran in fp32, the layer norm's output dtype.
            x, fc_weight, fc_bias = _autocast(x, fc_weight, fc_bias)
            h = torch._addmm_activation(fc_bias, x.reshape(-1, x.shape[-1]), fc_weight.t(), use_gelu=True)
            return F.linear(h, proj_weight, proj_bias).view(*x.shape[:-1], -1)
        impl = reference
    if impl is not reference:
        # Autocast does not reach into Triton kernels either.
        x, fc_weight, fc_bias, proj_weight, proj_bias = _autocast(x, fc_weight, fc_bias, proj_weight, proj_bias)
    return impl.ffn(x, fc_weight, fc_bias, proj_weight, proj_bias)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, mode: str = "auto") -> Tensor:
    """The mean cross-entropy of the head F.linear(x, weight) (no bias) against targets, in fp32."""
    impl = step_backend(x, mode, x.shape[-1])
    if impl is not reference:
        x, weight = _autocast(x, weight)
        if mode == "auto" and (not AUTO_TRITON_LOSS or x.dtype not in (torch.bfloat16, torch.float32)):
            impl = reference
    return impl.linear_cross_entropy(x, weight, None, targets, ignore_index)


def _autocast(x: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """x and tensors cast as F.linear would cast them under autocast (as they are without it)."""
    if not torch.is_autocast_enabled(x.device.type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if t is not None else None for t in (x, *tensors))
