"""Cross-entropy of a linear head, F.cross_entropy(F.linear(x, weight, bias), targets), without
the logits: Liger-Kernel's fused linear cross-entropy.

The rows go through in chunks. Each chunk's logits come from one matmul (cuBLAS); one Triton
program a row then takes its log-sum-exp in one pass over the vocabulary and writes the
gradient of the row's loss, softmax - one_hot(target), over the logits in place; two more
matmuls turn that into the chunk's share of the gradients of x and weight. So the gradients
are ready when the forward returns, and no more than a chunk of logits lives at a time. They
are kept unscaled, for the backward to multiply by the loss's gradient and the mean's 1 / n
at once: an fp16 gradient scaled by 1 / n in the forward, with n ~ 10^4 tokens, would round
to zero before GradScaler's factor could lift it (torch's path carries that factor down). A GPT-2 step (12 x 1024
tokens, 50304 tokens of vocabulary) otherwise holds 1.2 GB of bf16 logits, 2.5 GB of their
fp32 copy, 2.5 GB of log-softmax saved for the backward and as much again for its gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels._utils import check_inputs, interpreting, next_power_of_2, on_input_device, refuse_double_backward

# Logits held at a time, in elements: 256 MiB of bf16, 2560 rows of GPT-2's vocabulary. Each
# chunk adds its weight gradient into the fp32 sum through a bf16 temporary, ~460 MB moved
# at GPT-2's width whatever the chunk's rows: five chunks a 12 x 1024 batch keep that to
# 2.3 GB, and the chunks' matmuls large. Untimed on a GPU.
_CHUNK_ELEMENTS = 2**27
# Columns a program reads at a step: 16 warps of 4 values a thread. 27-32 registers in the
# sm90/sm80 builds of Triton 3.6-3.9, so four programs fill an SM's 64 warps; 8 values a
# thread took 40-50 (Triton 3.9, sm90: two programs an SM).
_MAX_BLOCK_V = 2048
_REDUCTIONS = ("mean", "sum")


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, stride_row, targets_ptr, loss_ptr,
    V, ignore_index,
    BLOCK_V: tl.constexpr, HAS_GRAD: tl.constexpr,
):
    """One program a row: its loss, log-sum-exp - logit[target] (0 where ignored, NaN for a
    target outside [0, V)), and with HAS_GRAD that loss's gradient written over the row."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    used = target != ignore_index
    in_range = (target >= 0) & (target < V)
    cols = tl.arange(0, BLOCK_V)
    # Per-lane running maximum and sum, reduced once at the end. The maximum starts finite
    # so that a lane that only ever sees padding (-inf) rescales by exp(0), not exp(nan).
    m = tl.full([BLOCK_V], -1e30, tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        d = d * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(d * tl.exp(m - m_row), axis=0))
    x_target = tl.load(base + target, mask=used & in_range, other=float("nan")).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(used, lse - x_target, 0.0))
    if HAS_GRAD:
        bad = tl.where(in_range, 0.0, float("nan"))  # a bad target makes its row's gradient NaN
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(used, tl.where(offs == target, p - 1.0, p) + bad, 0.0)
            tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=offs < V)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, reduction: str) -> None:
    check_inputs("linear_cross_entropy", "kernels.reference.linear_cross_entropy", x=x, weight=weight, bias=bias)
    if weight.dim() != 2 or x.shape[-1:] != weight.shape[1:]:
        raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit: "
                         "weight must be (vocab, C) for x (..., C), as nn.Linear's")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if targets.shape != x.shape[:-1] or targets.dtype not in (torch.int64, torch.int32) or targets.device != x.device:
        raise ValueError(f"linear_cross_entropy: targets must be integer indices of shape {tuple(x.shape[:-1])} on "
                         f"{x.device}, got {targets.dtype} {tuple(targets.shape)} on {targets.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r} "
                         "(per-row losses: kernels.reference.linear_cross_entropy)")


def _chunk_rows(vocab: int) -> int:
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    return rows - rows % 128 if rows > 128 else rows  # whole tiles of the chunks' matmuls


@on_input_device
def _linear_cross_entropy_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, reduction: str,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The loss (fp32 scalar); the factor the gradients take for a loss gradient of 1 (fp32
    scalar: 1 / n for a mean over n rows); where `needs` asks, the gradients of x (in its
    dtype), weight and bias (fp32) before that factor."""
    x2, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1).contiguous()  # the kernel reads targets densely
    M, V = x2.shape[0], weight.shape[0]
    losses = torch.empty(M, dtype=torch.float32, device=x.device)
    used = (targets != ignore_index).sum(dtype=torch.float32) if reduction == "mean" else None  # no sync
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if needs[0] else None
    # The chunks' weight and bias gradients add up in fp32, however many chunks there are.
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if needs[1] else None
    db = torch.zeros(V, dtype=torch.float32, device=x.device) if needs[2] else None
    block_v = min(_MAX_BLOCK_V, next_power_of_2(V))
    warps = 1 if interpreting() else max(1, min(16, block_v // 128))
    rows = _chunk_rows(V)
    # Autocast stays outside (the caller casts, as for every kernel): the matmuls run in x's dtype.
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, M, rows):
            xc = x2[start:start + rows]
            logits = F.linear(xc, weight, bias)
            _cross_entropy_kernel[(xc.shape[0],)](
                logits, logits.stride(0), targets[start:], losses[start:], V, ignore_index,
                BLOCK_V=block_v, HAS_GRAD=any(needs), num_warps=warps,
            )
            if dx is not None:
                torch.mm(logits, weight, out=dx[start:start + rows])
            if dw is not None:
                if dw.dtype == logits.dtype:
                    dw.addmm_(logits.t(), xc)
                else:
                    dw += logits.t() @ xc
            if db is not None:
                db += logits.sum(0, dtype=torch.float32)
    if used is None:
        return losses.sum(), losses.new_ones(()), None if dx is None else dx.view(x.shape), dw, db
    # Every row ignored: a NaN loss and zero gradients, as torch gives.
    return losses.sum() / used, 1.0 / used.clamp(min=1), None if dx is None else dx.view(x.shape), dw, db


def _scaled(grad: Tensor | None, factor: Tensor, dtype: torch.dtype) -> Tensor | None:
    # A 16-bit grad times a 0-dim fp32 factor is computed in fp32 and stays 16-bit.
    return None if grad is None else (grad * factor).to(dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                reduction: str, grad_enabled: bool) -> Tensor:
        _check(x, weight, bias, targets, reduction)
        # needs_input_grad is set under no_grad too: only the caller's grad mode says whether
        # a backward can come (see kernels/ffn.py).
        needs = tuple(grad_enabled and n for n in ctx.needs_input_grad[:3])
        loss, factor, dx, dw, db = _linear_cross_entropy_fwd(x, weight, bias, targets, int(ignore_index), reduction,
                                                             needs)
        ctx.save_for_backward(factor, dx, dw, db)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, dloss: Tensor | None):
        refuse_double_backward("linear_cross_entropy")
        if dloss is None:
            return None, None, None, None, None, None, None
        factor, *grads = ctx.saved_tensors
        factor = factor * dloss
        return *(_scaled(g, factor, dtype) for g, dtype in zip(grads, ctx.dtypes)), None, None, None, None


# Eager calls go through torch.compiler.disable (see kernels/layer_norm.py).
_linear_cross_entropy_apply = torch.compiler.disable(LinearCrossEntropyFunction.apply)


# Under torch.compile the launches run as a custom op, as in kernels/layer_norm.py; the
# gradients come back with the loss (empty where not needed), and the backward scales them.
@torch.library.custom_op("tritongpt::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, reduction: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, factor, *grads = _linear_cross_entropy_fwd(x, weight, bias, targets, ignore_index, reduction, tuple(needs))
    return loss, factor, *(x.new_empty(0) if g is None else g for g in grads)


@_linear_cross_entropy_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, reduction: str,
      needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    shapes, dtypes = (x.shape, weight.shape, weight.shape[:1]), (x.dtype, torch.float32, torch.float32)
    scalar = x.new_empty((), dtype=torch.float32)
    return scalar, scalar.clone(), *(x.new_empty(shape, dtype=dtype) if need else x.new_empty(0)
                                     for shape, dtype, need in zip(shapes, dtypes, needs))


def _linear_cross_entropy_setup(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, bias = inputs[:3]
    ctx.save_for_backward(*output[1:])
    ctx.needs = inputs[-1]
    ctx.dtypes = (x.dtype, weight.dtype, weight.dtype if bias is None else bias.dtype)


def _linear_cross_entropy_backward(ctx, dloss: Tensor, *_unused: Tensor) -> tuple:
    factor, *grads = ctx.saved_tensors
    factor = factor * dloss
    return *(_scaled(g, factor, dtype) if need else None for g, dtype, need in zip(grads, ctx.dtypes, ctx.needs)), \
        None, None, None, None


_linear_cross_entropy_op.register_autograd(_linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup)


def linear_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """F.cross_entropy(F.linear(x, weight, bias).float(), targets, ignore_index=..., reduction=...),
    computed without holding the logits: the language-model head and its loss.

    x (..., C); weight (V, C) in nn.Linear's layout; bias (V,) or None; targets (...) int64
    or int32 indices in [0, V), or ignore_index for a row left out of the loss (and of the
    mean's count). x, weight and bias share one dtype (bf16 or fp32 on CUDA, fp16 as below;
    fp32 or fp16 under TRITON_INTERPRET=1). Returns the loss, an fp32 scalar; reduction "mean" (over the rows
    not ignored: NaN if every row is) or "sum". A target outside [0, V) makes the loss NaN.
    Differentiable in x, weight and bias: their gradients are computed during the forward
    (which takes that time under grad mode) and scaled in the backward.

    fp16 runs, but each row's gradient, softmax - one_hot, is held in fp16 before any scale:
    probabilities below fp16's smallest normal (6e-5, most of a large vocabulary's) keep
    fewer bits, where torch's path scales them up by GradScaler's factor first. The model
    takes torch's head and loss in fp16 (gpt/ops.py).
    """
    if torch.compiler.is_compiling():
        _check(x, weight, bias, targets, reduction)  # eager's ValueError, while tracing
        grad = torch.is_grad_enabled()
        needs = [grad and t is not None and t.requires_grad for t in (x, weight, bias)]
        return _linear_cross_entropy_op(x, weight, bias, targets, int(ignore_index), reduction, needs)[0]
    return _linear_cross_entropy_apply(x, weight, bias, targets, ignore_index, reduction, torch.is_grad_enabled())
