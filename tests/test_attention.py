"""Triton flash attention (kernels/attention.py) against kernels/reference.py in float64.

Tolerance, FlashAttention's rule: the kernel's error against float64 is at most twice
torch's own error in the same dtype, plus atol + rtol * max|reference|. Every check
covers the output and dq, dk, dv.

On CPU the kernels run in the Triton interpreter, which pays per program and per op:
shapes are tiny and each edge is covered once rather than in a full cross product.
"""
import importlib
import math

import numpy as np
import pytest
import torch

from kernels import reference
from kernels.attention import attention

# The module itself, even once kernels/__init__.py re-exports the function under its name.
attention_module = importlib.import_module("kernels.attention")

TOLERANCES = [  # dtype, atol, rtol
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
]
GPU_TOLERANCES = TOLERANCES[1:] + [pytest.param(torch.bfloat16, 5e-3, 5e-3, id="bf16")]

# B, H, Tq, Tk, D, causal: T = 1, 2, not a multiple of any tile, several tiles; B and H of
# 1 and more; Tq < Tk (the causal mask aligned to the end, at an offset that is not a
# multiple of the tiles), one query against many keys as in decoding, Tq > Tk without mask.
SHAPES = [
    pytest.param(1, 1, 1, 1, 16, True, id="T1"),
    pytest.param(2, 1, 2, 2, 32, False, id="T2-full-B2"),
    pytest.param(1, 3, 17, 17, 64, True, id="T17-H3"),
    pytest.param(2, 2, 64, 64, 16, True, id="T64-B2-H2"),
    pytest.param(1, 2, 130, 130, 32, True, id="T130"),
    pytest.param(2, 1, 130, 130, 64, False, id="T130-full"),
    pytest.param(1, 1, 5, 37, 32, True, id="Tq5-Tk37"),
    pytest.param(2, 1, 19, 65, 16, True, id="Tq19-Tk65"),
    pytest.param(1, 2, 1, 70, 64, True, id="decode-Tq1-Tk70"),
    pytest.param(1, 1, 40, 21, 16, False, id="Tq40-Tk21-full"),
]


def _run(fn, inputs, upstream):
    """Output of fn and the gradients of its inputs; the backward gets its own clone of
    the upstream gradient, so an op that wrote into it could not go unnoticed."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(upstream.clone())
    return [out.detach()] + [t.grad for t in leaves]


def _compare(fn, inputs, upstream, atol, rtol, causal=True, scale=None, exact=None, peer=None, **options):
    """Output and every gradient of attention(fn(inputs), **options) within the FlashAttention bound.

    fn maps the leaves to (q, k, v) (a view, a slice of a fused tensor, ...). The torch
    peer is reference.attention (or `peer`, a function of (q, k, v)) in the inputs' dtype;
    the exact one the same in float64, or `exact` where float64 would not fit in memory.
    """
    ours = _run(lambda *t: attention(*fn(*t), causal=causal, scale=scale, **options), inputs, upstream)
    peer = peer or (lambda q, k, v: reference.attention(q, k, v, causal=causal, scale=scale))
    ref = lambda *t: peer(*fn(*t))
    torch_ = _run(ref, inputs, upstream)
    f64 = _run(exact or ref, [t.double() for t in inputs], upstream.double())
    names = ["output", "grad 0", "grad 1", "grad 2"]
    for name, o, t, e in zip(names, ours, torch_, f64):
        assert o.shape == t.shape and o.dtype == t.dtype, f"{name}: {o.shape} {o.dtype} vs {t.shape} {t.dtype}"
        assert torch.isfinite(o).all(), f"{name}: not finite"
        if e.numel() == 0:
            continue
        err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        bound = 2 * torch_err + atol + rtol * e.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (torch's error {torch_err:.3g})"


def _qkv(B, H, Tq, Tk, D, dtype, device):
    return [torch.randn(B, H, T, D, device=device).to(dtype) for T in (Tq, Tk, Tk)]


def _separate(q, k, v):
    return q, k, v


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("B, H, Tq, Tk, D, causal", SHAPES)
def test_attention(B, H, Tq, Tk, D, causal, dtype, atol, rtol, device):
    torch.manual_seed(0)
    inputs = _qkv(B, H, Tq, Tk, D, dtype, device)
    do = torch.randn(B, H, Tq, D, device=device).to(dtype)
    _compare(_separate, inputs, do, atol, rtol, causal=causal)


# -8: scores far enough apart that a row max taken before scaling (the minimum, for a
# negative scale) would overflow exp2.
@pytest.mark.parametrize("scale", [0.3, 0.0, -8.0], ids=["positive", "zero", "negative"])
@pytest.mark.parametrize("Tq, Tk, causal", [(24, 24, True), (9, 40, True), (24, 40, False)], ids=["square", "Tq<Tk", "full"])
def test_custom_scale(Tq, Tk, causal, scale, device):
    """Any float scale, as SDPA takes: zero (uniform weights) and negative scales too,
    whose row maxima the forward cannot take from the unscaled scores."""
    torch.manual_seed(0)
    inputs = _qkv(1, 2, Tq, Tk, 32, torch.float32, device)
    do = torch.randn(1, 2, Tq, 32, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, causal=causal, scale=scale)


def test_fused_qkv_view(device):
    """The model's layout: q, k, v are permuted views of one (B, T, 3, H, D) projection
    (row stride 3*H*D, head stride D); the gradient reaches the fused tensor."""
    torch.manual_seed(0)
    B, T, H, D = 2, 33, 2, 16
    qkv = torch.randn(B, T, 3, H, D, device=device)
    do = torch.randn(B, H, T, D, device=device)
    _compare(lambda x: x.permute(2, 0, 3, 1, 4).unbind(0), [qkv], do, 1e-5, 1e-5)


def test_transposed_inputs(device):
    """A last dim that is not contiguous (here q, k, v stored as (B, H, D, T))."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 1, 32, 20, device=device) for _ in range(3)]
    do = torch.randn(2, 1, 20, 32, device=device)
    _compare(lambda *t: [x.transpose(-1, -2) for x in t], inputs, do, 1e-5, 1e-5, causal=False)


def test_output_layout_and_broadcast_upstream_gradient(device):
    """o.sum().backward() hands the backward an expanded (all strides 0) gradient; the
    output is (B, T, H, D) in memory, so the model's transpose(1, 2) back is free."""
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, 20, 20, 16, torch.float32, device))
    o = attention(q, k, v)
    assert o.transpose(1, 2).is_contiguous()
    o.sum().backward()
    ours = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference.attention(q, k, v).sum().backward()
    for a, b in zip(ours, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_queries(device):
    """Tq = 0 (a batch with nothing new to attend from): empty output, zero dk and dv."""
    q = torch.randn(1, 2, 0, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 2, 5, 16, device=device, requires_grad=True) for _ in range(2))
    o = attention(q, k, v)
    assert o.shape == (1, 2, 0, 16)
    o.sum().backward()
    assert q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()


@pytest.mark.parametrize(
    "capability, dtype",
    [((9, 0), torch.float16), ((8, 0), torch.float16), ((9, 0), torch.float32)],
    ids=["hopper", "sm80", "fp32"],
)
@pytest.mark.parametrize("D", [16, 64, 128])
def test_gpu_tile_shapes_in_interpreter(capability, dtype, D, monkeypatch, device):
    """Every tile shape the GPU table would launch (BLOCK_M != BLOCK_N, 128-wide tiles)
    computes the right thing, through the interpreter, on ragged multi-tile sequences."""
    if device == "cuda":
        pytest.skip("the GPU runs its own table in the other tests")
    monkeypatch.setattr(attention_module, "device_capability", lambda index=0: capability)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, 1e-3)
    torch.manual_seed(0)
    for Tq, Tk, causal in [(300, 300, True), (77, 300, True), (200, 150, False)]:
        inputs = _qkv(1, 1, Tq, Tk, D, dtype, device)
        do = torch.randn(1, 1, Tq, D, device=device).to(dtype)
        _compare(_separate, inputs, do, atol, rtol, causal=causal)


def _tma_launches(monkeypatch):
    """Settings that move every kernel's tiles with TMA descriptors; returns the TMA flag
    of each launch, in order (forward, dK/dV, dQ)."""
    original, calls = attention_module._settings, []

    def settings(*args):
        s = original(*args)
        return s._replace(**{k: getattr(s, k)._replace(tma=True) for k in ("fwd", "dkdv", "dq")})

    class Launcher:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs["TMA"])
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attention_module, "_settings", settings)
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(attention_module, name, Launcher(getattr(attention_module, name)))
    return calls


@pytest.mark.parametrize("B, H, Tq, Tk, D, causal", [
    pytest.param(2, 2, 50, 50, 16, True, id="T50-B2-H2"),
    pytest.param(1, 1, 19, 65, 32, True, id="Tq19-Tk65"),
    pytest.param(1, 1, 40, 21, 16, False, id="Tq40-Tk21-full"),
])
def test_tma_in_interpreter(B, H, Tq, Tk, D, causal, monkeypatch, device):
    """Forward and backward with the looped-over tiles read by TMA (zero fill past T
    instead of masked loads), on ragged, multi-tile, multi-head shapes."""
    if device == "cuda":
        pytest.skip("test_tma_gpu runs it on Hopper")
    calls = _tma_launches(monkeypatch)
    torch.manual_seed(0)
    inputs = _qkv(B, H, Tq, Tk, D, torch.float32, device)
    do = torch.randn(B, H, Tq, D, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, causal=causal)
    assert calls == [True] * 3


def test_tma_fused_qkv_and_fallback(monkeypatch, device):
    """TMA reads the model's layout (permuted views of one (B, T, 3, H, D) projection, head
    stride D); a row stride that is not a multiple of 16 bytes takes the pointer path, as
    does an upstream gradient broadcast over heads (stride 0) in the backward."""
    if device == "cuda":
        pytest.skip("interpreter check of the launcher's choice")
    calls = _tma_launches(monkeypatch)
    torch.manual_seed(0)
    B, T, H, D = 2, 33, 2, 16
    do = torch.randn(B, H, T, D, device=device)
    _compare(lambda x: x.permute(2, 0, 3, 1, 4).unbind(0), [torch.randn(B, T, 3, H, D, device=device)], do, 1e-5, 1e-5)
    # Rows of 3 * 16 + 1 floats: 196 bytes apart.
    _compare(lambda x: x[..., :48].unflatten(-1, (3, H // 2, D)).permute(2, 0, 3, 1, 4).unbind(0),
             [torch.randn(B, T, 49, device=device)], torch.randn(B, 1, T, D, device=device), 1e-5, 1e-5)
    assert calls == [True] * 3 + [False] * 3
    calls.clear()
    ours = [t.requires_grad_() for t in _qkv(B, H, T, T, D, torch.float32, device)]
    do = torch.randn(B, 1, T, D, device=device).expand(B, H, T, D)  # a head stride of 0
    attention(*ours).backward(do)
    assert calls == [True, False, True]  # dO feeds only dK/dV's loop
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    reference.attention(*theirs).backward(do)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_tma_falls_back_for_a_start_off_16_bytes(monkeypatch, device):
    """q, k and v starting 4 bytes into their storage (their strides all 16-byte multiples):
    TMA cannot address them, so every kernel takes the pointer path (Triton asserts a
    descriptor's alignment), and the results still match."""
    if device == "cuda":
        pytest.skip("interpreter check of the launcher's choice")
    calls = _tma_launches(monkeypatch)
    torch.manual_seed(0)
    B, H, T, D = 1, 2, 20, 16
    inputs = [torch.randn(1 + B * H * T * D, device=device) for _ in range(3)]
    _compare(lambda *t: [x[1:].view(B, H, T, D) for x in t], inputs, torch.randn(B, H, T, D, device=device), 1e-5, 1e-5)
    assert calls == [False] * 3


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, dtype, k_device, causal, match",
    [
        ((1, 2, 8, 24), (1, 2, 8, 24), (1, 2, 8, 24), torch.float32, None, True, "head dim 24"),
        ((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16), torch.float32, None, True, "k and v must have one shape"),
        ((1, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16), torch.float32, None, True, "must agree"),
        ((1, 2, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16), torch.float32, None, True, "must agree"),
        ((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32), torch.float32, None, True, "must agree"),
        ((2, 8, 16), (2, 8, 16), (2, 8, 16), torch.float32, None, True, "4-D"),
        ((1, 2, 9, 16), (1, 2, 8, 16), (1, 2, 8, 16), torch.float32, None, True, "Tq <= Tk"),
        ((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16), torch.int32, None, True, "dtype"),
        ((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16), torch.float32, "meta", True, "one device"),
        ((1, 2, 8, 16), (1, 2, 0, 16), (1, 2, 0, 16), torch.float32, None, False, r"no positions \(Tk = 0\) for 8"),
    ],
    ids=["D24", "k-v-shapes", "batch", "heads", "head-dim", "3d", "Tq>Tk-causal", "int-dtype", "devices", "Tk0"],
)
def test_invalid_inputs(q_shape, k_shape, v_shape, dtype, k_device, causal, match, device):
    q = torch.ones(q_shape, device=device, dtype=dtype)
    k = torch.ones(k_shape, device=k_device or device, dtype=dtype)
    v = torch.ones(v_shape, device=device, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, causal=causal)


def test_cpu_without_interpreter_points_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.ones(1, 1, 4, 16)
    with pytest.raises(ValueError, match="kernels.reference.attention"):
        attention(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize(
    "B, H, Tq, Tk, D, causal",
    [
        pytest.param(2, 4, 128, 128, 64, True, id="T128-D64"),
        pytest.param(1, 4, 1000, 1000, 128, True, id="T1000-D128"),
        pytest.param(2, 2, 333, 1024, 64, True, id="Tq333-Tk1024"),
        pytest.param(2, 3, 257, 257, 128, False, id="T257-full-D128"),
        pytest.param(3, 2, 1, 2049, 64, True, id="decode-Tk2049"),
        pytest.param(1, 2, 97, 97, 16, True, id="T97-D16"),
        pytest.param(1, 2, 200, 200, 32, True, id="T200-D32"),
    ],
)
def test_attention_gpu(B, H, Tq, Tk, D, causal, dtype, atol, rtol):
    torch.manual_seed(0)
    inputs = _qkv(B, H, Tq, Tk, D, dtype, "cuda")
    do = torch.randn(B, H, Tq, D, device="cuda").to(dtype)
    _compare(_separate, inputs, do, atol, rtol, causal=causal)


def _chunked_exact(q, k, v, chunk=1024):
    """Causal attention in float64 a chunk of queries at a time: each chunk against the
    keys up to its end is reference.attention's end-aligned mask, and only chunk x T
    scores exist at once."""
    T = q.shape[2]
    out = [
        reference.attention(q[:, :, s : s + chunk], k[:, :, : s + chunk], v[:, :, : s + chunk])
        for s in range(0, T, chunk)
    ]
    return torch.cat(out, dim=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES[1:])
@pytest.mark.parametrize("D", [64, 128])
def test_long_sequence_gpu(D, dtype, atol, rtol):
    """Forward at T = 16384 against a chunked float64 reference; forward and backward at
    T = 4096, where the float64 reference (a few T x T matrices) still fits."""
    torch.manual_seed(0)
    T = 16384
    q, k, v = _qkv(1, 2, T, T, D, dtype, "cuda")
    with torch.no_grad():
        ours = attention(q, k, v).double()
        torch_ = reference.attention(q, k, v).double()
        exact = _chunked_exact(q.double(), k.double(), v.double())
    err, torch_err = (ours - exact).abs().max().item(), (torch_ - exact).abs().max().item()
    assert err <= 2 * torch_err + atol + rtol * exact.abs().max().item(), (err, torch_err)
    del q, k, v, ours, torch_, exact
    T = 4096
    inputs = _qkv(1, 2, T, T, D, dtype, "cuda")
    _compare(_separate, inputs, torch.randn(1, 2, T, D, device="cuda").to(dtype), atol, rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES[1:])
@pytest.mark.parametrize("D", [16, 64, 128])
def test_tma_gpu(D, dtype, atol, rtol, monkeypatch):
    """The TMA kernels (bench_attention --sweep times them) on Hopper, ragged and full-size,
    in the model's fused-QKV layout and in separate tensors."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("TMA candidates are Hopper's")
    calls = _tma_launches(monkeypatch)
    torch.manual_seed(0)
    for Tq, Tk, causal in [(1000, 1000, True), (333, 1024, True), (257, 257, False)]:
        inputs = _qkv(2, 3, Tq, Tk, D, dtype, "cuda")
        _compare(_separate, inputs, torch.randn(2, 3, Tq, D, device="cuda").to(dtype), atol, rtol, causal=causal)
    qkv = torch.randn(2, 1024, 3, 4, D, device="cuda").to(dtype)
    _compare(lambda x: x.permute(2, 0, 3, 1, 4).unbind(0), [qkv], torch.randn(2, 4, 1024, D, device="cuda").to(dtype),
             atol, rtol)
    assert calls == [True] * 12


@pytest.mark.gpu
def test_backward_is_deterministic():
    torch.manual_seed(0)
    inputs = _qkv(2, 4, 1024, 1024, 64, torch.bfloat16, "cuda")
    do = torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
    first = _run(lambda *t: attention(*t), inputs, do)
    second = _run(lambda *t: attention(*t), inputs, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_launch_grids_keep_batch_times_heads_off_the_capped_axes(monkeypatch, device):
    """CUDA caps grid axes 1 and 2 at 65535 programs; 4096 short sequences x 16 heads make
    B * H = 65536, which must still launch (and a B past the cap is a clear error)."""
    grids = []

    class Recorder:  # a kernel that records its grid instead of running
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    for name in ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(attention_module, name, Recorder())
    q = torch.zeros(4096, 16, 1, 16, device=device)
    o, lse, *_ = attention_module._attention_fwd(q, q, q, True, None, 0.0, 0, False)
    attention_module._attention_bwd(torch.zeros_like(o), q, q, q, o, lse, True, 0.25, 0.0, 0)
    assert len(grids) == 4
    for grid in grids:
        assert max(grid[1:]) <= 65535 and grid[1] * grid[2] == 4096 * 16, grid
    with pytest.raises(ValueError, match="at most 65535"):
        wide = torch.zeros(65536, 1, 1, 16, device=device)
        attention(wide, wide, wide)
    with pytest.raises(ValueError, match="heads 65536 must each be at most 65535"):  # the split grid's axis 1
        tall = torch.zeros(1, 1, 1, 16, device=device).expand(1, 65536, 1, 16)
        attention(tall, tall, tall)
    many = torch.zeros(1, 1, 1, 16, device=device).expand(46341, 46341, 1, 16)  # B * H past int32, as views
    with pytest.raises(ValueError, match=r"batch x heads \(46341 x 46341\) must be below 2\^31"):
        attention(many, many, many)


@pytest.mark.parametrize("big", ["Tq", "Tk"])
def test_positions_past_int32_are_refused(monkeypatch, big, device):
    """2^30 queries or keys (views: no memory) are refused before anything is allocated or
    launched; from a tile short of 2^31 the kernels' int32 positions wrapped."""
    monkeypatch.setattr(attention_module, "_attn_fwd_kernel", None)
    q = k = torch.zeros(1, 1, 1, 16, device=device)
    if big == "Tq":
        q = q.expand(1, 1, 2**30, 16)
    else:
        k = k.expand(1, 1, 2**30, 16)
    with pytest.raises(ValueError, match=rf"{big}=1073741824 .*must be below 2\^30"):
        attention(q, k, k, causal=False)


def test_positions_just_below_2_30_are_taken(monkeypatch, device):
    """2^30 - 1 keys (a view: no memory) pass every check and reach the launch: the limit
    refuses only the lengths whose int32 positions could wrap."""
    class Reached(Exception):
        pass

    class Launch:  # a kernel that stops the call where it would run
        def __getitem__(self, grid):
            raise Reached

    monkeypatch.setattr(attention_module, "_attn_fwd_kernel", Launch())
    q = torch.zeros(1, 1, 1, 16, device=device)
    k = q.expand(1, 1, 2**30 - 1, 16)
    with pytest.raises(Reached):
        attention(q, k, k, causal=False)


def test_scores_far_below_zero_with_a_ragged_end(device):
    """Every score of every row far below zero (q against k, times 3), keys not a multiple
    of the tiles, no mask: the log-sum-exp is then near -200 (log2 units), and a padding
    key past Tk (a zero row, score 0) would get P = 2^200, inf in fp32, in dQ's last tile
    unless masked out -- and inf times its zero key is NaN. The other shapes' scores sit
    near 0, where an unmasked padding key's P stays finite and its zero row hides it."""
    torch.manual_seed(0)
    B, H, Tq, Tk, D = 1, 2, 5, 21, 16
    k = torch.randn(B, H, Tk, D, device=device).abs() + 1
    q = -3 * (torch.randn(B, H, Tq, D, device=device).abs() + 1)
    v = torch.randn(B, H, Tk, D, device=device)
    _compare(_separate, [q, k, v], torch.randn(B, H, Tq, D, device=device), 1e-5, 1e-5, causal=False, scale=1.0)


@pytest.mark.parametrize("causal", [True, False])
def test_split_grid_gives_the_same_results(monkeypatch, causal, device):
    """The (tiles, H, B) grid that B * H past the cap takes, forced here on a small shape by
    lowering the cap: every (batch, head) finds its own rows."""
    monkeypatch.setattr(attention_module, "_MAX_GRID_AXIS", 3)
    torch.manual_seed(0)
    inputs = _qkv(2, 3, 17, 17, 16, torch.float32, device)
    do = torch.randn(2, 3, 17, 16, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, causal=causal)



def test_causal_last_row_of_a_query_tile_opens_a_key_tile(device):
    """Tk = Tq + 1: the last row of each full query tile (start_m + BLOCK_M - 1) sees key
    start_m + BLOCK_M, the first of a new key tile in every tiling (BLOCK_M and BLOCK_N
    divide 128 in the interpreter's and the GPU's tables). The forward's and dQ's key loops
    must reach that tile: a bound one short skips it, and with it that row's last key,
    which the other causal shapes (key offsets 0, 25, 31, 32, 46, 69) never put on a tile
    start."""
    torch.manual_seed(0)
    inputs = _qkv(1, 2, 128, 129, 16, torch.float32, device)
    do = torch.randn(1, 2, 128, 16, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_q_k_v_in_different_layouts(causal, device):
    """q, k and v each with strides of its own: q contiguous, k a slice of a wider
    (B, H, T, 2D) tensor, v stored (B, T, H, D) (and so dv, in v's layout). Every kernel
    must read each through its own strides; the other tests pass k and v with one set of
    strides, where V read with K's row stride (a copy-paste slip) goes unseen."""
    torch.manual_seed(0)
    B, H, Tq, Tk, D = 2, 3, 20, 45, 16  # rows 2D apart in k, HD in v: H = 2 would make them equal
    inputs = [torch.randn(B, H, Tq, D, device=device), torch.randn(B, H, Tk, 2 * D, device=device),
              torch.randn(B, Tk, H, D, device=device)]
    do = torch.randn(B, H, Tq, D, device=device)
    _compare(lambda q, k, v: (q, k[..., :D], v.transpose(1, 2)), inputs, do, 1e-5, 1e-5, causal=causal)


def _kept(B, H, Tq, Tk, causal, dropout_p, seed, device):
    """The keep mask (B, H, Tq, Tk) the kernel draws, read back through the kernel: with q = k = 0
    every key a query sees has one probability, and with v the identity (D >= Tk) output
    entry (i, j) is that probability over 1 - dropout_p where kept, 0 where dropped."""
    D = next(d for d in (16, 32, 64) if d >= Tk)
    zeros = torch.zeros(B, H, Tq, D, device=device), torch.zeros(B, H, Tk, D, device=device)
    eye = torch.eye(Tk, D, device=device).expand(B, H, Tk, D)
    out = attention(zeros[0], zeros[1], eye, causal=causal, dropout_p=dropout_p, seed=seed)
    return out[..., :Tk] > 0


def _with_dropout(keep, dropout_p, causal):
    """Attention in the inputs' dtype with the given keep mask (the kernel's), as
    F.scaled_dot_product_attention defines dropout: after the softmax, kept / (1 - p), with p
    rounded to a multiple of 2^-16 as the kernel documents."""
    dropout_p = round(dropout_p * 2**16) / 2**16

    def attend(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores.masked_fill(~reference.causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        return (scores.softmax(-1) * keep.to(q.dtype) / (1 - dropout_p)) @ v
    return attend


@pytest.mark.parametrize("B, H, Tq, Tk, D, causal", [
    pytest.param(1, 3, 17, 17, 64, True, id="T17-H3"),
    pytest.param(2, 1, 5, 37, 32, True, id="Tq5-Tk37"),
    # dK/dV's first query (key tile 32's, 7) is no multiple of 16: the draws' query tiles must be.
    pytest.param(1, 2, 20, 45, 16, True, id="Tq20-Tk45"),
    # ... and key tile 32's first query, 8, is a multiple of 8 but not of 16 (2 queries 8 apart a call).
    pytest.param(1, 1, 40, 64, 16, True, id="Tq40-Tk64"),
    pytest.param(2, 2, 40, 21, 16, False, id="Tq40-Tk21-full"),
])
def test_dropout_against_float64_with_the_kernels_mask(B, H, Tq, Tk, D, causal, device):
    """Output and dq, dk, dv with dropout: the forward and both backward kernels draw the
    same mask, and the gradients are those of the dropped-out attention."""
    torch.manual_seed(0)
    p, seed = 0.3, 1234
    keep = _kept(B, H, Tq, Tk, causal, p, seed, device)
    inputs = _qkv(B, H, Tq, Tk, D, torch.float32, device)
    do = torch.randn(B, H, Tq, D, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, causal=causal, peer=_with_dropout(keep, p, causal),
             dropout_p=p, seed=seed)


def test_dropout_mask_statistics_and_seeding(device):
    """Each probability is kept with chance 1 - p, independently across heads, batches and
    seeds; one seed repeats its mask, and torch.manual_seed repeats the default seed."""
    B, H, T, p = 2, 2, 64, 0.25
    keep = _kept(B, H, T, T, False, p, 7, device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02  # 16384 draws: 0.02 is 6 sigma
    # Independent along queries and along keys: neighbours agree as often as chance says,
    # as do the scores that share a Philox call (queries 8 apart, keys 8, 16 and 24 apart:
    # the two halves of one word, four words) or not.
    agree = p * p + (1 - p) ** 2
    for apart in (1, 8, 16):
        assert abs((keep[..., apart:, :] == keep[..., :-apart, :]).float().mean().item() - agree) < 0.03, apart
    for apart in (1, 2, 8, 16, 24, 32):
        assert abs((keep[..., apart:] == keep[..., :-apart]).float().mean().item() - agree) < 0.03, apart
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, _kept(B, H, T, T, False, p, 7, device))
    assert not torch.equal(keep, _kept(B, H, T, T, False, p, 8, device))
    q, k, v = _qkv(1, 1, 20, 20, 16, torch.float32, device)
    torch.manual_seed(5)
    first = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(first, attention(q, k, v, dropout_p=0.5))
    assert not torch.equal(first, attention(q, k, v, dropout_p=0.5))
    assert torch.equal(attention(q, k, v, dropout_p=0.0), attention(q, k, v))
    import numpy as np
    assert torch.equal(attention(q, k, v, dropout_p=0.5, seed=np.int64(9)), attention(q, k, v, dropout_p=0.5, seed=9))


def _philox4x32(seed, c0, c1, c2, c3, rounds=10):
    """Philox4x32-10 (Salmon et al. 2011, as tl.philox computes it) in numpy: the four words for
    each counter (c0, c1, c2, c3), broadcast, under the 64-bit key seed."""
    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) & mask for x in np.broadcast_arrays(c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    mul_a, mul_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(rounds):
        p0, p2 = mul_a * c[0], mul_b * c[2]
        c = [((p2 >> np.uint64(32)) ^ c[1] ^ k0) & mask, p2 & mask, ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & mask, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


def test_dropout_mask_is_the_documented_philox_layout(device):
    """The mask is the one _dropout_keep documents, recomputed here in numpy: query 16a + 8h + u
    and key 32b + 8i + r keep their probability where half h of word i of Philox(seed; 8b + r,
    8a + u, bh, 0) reaches dropout_p * 2^16. The float64 comparisons read the mask back through
    the kernel, so a layout or threshold change all three kernels share passes them; here p is
    one score's own draw over 2^16, which must be kept (>=, not >: else p = 1 - 2^-16 drops all)."""
    B, H, T, seed = 1, 2, 40, 4321  # keys past 32 and queries past 16: b and a of 0 and 1
    qs, ks = np.arange(T)[:, None], np.arange(T)[None, :]
    draws = []
    for bh in range(B * H):
        words = _philox4x32(seed, ks // 32 * 8 + ks % 8, qs // 16 * 8 + qs % 8, bh, 0)
        word = np.choose((ks % 32 // 8) + 0 * qs, words)
        draws.append(word >> ((qs % 16 // 8) * 16).astype(np.uint64) & np.uint64(0xFFFF))
    draws = np.stack(draws).reshape(B, H, T, T).astype(np.int64)
    at = int(draws[0, 1, 21, 35])  # any score's draw; p = it / 2^16 is a step the kernel takes exactly
    keep = _kept(B, H, T, T, False, at / 2**16, seed, device)
    assert torch.equal(keep.cpu(), torch.from_numpy(draws >= at))


def test_dropout_under_the_split_grid_draws_the_same_mask(monkeypatch, device):
    """The mask is keyed by batch x head, which the (tiles, H, B) grid computes its own way:
    the same mask as the usual grid, in the forward and both backward kernels."""
    p, seed = 0.3, 77
    keep = _kept(2, 3, 37, 37, True, p, seed, device)
    monkeypatch.setattr(attention_module, "_MAX_GRID_AXIS", 3)
    assert torch.equal(_kept(2, 3, 37, 37, True, p, seed, device), keep)
    torch.manual_seed(0)
    inputs = _qkv(2, 3, 37, 37, 16, torch.float32, device)
    do = torch.randn(2, 3, 37, 16, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, peer=_with_dropout(keep, p, True), dropout_p=p, seed=seed)


@pytest.mark.parametrize("options, match", [
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=0.1, seed=2**31), r"seed must be an int in \[0, 2\^31\)"),
    (dict(dropout_p=0.1, seed=-1), r"seed must be an int in \[0, 2\^31\), got -1"),
    (dict(dropout_p=0.1, seed=1.5), r"seed must be an int in \[0, 2\^31\), got 1.5"),
    (dict(dropout_p=0.1, seed=True), r"seed must be an int in \[0, 2\^31\), got True"),
    (dict(dropout_p=0.1, seed=torch.tensor(3)), r"seed must be an int in \[0, 2\^31\), got tensor"),
])
def test_invalid_dropout(options, match, device):
    q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32, device)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **options)


def test_dropout_p_just_below_1_stays_finite(device):
    """A dropout_p in [0, 1) that rounds to 1 on the kernels' 2^-16 steps (1 - 2^-20) is
    taken as 1 - 2^-16: the rare kept probabilities scaled by 2^16, never 1 / (1 - 1)."""
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 16, 16, 16, torch.float32, device))
    o = attention(q, k, v, dropout_p=1 - 2**-20, seed=3)
    o.square().sum().backward()
    for name, t in zip(["output", "dq", "dk", "dv"], (o, q.grad, k.grad, v.grad)):
        assert torch.isfinite(t).all(), name


def test_dropout_p_is_taken_on_2_to_the_minus_16_steps(device):
    """dropout_p is rounded to the nearest multiple of 2^-16, as documented: 0.3 gives what
    19661 / 65536 gives, bit for bit (the kernels' draws resolve 2^-16, and the kept scores
    are scaled by the rounded p's 1 / (1 - p), so the output's expectation stays exact).
    Unrounded, the threshold truncated to 19660 and the scale was 1 / 0.7, 4e-6 off:
    within the tolerance of every comparison with the float64 reference."""
    torch.manual_seed(0)
    inputs = _qkv(1, 2, 24, 24, 16, torch.float32, device)
    do = torch.randn(1, 2, 24, 16, device=device)
    rounded = _run(lambda *t: attention(*t, dropout_p=19661 / 65536, seed=5), inputs, do)
    for got, want in zip(_run(lambda *t: attention(*t, dropout_p=0.3, seed=5), inputs, do), rounded):
        assert torch.equal(got, want)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["hopper", "sm80"])
@pytest.mark.parametrize("D", [16, 64, 128])
def test_dropout_with_gpu_tile_shapes_in_interpreter(capability, D, monkeypatch, device):
    """Dropout's own GPU tiles (halved loop tiles) draw the same mask as any other tiling
    (it depends on the seed, head and position only) and give the right gradients."""
    if device == "cuda":
        pytest.skip("the GPU runs its own table in the other tests")
    p, seed = 0.2, 99
    keep = {(Tq, Tk): _kept(1, 2, Tq, Tk, True, p, seed, device) for Tq, Tk in [(64, 64), (40, 64)]}
    monkeypatch.setattr(attention_module, "device_capability", lambda index=0: capability)
    torch.manual_seed(0)
    for (Tq, Tk), kept in keep.items():
        inputs = _qkv(1, 2, Tq, Tk, D, torch.float16, device)
        do = torch.randn(1, 2, Tq, D, device=device).to(torch.float16)
        _compare(_separate, inputs, do, 1e-3, 1e-3, peer=_with_dropout(kept, p, True), dropout_p=p, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize("D", [64, 128])
def test_dropout_gpu(D, dtype, atol, rtol):
    """The GPU's dropout tiles in 16-bit, against the mask read back through the kernel."""
    p, seed = 0.1, 5
    keep = _kept(2, 4, 64, 64, True, p, seed, "cuda")
    torch.manual_seed(0)
    inputs = _qkv(2, 4, 64, 64, D, dtype, "cuda")
    do = torch.randn(2, 4, 64, D, device="cuda").to(dtype)
    _compare(_separate, inputs, do, atol, rtol, peer=_with_dropout(keep, p, True), dropout_p=p, seed=seed)


# Grouped-query attention (enable_gqa): k and v with H // G heads, each shared by G query heads.

def _gqa_inputs(B, H, Hk, Tq, Tk, D, dtype, device):
    return [torch.randn(B, heads, T, D, device=device).to(dtype) for heads, T in ((H, Tq), (Hk, Tk), (Hk, Tk))]


def _gqa_peer(causal):
    return lambda q, k, v: reference.attention(q, k, v, causal=causal, enable_gqa=True)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("B, H, Hk, Tq, Tk, D, causal", [
    pytest.param(2, 4, 2, 17, 17, 16, True, id="H4-Hk2-T17-B2"),
    pytest.param(1, 3, 1, 5, 37, 32, True, id="MQA-Tq5-Tk37"),
    pytest.param(1, 4, 2, 24, 40, 16, False, id="H4-Hk2-full"),
    pytest.param(1, 6, 2, 1, 50, 64, True, id="H6-Hk2-decode"),
])
def test_grouped_query_attention(B, H, Hk, Tq, Tk, D, causal, dtype, atol, rtol, device):
    """Output and dq, dk, dv against SDPA's enable_gqa semantics (k and v repeated per
    group, their gradients summed over it): dK/dV's loop over the group's heads, the
    other kernels' key/value head h // G."""
    torch.manual_seed(0)
    inputs = _gqa_inputs(B, H, Hk, Tq, Tk, D, dtype, device)
    do = torch.randn(B, H, Tq, D, device=device).to(dtype)
    _compare(_separate, inputs, do, atol, rtol, causal=causal, peer=_gqa_peer(causal), enable_gqa=True)


def test_grouped_query_attention_on_views_of_one_projection(device):
    """q, k and v as a grouped-query model's fused projection gives them: slices of one
    (B, T, H + 2 H // G, D) tensor, transposed to (B, heads, T, D); the gradients reach it."""
    torch.manual_seed(0)
    B, T, H, Hk, D = 2, 21, 4, 2, 16
    split = lambda x: [part.transpose(1, 2) for part in x.split([H, Hk, Hk], dim=2)]  # noqa: E731
    do = torch.randn(B, H, T, D, device=device)
    _compare(split, [torch.randn(B, T, H + 2 * Hk, D, device=device)], do, 1e-5, 1e-5, peer=_gqa_peer(True),
             enable_gqa=True)


def test_grouped_query_attention_matches_repeated_heads_with_dropout(device):
    """With dropout, query head h draws the mask multi-head attention draws for head h:
    the output and dq are those of k and v repeated per group, bit for bit, and dk, dv
    their gradients summed over each group."""
    torch.manual_seed(0)
    B, H, Hk, Tq, Tk, D = 2, 6, 2, 20, 45, 16
    q, k, v = (t.requires_grad_() for t in _gqa_inputs(B, H, Hk, Tq, Tk, D, torch.float32, device))
    do = torch.randn(B, H, Tq, D, device=device)
    grouped = attention(q, k, v, dropout_p=0.3, seed=7, enable_gqa=True)
    grads = torch.autograd.grad(grouped, (q, k, v), do)
    repeated = [t.detach().repeat_interleave(H // Hk, 1).requires_grad_() if t is not q else q for t in (q, k, v)]
    multi_head = attention(*repeated, dropout_p=0.3, seed=7)
    expected = torch.autograd.grad(multi_head, repeated, do)
    assert torch.equal(grouped, multi_head) and torch.equal(grads[0], expected[0])
    for got, full in zip(grads[1:], expected[1:]):
        torch.testing.assert_close(got, full.unflatten(1, (Hk, H // Hk)).sum(2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["hopper", "sm80"])
def test_grouped_query_attention_with_gpu_tile_shapes_in_interpreter(capability, monkeypatch, device):
    """The GPU tables' tiles (sm80's dK/dV steps through 16 queries when grouped),
    on ragged multi-tile sequences, causal with Tq < Tk and full."""
    if device == "cuda":
        pytest.skip("test_grouped_query_attention_gpu runs the GPU's own table")
    monkeypatch.setattr(attention_module, "device_capability", lambda index=0: capability)
    torch.manual_seed(0)
    for Tq, Tk, causal in [(77, 150, True), (150, 100, False)]:
        inputs = _gqa_inputs(1, 2, 1, Tq, Tk, 128, torch.float16, device)
        do = torch.randn(1, 2, Tq, 128, device=device).half()
        _compare(_separate, inputs, do, 1e-3, 1e-3, causal=causal, peer=_gqa_peer(causal), enable_gqa=True)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("slots, parts", [(8, 2), (10**6, 4)])
def test_grouped_query_attention_split_over_programs(slots, parts, dtype, atol, rtol, monkeypatch, device):
    """Where whole groups would leave the GPU's SMs idle (forced here: the interpreter's
    slots raised), dK/dV splits each group of 4 query heads over `parts` programs whose
    fp32 partial sums the launcher adds: the gradients are the same."""
    launches = []
    launch = attention_module._attn_bwd_dkdv_kernel

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs["KV_SPLITS"]) or launch[grid](*args, **kwargs)

    monkeypatch.setattr(attention_module, "_dkdv_slots", lambda device: slots)
    monkeypatch.setattr(attention_module, "_attn_bwd_dkdv_kernel", Recorder())
    torch.manual_seed(0)
    inputs = _gqa_inputs(1, 8, 2, 20, 33, 16, dtype, device)  # 2 key tiles x 2 heads: 4 programs whole
    do = torch.randn(1, 8, 20, 16, device=device).to(dtype)
    _compare(_separate, inputs, do, atol, rtol, peer=_gqa_peer(True), enable_gqa=True)
    assert launches == [parts]


@pytest.mark.parametrize("group, programs, slots, parts", [
    (1, 8, 1000, 1),  # multi-head: nothing to split
    (4, 512, 264, 1),  # enough programs with whole groups
    (16, 128, 264, 4),  # the fewest parts that fill the slots
    (6, 10, 25, 3),
    (6, 10, 1000, 6),  # at most a part per query head
])
def test_group_splits(group, programs, slots, parts):
    assert attention_module._group_splits(group, programs, slots) == parts


@pytest.mark.parametrize("cap", [4, 6], ids=["every-grid-split", "dkdv-grid-whole"])
def test_grouped_query_attention_under_the_split_grid(cap, monkeypatch, device):
    """The split grid, forced by lowering the cap: at 4 every kernel's grid splits, at 6
    the query-head grids (B * H = 12) split and dK/dV's (B * H // G = 6) does not. In the
    model's (B, T, H, D) layout, where a (batch, head) pair read as another is off."""
    monkeypatch.setattr(attention_module, "_MAX_GRID_AXIS", cap)
    torch.manual_seed(0)
    inputs = [t.transpose(1, 2).contiguous() for t in _gqa_inputs(3, 4, 2, 17, 17, 16, torch.float32, device)]
    do = torch.randn(3, 4, 17, 16, device=device)
    _compare(lambda *t: [x.transpose(1, 2) for x in t], inputs, do, 1e-5, 1e-5, peer=_gqa_peer(True),
             enable_gqa=True)


def test_grouped_query_attention_through_tma(monkeypatch, device):
    """Every kernel's looped-over tiles by TMA descriptors: K and V at head h // G, dK/dV's
    Q and dO tiles at each head of the group."""
    if device == "cuda":
        pytest.skip("test_grouped_query_attention_gpu runs on Hopper's own table")
    calls = _tma_launches(monkeypatch)
    torch.manual_seed(0)
    inputs = _gqa_inputs(2, 4, 2, 50, 70, 16, torch.float32, device)  # both key loops run (masked, unmasked)
    do = torch.randn(2, 4, 50, 16, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, peer=_gqa_peer(True), enable_gqa=True)
    assert calls == [True] * 3


@pytest.mark.parametrize("k_heads, enable_gqa, match", [
    (2, False, "q has 4 heads and k 2; they must agree, or pass enable_gqa=True"),
    (3, True, r"q's heads \(4\) to be a multiple of k's \(3\)"),
    (0, True, r"q's heads \(4\) to be a multiple of k's \(0\)"),
])
def test_grouped_query_attention_refuses_heads_that_do_not_divide(k_heads, enable_gqa, match, device):
    q = torch.ones(1, 4, 8, 16, device=device)
    kv = torch.ones(1, k_heads, 8, 16, device=device)
    with pytest.raises(ValueError, match=match):
        attention(q, kv, kv, enable_gqa=enable_gqa)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_attention_gpu(D, causal, dtype, atol, rtol):
    torch.manual_seed(0)
    inputs = _gqa_inputs(2, 8, 2, 1000, 1000, D, dtype, "cuda")
    do = torch.randn(2, 8, 1000, D, device="cuda").to(dtype)
    _compare(_separate, inputs, do, atol, rtol, causal=causal, peer=_gqa_peer(causal), enable_gqa=True)


# return_lse: the natural log-sum-exp of each query's scaled scores, differentiable.

def _with_lse(B, H, Hk, Tq, Tk, D, causal, dtype, device, upstream=True, **options):
    """(output, lse) and the gradients of q, k, v through o . do + lse . dlse (or lse . dlse
    alone), ours and the reference's in float64."""
    torch.manual_seed(0)
    inputs = _gqa_inputs(B, H, Hk, Tq, Tk, D, dtype, device)
    do, dlse = torch.randn(B, H, Tq, D, device=device).to(dtype), torch.randn(B, H, Tq, device=device)
    results = []
    for fn, cast in ((attention, lambda t: t), (reference.attention, lambda t: t.double())):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        o, lse = fn(*leaves, causal=causal, return_lse=True, enable_gqa=H != Hk,
                    **(options if fn is attention else {}))
        loss = (lse * cast(dlse)).sum() + ((o * cast(do)).sum() if upstream else 0)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append([o, lse, *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))])
    return results


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, H, Hk, Tq, Tk, D, causal", [
    pytest.param(2, 2, 2, 17, 17, 16, True, id="T17"),
    pytest.param(1, 2, 2, 5, 37, 32, True, id="Tq5-Tk37"),
    pytest.param(1, 2, 2, 40, 21, 16, False, id="Tq40-Tk21-full"),
    pytest.param(1, 4, 2, 19, 33, 16, True, id="gqa"),
])
def test_log_sum_exp_and_its_gradient(B, H, Hk, Tq, Tk, D, causal, dtype, atol, device):
    """return_lse: the lse (B, H, Tq) fp32 in base e, and the gradients through the output
    and the lse both (dS gains P * dlse: delta loses dlse), against float64."""
    ours, exact = _with_lse(B, H, Hk, Tq, Tk, D, causal, dtype, device)
    assert ours[1].dtype == torch.float32 and ours[1].shape == (B, H, Tq)
    for name, got, want in zip(["output", "lse", "dq", "dk", "dv"], ours, exact):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol, msg=name)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradient_of_the_log_sum_exp_alone(dropout_p, device):
    """Only the lse used (the output's gradient None): dq and dk are those of the lse, which
    dropout does not touch, and dv is zero."""
    ours, exact = _with_lse(1, 2, 2, 20, 45, 16, True, torch.float32, device, upstream=False, dropout_p=dropout_p,
                            seed=3)
    for name, got, want in zip(["lse", "dq", "dk", "dv"], ours[1:], exact[1:]):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=name)


def test_an_unused_log_sum_exp_costs_the_backward_nothing(monkeypatch, device):
    """Without return_lse the backward gets no lse gradient, eager and compiled alike, so it
    does not subtract a tensor of zeros from delta; nor eager with the lse returned and
    unused. (A compiled region's unused output gets zeros from AOTAutograd.)"""
    seen = []
    backward = attention_module._attention_bwd
    monkeypatch.setattr(attention_module, "_attention_bwd", lambda *args: seen.append(args[-1]) or backward(*args))
    x = torch.randn(1, 2, 8, 16, device=device, requires_grad=True)
    attention(x, x, x).sum().backward()
    attention(x, x, x, return_lse=True)[0].sum().backward()
    torch.compile(attention, fullgraph=True, backend="aot_eager")(x, x, x).sum().backward()
    assert seen == [None] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize("D", [64, 128])
def test_log_sum_exp_gpu(D, dtype, atol, rtol):
    """return_lse on the GPU's tiles, grouped, the output's and the lse's gradients both,
    within twice torch's own error in the dtype (its lse in fp32) plus atol + rtol * max."""
    torch.manual_seed(0)
    B, H, Hk, T = 2, 8, 2, 1000
    inputs = _gqa_inputs(B, H, Hk, T, T, D, dtype, "cuda")
    do, dlse = torch.randn(B, H, T, D, device="cuda").to(dtype), torch.randn(B, H, T, device="cuda")
    results = []
    for fn, cast in ((attention, lambda t: t), (reference.attention, lambda t: t), (reference.attention, torch.Tensor.double)):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        o, lse = fn(*leaves, return_lse=True, enable_gqa=True)
        results.append([o, lse, *torch.autograd.grad((o * cast(do)).sum() + (lse * cast(dlse)).sum(), leaves)])
    for name, ours, theirs, exact in zip(["output", "lse", "dq", "dk", "dv"], *results):
        err, torch_err = ((t.double() - exact).abs().max().item() for t in (ours, theirs))
        assert err <= 2 * torch_err + atol + rtol * exact.abs().max().item(), f"{name}: {err:.3g} ({torch_err:.3g})"


# A causal sliding window (window=W): each query sees its W latest keys, itself included.

def _window_peer(window, enable_gqa=False):
    return lambda q, k, v: reference.attention(q, k, v, window=window, enable_gqa=enable_gqa)


def _window_mask(Tq, Tk, window, device):
    """(Tq, Tk): True where query i (position Tk - Tq + i) sees key j, written out."""
    pos = torch.arange(Tq, device=device)[:, None] + Tk - Tq
    j = torch.arange(Tk, device=device)[None, :]
    return (j <= pos) & (j > pos - window)


def test_the_reference_window_is_the_written_out_mask(device):
    """The oracle's window is the definition: scores masked outside (pos - W, pos]."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 9, 20, 16, torch.float64, device)
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~_window_mask(9, 20, 5, device), float("-inf"))
    torch.testing.assert_close(reference.attention(q, k, v, window=5), scores.softmax(-1) @ v)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("B, H, Tq, Tk, D, window", [
    pytest.param(1, 2, 37, 37, 16, 5, id="W5-narrower-than-a-tile"),
    pytest.param(2, 2, 64, 64, 32, 17, id="W17-B2"),
    pytest.param(1, 1, 130, 130, 16, 33, id="W33-T130"),
    pytest.param(1, 2, 64, 64, 16, 16, id="W16-a-tile"),
    pytest.param(1, 1, 20, 50, 16, 8, id="Tq20-Tk50"),
    pytest.param(1, 1, 1, 30, 16, 4, id="decode-Tq1"),
    pytest.param(1, 2, 40, 40, 16, 1, id="W1-itself-only"),
    # The interpreter's 32-query, 16-key tiles: at W = 15 a tile's last row misses the first
    # key of the tile its first row opens (32 - 15 = 17 keys past a tile edge); at W = 18
    # and 2, a tile's first row sees only the last key of a key tile (32 - 18 + 1 = 15).
    pytest.param(1, 1, 64, 64, 16, 15, id="W15-last-row-one-short"),
    pytest.param(1, 1, 64, 64, 16, 18, id="W18-first-row-last-key"),
    pytest.param(1, 1, 64, 64, 16, 2, id="W2"),
    # At W = 47 the tiles wholly in every row's window start one key past a tile edge: the
    # forward's query tile at 64 (64 + 32 - 47 = 49 = 3 * 16 + 1), and dK/dV's last
    # unmasked query step (key tile 0's queries to 47, 16 past its diagonal's 32).
    pytest.param(1, 1, 128, 128, 16, 47, id="W47-one-past-a-tile-edge"),
])
def test_sliding_window(B, H, Tq, Tk, D, window, dtype, atol, rtol, device):
    """Output and dq, dk, dv: the tiles out of every row's window skipped, the window's
    edge masked in each kernel, rows that see no key of a tile kept finite."""
    torch.manual_seed(0)
    inputs = _qkv(B, H, Tq, Tk, D, dtype, device)
    do = torch.randn(B, H, Tq, D, device=device).to(dtype)
    _compare(_separate, inputs, do, atol, rtol, peer=_window_peer(window), window=window)


def test_a_window_as_long_as_the_keys_is_plain_causal_attention(device):
    """window >= Tk masks nothing the causal mask leaves: the same bits as no window."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 30, 45, 16, torch.float32, device)
    for window in (45, 1000):
        assert torch.equal(attention(q, k, v, window=window), attention(q, k, v))


def test_sliding_window_with_grouped_query_attention_and_the_lse(device):
    torch.manual_seed(0)
    inputs = _gqa_inputs(1, 4, 2, 50, 50, 16, torch.float32, device)
    do = torch.randn(1, 4, 50, 16, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, peer=_window_peer(9, enable_gqa=True), window=9, enable_gqa=True)
    q, k, v = (t.double() for t in inputs)
    _, lse = attention(*inputs, window=9, enable_gqa=True, return_lse=True)
    _, want = reference.attention(q, k, v, window=9, enable_gqa=True, return_lse=True)
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)


def test_sliding_window_with_dropout(device):
    """The mask the kernels draw at each position is the one without a window: the
    windowed output is the dropped-out attention under the window's mask."""
    torch.manual_seed(0)
    p, seed, window, T = 0.3, 1234, 11, 40
    keep = _kept(1, 2, T, T, True, p, seed, device)
    mask = _window_mask(T, T, window, device)

    def peer(q, k, v):
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) * keep.to(q.dtype) / (1 - p)) @ v
    inputs = _qkv(1, 2, T, T, 16, torch.float32, device)
    do = torch.randn(1, 2, T, 16, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, peer=peer, dropout_p=p, seed=seed, window=window)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["hopper", "sm80"])
@pytest.mark.parametrize("D", [16, 64, 128])
def test_sliding_window_with_gpu_tile_shapes_in_interpreter(capability, D, monkeypatch, device):
    """The GPU tables' tiles (128-row query tiles, 32-query dK/dV steps): windows narrower
    than a tile, between tiles, and spanning several."""
    if device == "cuda":
        pytest.skip("the GPU runs its own table in test_sliding_window_gpu")
    monkeypatch.setattr(attention_module, "device_capability", lambda index=0: capability)
    torch.manual_seed(0)
    for Tq, Tk, window in [(300, 300, 50), (77, 300, 200), (260, 260, 129)]:
        inputs = _qkv(1, 1, Tq, Tk, D, torch.float16, device)
        do = torch.randn(1, 1, Tq, D, device=device).to(torch.float16)
        _compare(_separate, inputs, do, 1e-3, 1e-3, peer=_window_peer(window), window=window)


def test_sliding_window_with_tma(monkeypatch, device):
    if device == "cuda":
        pytest.skip("test_sliding_window_gpu runs the GPU's settings")
    calls = _tma_launches(monkeypatch)
    torch.manual_seed(0)
    inputs = _qkv(2, 2, 50, 50, 16, torch.float32, device)
    do = torch.randn(2, 2, 50, 16, device=device)
    _compare(_separate, inputs, do, 1e-5, 1e-5, peer=_window_peer(7), window=7)
    assert calls == [True] * 3


@pytest.mark.parametrize("options, match", [
    (dict(window=0), "window must be a positive int"),
    (dict(window=2.5), "window must be a positive int"),
    (dict(window=True), "window must be a positive int"),
    (dict(window=4, causal=False), "pass causal=True"),
])
def test_invalid_window(options, match, device):
    q = torch.randn(1, 1, 8, 16, device=device)
    with pytest.raises(ValueError, match=match):
        attention(q, q, q, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize("D", [64, 128])
def test_sliding_window_gpu(D, dtype, atol, rtol):
    torch.manual_seed(0)
    inputs = _qkv(2, 4, 2048, 2048, D, dtype, "cuda")
    do = torch.randn(2, 4, 2048, D, device="cuda").to(dtype)
    for window in (100, 512):
        _compare(_separate, inputs, do, atol, rtol, peer=_window_peer(window), window=window)
