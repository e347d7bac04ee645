"""Compare an op and its gradients with the float64 reference (shared by the kernel tests).

Tolerance, FlashAttention's rule: the kernel's error against float64 is at most twice
torch's own error in the same dtype, plus atol + rtol * max|reference|.

Also far_apart: a view whose elements lie more than 2^31 elements apart, for the
kernels' offset arithmetic.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from torch import Tensor

_WRAP = 2**32


def far_apart(values: Tensor, strides: Sequence[int], sentinel: float) -> Tensor:
    """values as a view with these strides (in elements, each below 2^31, so that Triton
    passes them as int32), some of its element offsets at 2^31 or more: a kernel that
    multiplies an int32 index by such a stride wraps them to offset - 2^32. The view starts
    2^31 elements into its storage, so a wrapped offset still lands inside it, on
    `sentinel`: the kernel reads a wrong value instead of faulting. Only the view's
    elements and the sentinels are written: on CPU the storage (over 2^32 elements) costs
    address space, not memory; on a GPU it is allocated."""
    assert all(0 < s < 2**31 for s in strides), strides
    offsets = torch.zeros(values.shape, dtype=torch.int64)
    for dim, (n, s) in enumerate(zip(values.shape, strides)):
        offsets += (torch.arange(n) * s).view([n if d == dim else 1 for d in range(values.dim())])
    top = int(offsets.max())
    assert 2**31 <= top < _WRAP, f"the offsets (up to {top}) must pass 2^31 and stay below 2^32"
    start = 2**31
    try:
        storage = torch.empty(start + top + 1, dtype=values.dtype, device=values.device)
    except RuntimeError as e:  # no address space (strict overcommit), or no GPU memory
        pytest.skip(f"cannot allocate {start + top + 1} elements: {e}")
    wrapped = offsets[offsets >= 2**31] - _WRAP
    storage[(start + wrapped).to(values.device)] = sentinel
    view = storage.as_strided(values.shape, tuple(strides), start)
    view.copy_(values)
    return view


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
