"""Compare an op and its gradients with the float64 reference (shared by the kernel tests).

Tolerance, FlashAttention's rule: the kernel's error against float64 is at most twice
torch's own error in the same dtype, plus atol + rtol * max|reference|.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def run(fn: Callable, inputs: Sequence[Tensor | None], upstream: Sequence[Tensor]) -> list[Tensor | None]:
    """Outputs of fn and gradients of its inputs (None stays None).

    Every backward gets its own clone of the upstream gradients, so an op that wrote
    into them could not go unnoticed.
    """
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.clone() for g in upstream])
    return [o.detach() for o in outs] + [None if t is None else t.grad for t in leaves]


def compare(ours_fn: Callable, ref_fn: Callable, inputs: Sequence[Tensor | None], upstream: Sequence[Tensor],
            atol: float, rtol: float) -> None:
    """Every output and gradient of ours_fn within the FlashAttention bound of ref_fn."""
    ours = run(ours_fn, inputs, upstream)
    torch_ = run(ref_fn, inputs, upstream)
    f64 = lambda ts: [None if t is None else t.double() for t in ts]
    exact = run(ref_fn, f64(inputs), f64(upstream))
    for i, (o, t, e) in enumerate(zip(ours, torch_, exact)):
        if e is None:
            assert o is None, f"result {i}: expected no gradient"
            continue
        assert o.shape == t.shape and o.dtype == t.dtype, f"result {i}: {o.shape} {o.dtype} vs {t.shape} {t.dtype}"
        if e.numel() == 0:
            continue
        assert torch.isfinite(o).all(), f"result {i}: not finite"
        err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        bound = 2 * torch_err + atol + rtol * e.abs().max().item()
        assert err <= bound, f"result {i}: error {err:.3g} > {bound:.3g} (torch's error {torch_err:.3g})"
