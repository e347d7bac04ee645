"""Triton LayerNorm (kernels/layer_norm.py) against kernels/reference.py in float64
(tolerances: tests/compare.py)."""
import importlib

import pytest
import torch

from compare import compare as _compare, run as _run
from kernels import reference
from kernels._utils import cdiv
from kernels.layer_norm import add_layer_norm, layer_norm

TOLERANCES = [  # dtype, atol, rtol
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
]
GPU_TOLERANCES = TOLERANCES + [pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16")]

# Leading shape, N and how x reaches the kernel: edges of the blocking heuristic
# (M=1, N=1, N not a power of two, several rows per program, one row per program, a
# forward tile of its own beside the backward's, with a ragged last tile, several backward
# programs each looping over tiles, the largest fp32 row).
SHAPES = [
    pytest.param((1,), 64, "contiguous", id="M1"),
    pytest.param((37,), 100, "contiguous", id="N100"),
    pytest.param((5,), 1, "contiguous", id="N1"),
    pytest.param((2, 3), 48, "contiguous", id="3d"),
    pytest.param((1000,), 32, "contiguous", id="many-programs"),
    pytest.param((5,), 768, "contiguous", id="N768-narrow-forward-tile"),
    pytest.param((3,), 5000, "contiguous", id="N5000"),
    pytest.param((2,), 16384, "contiguous", id="N16384"),
    pytest.param((24,), 40, "transposed", id="transposed"),
    pytest.param((2, 9), 40, "sliced", id="sliced"),
]


def _make(lead, N, layout, dtype, device):
    """A leaf tensor and the view of it (..., N) that is passed to the op."""
    if layout == "contiguous":
        return torch.randn(*lead, N, device=device).mul(2).add(1).to(dtype), lambda t: t
    if layout == "transposed":  # (M, N) with column stride M
        return torch.randn(N, *lead, device=device).to(dtype), lambda t: t.t()
    if layout == "sliced":  # rows of a wider tensor: row stride N + 7
        return torch.randn(*lead, N + 7, device=device).to(dtype), lambda t: t[..., :N]
    raise AssertionError(layout)


def _params(N, dtype, device, bias=True):
    w = torch.randn(N, device=device).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return w, b


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("lead, N, layout", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layer_norm(lead, N, layout, dtype, atol, rtol, bias, device):
    torch.manual_seed(0)
    x, view = _make(lead, N, layout, dtype, device)
    w, b = _params(N, dtype, device, bias)
    dy = torch.randn(view(x).shape, device=device).to(dtype)
    _compare(
        lambda x, w, b: layer_norm(view(x), w, b, 1e-5),
        lambda x, w, b: reference.layer_norm(view(x), w, b, 1e-5),
        [x, w, b], [dy], atol, rtol,
    )


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("lead, N, layout", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_add_layer_norm(lead, N, layout, dtype, atol, rtol, bias, device):
    torch.manual_seed(0)
    if N == 1:
        # x_hat is exactly 0 and rstd = 1/sqrt(eps) ~ 316 magnifies rounding in dx, which
        # torch happens to compute exactly: allow that rounding (seen on an H200 with FMA).
        atol = max(atol, 1e-4)
    x, view = _make(lead, N, layout, dtype, device)
    r, _ = _make(lead, N, layout, dtype, device)
    w, b = _params(N, dtype, device, bias)
    shape = view(x).shape
    ds, dy = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
    _compare(
        lambda x, r, w, b: add_layer_norm(view(x), view(r), w, b, 1e-5),
        lambda x, r, w, b: reference.add_layer_norm(view(x), view(r), w, b, 1e-5),
        [x, r, w, b], [ds, dy], atol, rtol,
    )


def test_mixed_dtypes(device):
    """fp32 weights beside fp16 activations, an fp32 residual stream plus an fp16 branch
    (what autocast produces): dtypes of outputs and gradients follow torch's."""
    torch.manual_seed(0)
    N = 96
    x16 = torch.randn(6, N, device=device).half()
    x32 = torch.randn(6, N, device=device)
    w, b = _params(N, torch.float32, device)
    # torch's CUDA layer_norm refuses mixed dtypes (autocast runs it in fp32): so does the oracle.
    mixed_reference = lambda x, w, b: reference.layer_norm(x.to(w.dtype), w, b).to(x.dtype)
    _compare(layer_norm, mixed_reference, [x16, w, b], [torch.randn_like(x16)], 1e-3, 1e-3)
    # Weight and bias of two dtypes: each gradient is rounded to its own parameter's dtype.
    one_dtype = lambda x, w, b: reference.layer_norm(x, w.to(x.dtype), b.to(x.dtype))
    _compare(layer_norm, one_dtype, [x32, w.half(), b], [torch.randn_like(x32)], 1e-5, 1e-5)
    _compare(add_layer_norm, reference.add_layer_norm, [x32, x16, w, b], [torch.randn_like(x32)] * 2, 1e-3, 1e-3)
    # The low-precision one first: the outputs take the promoted dtype, not x's.
    _compare(add_layer_norm, reference.add_layer_norm, [x16, x32, w, b], [torch.randn_like(x32)] * 2, 1e-3, 1e-3)


def test_eps_and_empty_input(device):
    torch.manual_seed(0)
    x = torch.randn(4, 16, device=device) * 1e-3  # variance comparable to eps
    w, b = _params(16, torch.float32, device)
    for eps in (1e-5, 1e-2):
        torch.testing.assert_close(layer_norm(x, w, b, eps), reference.layer_norm(x, w, b, eps))
    empty = torch.randn(0, 16, device=device, requires_grad=True)
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
    y = layer_norm(empty, w, b)
    y.sum().backward()
    assert y.shape == (0, 16) and empty.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))  # no rows, no gradient


@pytest.mark.parametrize("eps", [1e-5, 1e-12], ids=["eps1e-5", "eps1e-12"])
@pytest.mark.parametrize("dtype, N", [(torch.float32, 768), (torch.float32, 16384), (torch.float16, 768),
                                      (torch.float16, 12289)], ids=["fp32-768", "fp32-16384", "fp16-768", "fp16-12289"])
@pytest.mark.parametrize("residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_constant_rows(residual, dtype, N, eps, device):
    """Rows with no spread (variance 0): torch gives x_hat exactly 0, so y is the bias and
    dx the centred w * dy times rstd. A mean an ulp off the row's value is magnified by
    rstd = 1 / sqrt(eps) (316 at 1e-5, 1e6 at 1e-12, BERT's eps) into y, dx and dweight, as
    in Triton's tutorial and Liger-Kernel (+-4e-4 in y at 1e-5). fp32 rows, and fp16 rows
    past 8192, whose sums can round, are shifted by their first element; the others' sums
    are exact (an fp16 row of 12289 rounds where 16384 would not)."""
    torch.manual_seed(0)
    M = 6
    # Random values, and values with every mantissa bit set (whose multiples round soonest).
    full = (2.0 - 2.0 ** -{torch.float32: 23, torch.float16: 10}[dtype]) * torch.tensor([[1.0], [-4.0], [0.25]])
    values = torch.cat([torch.randn(M - 3, 1), full]).to(device, dtype)
    x = values.expand(M, N).contiguous()
    w, b = _params(N, dtype, device)
    if dtype == torch.float16 and eps < 1e-6:
        pytest.skip("dx ~ dy / sqrt(eps) passes fp16's range, and torch's own fp16 result is NaN")
    dy = torch.randn(M, N, device=device).to(dtype)
    atol = rtol = 1e-5 if dtype == torch.float32 else 1e-3
    if not residual:
        ours = lambda x, w, b: layer_norm(x, w, b, eps)
        _compare(ours, lambda x, w, b: reference.layer_norm(x, w, b, eps), [x, w, b], [dy], atol, rtol)
        assert torch.equal(ours(x, w, b), b.expand(M, N))
        return
    # Neither x nor the residual is constant, their sum is: steps of an eighth of the
    # value's binade, taken off toward 0, keep x exact and x + r the value.
    binade = 2.0 ** values.double().abs().log2().floor()
    r = (values.double().sign() * torch.randint(0, 4, (M, N), device=device) * binade / 8).to(dtype)
    x = (x.double() - r.double()).to(dtype)
    assert torch.equal(x + r, values.expand(M, N))
    ds = torch.randn_like(dy)
    ours = lambda x, r, w, b: add_layer_norm(x, r, w, b, eps)
    _compare(ours, lambda x, r, w, b: reference.add_layer_norm(x, r, w, b, eps), [x, r, w, b], [ds, dy], atol, rtol)
    assert torch.equal(ours(x, r, w, b)[1], b.expand(M, N))


def test_broadcast_upstream_gradient_and_strided_weight(device):
    """y.sum().backward() hands the backward an expanded (stride 0) gradient; a weight
    may be a strided view."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, device=device)
    w_base, b = _params(48, torch.float32, device)
    ours = _run(lambda x, w, b: layer_norm(x, w[::2], b[:24]).sum(), [x, w_base, b], [torch.tensor(1.0, device=device)])
    ref = _run(lambda x, w, b: reference.layer_norm(x, w[::2], b[:24]).sum(), [x, w_base, b], [torch.tensor(1.0, device=device)])
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_many_partial_rows(monkeypatch, device):
    """More backward programs than the partial-row sum takes per step (its loop and ragged
    last step), each program looping over two tiles, the last over one."""
    module = importlib.import_module("kernels.layer_norm")
    monkeypatch.setattr(module, "_INTERPRET_PROGRAMS", 66)
    torch.manual_seed(0)
    N = 512
    M = 131 * module._settings(N, 4).bwd_block_m  # 131 tiles over 66 programs: 66 partial rows
    assert cdiv(131, cdiv(131, 66)) > module._SUM_ROWS
    x = torch.randn(M, N, device=device)
    w, b = _params(N, torch.float32, device)
    if device == "cuda":  # as many programs on a GPU, whatever its SM count
        monkeypatch.setattr(module, "sm_count", lambda index: 66 // module._programs_per_sm(module._settings(N, 4).bwd_warps))
    _compare(layer_norm, reference.layer_norm, [x, w, b], [torch.randn_like(x)], 1e-5, 1e-5)


@pytest.mark.parametrize("residual, bias", [(False, True), (True, True), (False, False)],
                         ids=["layer_norm", "add_layer_norm", "layer_norm-no-bias"])
@pytest.mark.parametrize("N, dtype", [(40, torch.float32), (300, torch.float16)], ids=["N40-fp32", "N300-fp16"])
def test_persistent_forward(N, dtype, residual, bias, monkeypatch, device):
    """The persistent forward (a sweep candidate: programs walking tiles in a pipelined
    loop, weight and bias loaded once a program) on ragged shapes: 4 programs over 10 tiles
    and a ragged last one, some programs walking three tiles, others two."""
    module = importlib.import_module("kernels.layer_norm")
    original = module._settings
    monkeypatch.setattr(module, "_settings", lambda n, e: original(n, e)._replace(fwd_stages=2, fwd_programs_per_sm=1))
    if device == "cuda":
        monkeypatch.setattr(module, "sm_count", lambda index: module._INTERPRET_PROGRAMS)
    torch.manual_seed(0)
    M = 9 * original(N, torch.tensor([], dtype=dtype).element_size()).fwd_block_m + 1
    x, r = (torch.randn(M, N, device=device).to(dtype) for _ in range(2))
    w, b = _params(N, dtype, device, bias)
    atol = rtol = 1e-5 if dtype == torch.float32 else 1e-3
    kernel, grids = module._layer_norm_fwd_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, "_layer_norm_fwd_kernel", Recorder())
    if residual:
        _compare(add_layer_norm, reference.add_layer_norm, [x, r, w, b], [torch.randn_like(x)] * 2, atol, rtol)
    else:
        _compare(layer_norm, reference.layer_norm, [x, w, b], [torch.randn_like(x)], atol, rtol)
    assert grids and all(g == (module._INTERPRET_PROGRAMS,) for g in grids)


@pytest.mark.parametrize("residual", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_forward_tile_differs_from_backward(residual, monkeypatch, device):
    """A forward tile of its own (a sweep candidate: Liger's one row a program) beside the
    backward's stacked rows: the statistics the forward saves are per row, whatever tile
    wrote them, and the backward reads them with its own."""
    module = importlib.import_module("kernels.layer_norm")
    original = module._settings
    N = 40
    assert original(N, 4).bwd_block_m > 1
    monkeypatch.setattr(module, "_settings", lambda n, e: original(n, e)._replace(fwd_block_m=1, fwd_warps=1))
    kernel, rows = module._layer_norm_fwd_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            launch = kernel[grid]
            return lambda *args, **kw: (rows.append(kw["BLOCK_M"]), launch(*args, **kw))

    monkeypatch.setattr(module, "_layer_norm_fwd_kernel", Recorder())
    torch.manual_seed(0)
    x, r = (torch.randn(3 * original(N, 4).bwd_block_m + 1, N, device=device) for _ in range(2))
    w, b = _params(N, torch.float32, device)
    if residual:
        _compare(add_layer_norm, reference.add_layer_norm, [x, r, w, b], [torch.randn_like(x)] * 2, 1e-5, 1e-5)
    else:
        _compare(layer_norm, reference.layer_norm, [x, w, b], [torch.randn_like(x)], 1e-5, 1e-5)
    assert rows and set(rows) == {1}


@pytest.mark.parametrize("used", ["sum", "normalised"])
def test_one_output_of_add_layer_norm_unused(used, device):
    """An output without a gradient (autograd passes None) is handled like the reference:
    with only the sum used, the parameters get no gradient at all."""
    torch.manual_seed(0)
    x, r = (torch.randn(3, 8, device=device) for _ in range(2))
    w, b = _params(8, torch.float32, device)
    pick = (lambda s, y: s * 3) if used == "sum" else (lambda s, y: y * 3)
    one = torch.tensor(1.0, device=device)
    ours = _run(lambda *a: pick(*add_layer_norm(*a)).sum(), [x, r, w, b], [one])
    ref = _run(lambda *a: pick(*reference.add_layer_norm(*a)).sum(), [x, r, w, b], [one])
    for o, e in zip(ours, ref):
        assert (o is None) == (e is None)
        if o is not None:
            torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "x_shape, w_shape, b_shape, x_dtype, w_device, match",
    [
        ((4, 8), (9,), (8,), torch.float32, None, "weight must have shape"),
        ((4, 8), (8,), (4, 8), torch.float32, None, "bias must have shape"),
        ((4, 8), (8,), (8,), torch.int32, None, "dtype"),
        ((4, 8), (8,), (8,), torch.float32, "meta", "one device"),
        ((2, 16385), (16385,), (16385,), torch.float32, None, "limit of 16384"),
    ],
    ids=["weight-shape", "bias-shape", "int-dtype", "devices", "too-wide"],
)
def test_invalid_inputs(x_shape, w_shape, b_shape, x_dtype, w_device, match, device):
    x = torch.ones(x_shape, device=device, dtype=x_dtype)
    w = torch.ones(w_shape, device=w_device or device)
    b = torch.ones(b_shape, device=device)
    with pytest.raises(ValueError, match=match):
        layer_norm(x, w, b)
    with pytest.raises(ValueError, match=match):
        add_layer_norm(x, x.clone(), w, b)


def test_row_limit_is_the_widest_activations(device):
    """add_layer_norm of an fp16 branch beside an fp32 residual stream (autocast's mix): the
    row limit is fp32's, 16384 elements (64 KiB), whichever of the two is the wider; rows
    are refused before anything is launched."""
    x, r = torch.zeros(2, 16385, device=device).half(), torch.zeros(2, 16385, device=device)
    w = torch.ones(16385, device=device)
    for a, b in ((x, r), (r, x)):
        with pytest.raises(ValueError, match="limit of 16384"):
            add_layer_norm(a, b, w, None)


def test_rows_past_int32_are_refused(monkeypatch, device):
    """2^30 rows (views: no memory) are refused before anything is allocated or launched;
    from 2^31 - 4096 the kernels' int32 row indices wrapped."""
    monkeypatch.setattr(importlib.import_module("kernels.layer_norm"), "_layer_norm_fwd_kernel", None)
    x, w = torch.zeros(1, 1, device=device).expand(2**30, 1), torch.ones(1, device=device)
    with pytest.raises(ValueError, match=r"1073741824 rows must be fewer than 2\^30"):
        layer_norm(x, w, None)
    with pytest.raises(ValueError, match=r"rows must be fewer than 2\^30"):
        add_layer_norm(x, x, w, None)


class _Reached(Exception):
    """Raised where the inputs are laid out for the kernels: they got past every check."""


def test_rows_are_counted_over_every_leading_dim(monkeypatch, device):
    """The row limit counts the rows of every leading dim: a (2^15, 2^15, 1) view is 2^30
    rows, refused; 2^30 - 1 rows over three leading dims are taken. Views (no memory), stopped
    where the rows are laid out for the kernels, before the outputs and the (rows,) fp32
    statistics (12 GB and more here) would be allocated."""
    def reached(*args, **kwargs):
        raise _Reached
    monkeypatch.setattr(importlib.import_module("kernels.layer_norm"), "_rows", reached)
    w = torch.ones(1, device=device)
    x = torch.zeros(1, 1, 1, device=device)
    with pytest.raises(ValueError, match=r"1073741824 rows must be fewer than 2\^30"):
        layer_norm(x.expand(2**15, 2**15, 1), w, None)
    for fn in (layer_norm, lambda x, w, b: add_layer_norm(x, x, w, b)):
        with pytest.raises(_Reached):
            fn(x.expand(3, 3, (2**30 - 1) // 9, 1), w, None)


def test_residual_shape_mismatch(device):
    x, w = torch.ones(4, 8, device=device), torch.ones(8, device=device)
    with pytest.raises(ValueError, match="residual has shape"):
        add_layer_norm(x, torch.ones(2, 8, device=device), w, None)


def test_cpu_without_interpreter_points_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.ones(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="kernels.reference.layer_norm"):
        layer_norm(x, w, None)
    with pytest.raises(ValueError, match="kernels.reference.add_layer_norm"):
        add_layer_norm(x, x, w, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("N", [768, 1024, 4096, 8192])
def test_constant_rows_gpu(N, dtype):
    """A constant row normalises to exactly the bias on the GPU too, where the fp32 division
    the mean takes is approximate (div.full): each tile, the persistent one at 8192."""
    torch.manual_seed(0)
    M = 4096
    values = torch.randn(M, 1, device="cuda").to(dtype)
    x = values.expand(M, N).contiguous()
    w, b = _params(N, dtype, "cuda")
    for eps in (1e-5, 1e-12):
        assert torch.equal(layer_norm(x, w, b, eps), b.expand(M, N)), eps
        assert torch.equal(add_layer_norm(x, torch.zeros_like(x), w, b, eps)[1], b.expand(M, N)), eps


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize("N", [768, 1024, 1600, 4096, 8192, 16384])
def test_large_gpu(N, dtype, atol, rtol):
    torch.manual_seed(0)
    M = 4096
    x, r = (torch.randn(M, N, device="cuda").to(dtype) for _ in range(2))
    w, b = _params(N, dtype, "cuda")
    ds, dy = (torch.randn(M, N, device="cuda").to(dtype) for _ in range(2))
    _compare(layer_norm, reference.layer_norm, [x, w, b], [dy], atol, rtol)
    _compare(add_layer_norm, reference.add_layer_norm, [x, r, w, b], [ds, dy], atol, rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1024, 8192])
def test_backward_is_deterministic_gpu(N):
    """Bitwise-equal gradients run to run: no atomics in the dweight/dbias reduction."""
    torch.manual_seed(0)
    x = torch.randn(8192, N, device="cuda", dtype=torch.bfloat16)
    w, b = _params(N, torch.bfloat16, "cuda")
    dy = torch.randn_like(x)
    first, second = (_run(layer_norm, [x, w, b], [dy]) for _ in range(2))
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.gpu
def test_widest_half_row_gpu():
    torch.manual_seed(0)
    x = torch.randn(64, 32768, device="cuda", dtype=torch.bfloat16)
    w, b = _params(32768, torch.bfloat16, "cuda")
    _compare(layer_norm, reference.layer_norm, [x, w, b], [torch.randn_like(x)], 1e-2, 1e-2)


def test_add_layer_norm_residual_with_its_own_row_stride(device):
    """x contiguous, residual rows of a wider tensor (and the other way round)."""
    torch.manual_seed(0)
    M, N = 9, 40
    x = torch.randn(M, N, device=device)
    r_wide = torch.randn(M, N + 7, device=device)
    w, b = torch.randn(N, device=device), torch.randn(N, device=device)
    ds, dy = torch.randn(M, N, device=device), torch.randn(M, N, device=device)
    for fx, fr, xx, rr in [(lambda t: t, lambda t: t[:, :N], x, r_wide),
                           (lambda t: t[:, :N], lambda t: t, r_wide, x)]:
        _compare(lambda a, c, w, b: add_layer_norm(fx(a), fr(c), w, b, 1e-5),
                 lambda a, c, w, b: reference.add_layer_norm(fx(a), fr(c), w, b, 1e-5),
                 [xx, rr, w, b], [ds, dy], 1e-5, 1e-5)


def test_add_layer_norm_upstream_gradients_with_their_own_row_strides(device):
    """The backward reads dy and the sum's gradient through one row stride each: here the
    sum's gradient is rows of a wider tensor and dy contiguous (and the other way round),
    handed to autograd as they are (compare.run's clones would make them contiguous)."""
    torch.manual_seed(0)
    M, N = 9, 40
    x, r = torch.randn(M, N, device=device), torch.randn(M, N, device=device)
    w, b = torch.randn(N, device=device), torch.randn(N, device=device)
    narrow, wide = torch.randn(M, N, device=device), torch.randn(M, N + 7, device=device)[:, :N]
    for upstream in [(wide, narrow), (narrow, wide)]:
        grads = []
        for op in (add_layer_norm, reference.add_layer_norm):
            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            torch.autograd.backward(op(*leaves, 1e-5), upstream)
            grads.append([t.grad for t in leaves])
        for ours, ref in zip(*grads):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
