"""Guard pages around the kernels' tensors: each kernel reads and writes only inside them.

    TRITON_INTERPRET=1 python tests/bounds.py CASE      # CASE in CASES; exits 0 if every access stayed inside

The interpreter loads from wherever a kernel's pointers point, unchecked. An unmasked load
past a tensor's end (a tile's ragged edge, a wrap or stride gone wrong) reads whatever
lies there, and no comparison with the reference sees it where that value is then masked
out or multiplied by zero -- on a GPU the same load may fault. Here every input is copied
against a page that cannot be read, once right after its last byte and once right before
its first, so such a load ends the process with SIGSEGV. The buffers the launchers allocate
(outputs, statistics, scratch: torch.empty, empty_like and zeros, patched in this process)
are guarded the same way, which catches their loads and stores too. tests/test_bounds.py
runs each case in a process of its own. Linux (mmap, mprotect).
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROT_NONE = 0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_buffers: list[mmap.mmap] = []  # the guarded copies' memory, kept for the process


def guarded(t: Tensor, after: bool) -> Tensor:
    """A contiguous copy of t whose last byte (after=True) or first byte is next to a page
    the process may neither read nor write."""
    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // page)
    buf = mmap.mmap(-1, (pages + 1) * page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if _libc.mprotect(start + pages * page if after else start, page, _PROT_NONE):
        raise OSError(ctypes.get_errno(), "mprotect failed")
    copy = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=pages * page - nbytes if after else page)
    _buffers.append(buf)
    return copy.view(t.shape).copy_(t)


def _guarding(make: Callable[..., Tensor], after: bool) -> Callable[..., Tensor]:
    """torch.empty (or zeros, empty_like) whose CPU tensors are guarded copies."""
    def guarded_make(*args, **kwargs) -> Tensor:
        t = make(*args, **kwargs)
        return guarded(t, after) if t.device.type == "cpu" and t.numel() else t
    return guarded_make


@contextlib.contextmanager
def _patched(module, values: dict):
    """module's attributes set to values for the block (a launcher's tables, say)."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _backward(out: Tensor, inputs: list[Tensor], after: bool) -> None:
    out.backward(guarded(torch.randn(out.shape, dtype=out.dtype), after))
    for t in inputs:
        assert t.grad is not None and torch.isfinite(t.grad).all()


def ffn(after: bool) -> None:
    """37 tokens, 16 wide, 72 hidden: every tile ragged in M, N and K (the interpreter's
    32 x 64 x 16); then with every product that may be cut along K cut in two (split K's
    fp32 slices and their sum); then on the Hopper and Ampere pointer tables' tiles, fp16,
    at 37 tokens (their few-row tiles) and 150."""
    from kernels import ffn

    module = sys.modules["kernels.ffn"]
    weights = [torch.randn(72, 16), torch.randn(72), torch.randn(16, 72), torch.randn(16)]
    tiles = module._tiles
    split = dict(_tiles=lambda t, kind: tiles(t, kind)._replace(split_k=True),
                 _split_plan=lambda tiles, k_steps, slots, tail_only: (tiles, 1) if k_steps < 2 else (0, 2))
    runs = [({}, 37, torch.float32), (split, 37, torch.float32)]
    for major in (9, 8):  # 37 tokens take the few-row tiles, 150 the others
        gpu = dict(_tiles=lambda t, kind, major=major: module._TILES[(major, kind)])
        runs += [(gpu, 37, torch.float16), (gpu, 150, torch.float16)]
    for patches, tokens, dtype in runs:
        with _patched(module, patches):
            inputs = [guarded(t.to(dtype), after).requires_grad_() for t in (torch.randn(tokens, 16), *weights)]
            _backward(ffn(*inputs), inputs, after)


def attention(after: bool) -> None:
    """Causal with Tq < Tk, full with Tq > Tk, dropout, grouped-query (4 query heads on 2
    and on 1 key/value head), and q, k, v as views of one fused projection (the model's
    layout), whose last head of v ends the buffer; then the same on the Hopper and Ampere
    tables' tiles (fp16, D = 64 and 128; grouped at 128, sm80's own dK/dV tile); then
    grouped with each group split over dK/dV programs (fp32 partial sums); a sliding window."""
    from kernels import attention

    for Tq, Tk, causal, dropout_p, H, Hk in ((19, 37, True, 0.0, 2, 2), (21, 13, False, 0.0, 2, 2),
                                             (21, 21, True, 0.25, 2, 2), (19, 37, True, 0.0, 4, 2),
                                             (21, 21, True, 0.25, 4, 1)):
        q, k, v = (guarded(torch.randn(1, h, T, 16), after).requires_grad_() for h, T in ((H, Tq), (Hk, Tk), (Hk, Tk)))
        _backward(attention(q, k, v, causal=causal, dropout_p=dropout_p, seed=3, enable_gqa=H != Hk), [q, k, v], after)
    module = sys.modules["kernels.attention"]
    for capability in ((9, 0), (8, 0)):  # the GPU tables' tiles (fp16), with and without dropout's own
        with _patched(module, dict(device_capability=lambda index=0, c=capability: c)):
            for D in (64, 128):
                for Tq, Tk, causal, dropout_p in ((77, 150, True, 0.0), (150, 100, False, 0.0), (77, 77, True, 0.1)):
                    q, k, v = (guarded(torch.randn(1, 1, T, D).half(), after).requires_grad_() for T in (Tq, Tk, Tk))
                    _backward(attention(q, k, v, causal=causal, dropout_p=dropout_p, seed=3), [q, k, v], after)
            q, k, v = (guarded(torch.randn(1, h, T, 128).half(), after).requires_grad_() for h, T in ((2, 77), (1, 150), (1, 150)))
            _backward(attention(q, k, v, enable_gqa=True), [q, k, v], after)
    with _patched(module, dict(_dkdv_slots=lambda device: 10**6)):  # each group split over programs, fp32 parts
        q, k, v = (guarded(torch.randn(1, h, T, 16), after).requires_grad_() for h, T in ((4, 19), (2, 37), (2, 37)))
        _backward(attention(q, k, v, enable_gqa=True), [q, k, v], after)
    qkv = guarded(torch.randn(2, 19, 3, 2, 16), after).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    _backward(attention(q, k, v), [qkv], after)
    # A sliding window: its first tiles skipped, masked at both edges, Tq < Tk, with dropout.
    for Tq, Tk, window, dropout_p in ((19, 37, 5, 0.0), (40, 40, 18, 0.25)):
        q, k, v = (guarded(torch.randn(1, 2, T, 16), after).requires_grad_() for T in (Tq, Tk, Tk))
        _backward(attention(q, k, v, window=window, dropout_p=dropout_p, seed=3), [q, k, v], after)


def layer_norm(after: bool) -> None:
    """Rows of 100 (not a power of two); layer_norm and add_layer_norm, with and without a
    bias; with the one-tile forward, then the persistent one (Hopper's at 8192), whose 4
    programs walk 10 tiles; then rows of 1000 (the two-row tile of 513-1024) and 3000."""
    from kernels import add_layer_norm, layer_norm

    module = sys.modules["kernels.layer_norm"]
    settings = module._settings
    persistent = dict(_settings=lambda n, e: settings(n, e)._replace(fwd_stages=2, fwd_programs_per_sm=2))
    for N, bias, patches in ((100, True, {}), (100, False, {}), (100, True, persistent), (1000, True, {}),
                             (3000, True, {})):
        with _patched(module, patches):
            x = guarded(torch.randn(30000 // N, N), after).requires_grad_()
            w = guarded(torch.randn(N), after).requires_grad_()
            b = guarded(torch.randn(N), after).requires_grad_() if bias else None
            _backward(layer_norm(x, w, b), [x, w, b] if bias else [x, w], after)
            r = guarded(torch.randn(x.shape), after).requires_grad_()
            s, y = add_layer_norm(x, r, w, b)
            _backward(s + y, [x, r, w], after)


def decode_attention(after: bool) -> None:
    """A cache of 40 (two splits of 16-key tiles, the second ragged) with lengths inside it,
    at it and past it (clamped), this step's key and value written in by the kernel."""
    from kernels import decode_attention

    B, H, S, D = 3, 2, 40, 16
    q, k_new, v_new = (guarded(torch.randn(B, H, D), after) for _ in range(3))
    k_cache, v_cache = (guarded(torch.randn(B, H, S, D), after) for _ in range(2))
    lens = guarded(torch.tensor([10, S, S + 15]), after)
    out = decode_attention(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new)
    assert torch.isfinite(out).all()
    # The GPU's splits and tiles (132 SMs): 64-key tiles at D = 64, a split a tile.
    module = sys.modules["kernels.decode_attention"]
    with _patched(module, dict(interpreting=lambda: False, sm_count=lambda index: 132)):
        B, H, S, D = 2, 2, 300, 64
        q = guarded(torch.randn(B, H, D), after)
        k_cache, v_cache = (guarded(torch.randn(B, H, S, D), after) for _ in range(2))
        out = decode_attention(q, k_cache, v_cache, guarded(torch.tensor([S, 77]), after))
        assert torch.isfinite(out).all()


def sample(after: bool) -> None:
    """Rows of 1000 logits (not a multiple of the chunks), all kept and the top 50."""
    from kernels import sample

    logits = guarded(torch.randn(3, 1000), after)
    seed, offsets = guarded(torch.tensor([7]), after), guarded(torch.zeros(3, dtype=torch.int64), after)
    module = sys.modules["kernels.sampling"]
    for patches in ({}, dict(interpreting=lambda: False)):  # the interpreter's chunks, then the GPU's
        with _patched(module, patches):
            for top_k in (None, 50):
                ids = sample(logits, seed, offsets, top_k=top_k)
                assert ((0 <= ids) & (ids < 1000)).all()


def linear_cross_entropy(after: bool) -> None:
    """Vocabularies of 1000 (one ragged block of columns) and 5000 (a whole block and a
    ragged one), rows in chunks whose last is ragged; targets at either end of the row,
    ignored and far out of range (a NaN loss, not a read). The chunks' logits, which the
    kernel overwrites with their gradient, come from F.linear: guarded here too."""
    import torch.nn.functional as F

    from kernels import linear_cross_entropy

    module = sys.modules["kernels.cross_entropy"]
    functional = type("F", (), dict(linear=staticmethod(lambda *a: guarded(F.linear(*a), after))))
    for V in (1000, 5000):
        with _patched(module, dict(F=functional, _CHUNK_ELEMENTS=3 * V)):
            x = guarded(torch.randn(8, 16), after).requires_grad_()
            w = guarded(torch.randn(V, 16) / 4, after).requires_grad_()
            b = guarded(torch.randn(V), after).requires_grad_()
            targets = guarded(torch.tensor([0, V - 1, -100, 5, V - 1, 0, 7, 3]), after)
            loss = linear_cross_entropy(x, w, b, targets)
            loss.backward()
            assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in (x, w, b))
            bad = guarded(torch.tensor([0, V + 10**6, -100, 5, -(10**6), 0, 7, 3]), after)
            assert torch.isnan(linear_cross_entropy(x, w, b, bad))


CASES: dict[str, Callable[[bool], None]] = {
    f.__name__: f for f in (ffn, attention, layer_norm, decode_attention, sample, linear_cross_entropy)
}


if __name__ == "__main__":
    torch.manual_seed(0)
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "zeros")}
    for after in (True, False):
        # The launchers' own buffers too (outputs, statistics, scratch): a store past them
        # would otherwise overwrite other memory unseen.
        for name, make in originals.items():
            setattr(torch, name, _guarding(make, after))
        CASES[sys.argv[1]](after)
