"""Triton FFN (kernels/ffn.py) against kernels/reference.py in float64: the output and all
five gradients (tolerances: tests/compare.py)."""
import importlib

import pytest
import torch

from compare import compare, far_apart
from kernels import reference
from kernels.ffn import ffn

# The module itself: `kernels.ffn` is the function once the package has imported it.
ffn_module = importlib.import_module("kernels.ffn")
# The split-K policy itself, which `pytest --candidates` replaces in the module (tests/candidates.py).
_k_splits = ffn_module._k_splits
_split_plan = ffn_module._split_plan

TOLERANCES = [  # dtype, atol, rtol
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
]
GPU_TOLERANCES = TOLERANCES + [pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16")]


def _weights(C, hidden, dtype, device, bias=True, out=None):
    out = C if out is None else out
    # nn.Linear's scale, so that the hidden pre-activations land where GELU bends.
    fc_w = (torch.randn(hidden, C, device=device) / C**0.5).to(dtype)
    proj_w = (torch.randn(out, hidden, device=device) / hidden**0.5).to(dtype)
    fc_b = torch.randn(hidden, device=device).to(dtype) if bias else None
    proj_b = torch.randn(out, device=device).to(dtype) if bias else None
    return fc_w, fc_b, proj_w, proj_b


def _check(x, view, weights, dtype, atol, rtol, recompute_pre=False):
    fc_w, fc_b, proj_w, proj_b = weights
    shape = view(x).shape[:-1] + (proj_w.shape[0],)
    dy = torch.randn(shape, device=x.device).to(dtype)
    compare(
        lambda x, *w: ffn(view(x), *w, recompute_pre=recompute_pre),
        lambda x, *w: reference.ffn(view(x), *w),
        [x, fc_w, fc_b, proj_w, proj_b], [dy], atol, rtol,
    )


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize(
    "lead, C",
    [
        pytest.param((37,), 16, id="M37-C16"),
        pytest.param((70,), 32, id="M70-C32"),
        pytest.param((3, 11), 48, id="3d-C48"),
        pytest.param((1,), 48, id="M1"),
    ],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_ffn(lead, C, bias, dtype, atol, rtol, device):
    torch.manual_seed(0)
    x = torch.randn(*lead, C, device=device).to(dtype)
    _check(x, lambda t: t, _weights(C, 4 * C, dtype, device, bias), dtype, atol, rtol)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_input(layout, device):
    """x as a transposed view (column stride M) or as columns of a wider tensor."""
    torch.manual_seed(0)
    C = 32
    if layout == "transposed":
        x, view = torch.randn(C, 40, device=device), lambda t: t.t()
    else:
        x, view = torch.randn(2, 20, C + 8, device=device), lambda t: t[..., 4 : 4 + C]
    _check(x, view, _weights(C, 4 * C, torch.float32, device), torch.float32, 1e-5, 1e-5)


class _FarApart(torch.autograd.Function):
    """x laid out by far_apart (rows `stride` elements apart), its gradient passed through:
    compare's leaves are contiguous clones, and autograd through the view itself would
    materialise a gradient for the whole storage."""

    @staticmethod
    def forward(ctx, x, stride):
        return far_apart(x.detach(), (stride, 1), sentinel=50.0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def test_row_offsets_past_2_31(device):
    """x with its rows 2^27 elements apart (a view; the kernels take any strides): from row
    16 on, row * stride passes 2^31, and an int32 product read another element (50.0 here)
    in its place -- in the forward, where x is A and the row its M index, and in dWfc =
    dpre^T @ x, where x is B and the row its K index."""
    torch.manual_seed(0)
    M, C = 20, 16
    x = torch.randn(M, C, device=device).half()
    dy = torch.randn(M, C, device=device).half()
    compare(lambda x, *w: ffn(_FarApart.apply(x, 2**27), *w), reference.ffn,
            [x, *_weights(C, 4 * C, torch.float16, device)], [dy], 2e-3, 2e-3)


@pytest.mark.parametrize("C, hidden, out", [(8, 24, 8), (5, 7, 3), (48, 40, 20)], ids=["K8", "K5-odd", "rect"])
def test_small_and_uneven_widths(C, hidden, out, device):
    """K below tl.dot's 16 (masked to a full block), widths that are not multiples of
    anything, and an output width unlike the input's."""
    torch.manual_seed(0)
    x = torch.randn(19, C, device=device)
    _check(x, lambda t: t, _weights(C, hidden, torch.float32, device, out=out), torch.float32, 1e-5, 1e-5)


def test_recompute_pre_activation(device):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, device=device)
    _check(x, lambda t: t, _weights(32, 128, torch.float32, device), torch.float32, 1e-5, 1e-5, recompute_pre=True)


def test_recompute_pre_activation_under_torch_compile(device):
    """Compiled, the forward op returns an empty pre-activation when recompute_pre is set:
    the backward op must recompute it, not read the empty tensor as the saved one (the
    compiled path saves its tensors itself, apart from the eager Function)."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, device=device)
    dy = torch.randn(2, 9, 32, device=device)
    compiled = torch.compile(lambda x, *w: ffn(x, *w, recompute_pre=True), fullgraph=True, backend="aot_eager")
    compare(compiled, reference.ffn, [x, *_weights(32, 128, torch.float32, device)], [dy], 1e-5, 1e-5)


@pytest.mark.parametrize("name", ["fc_weight", "fc_bias", "proj_weight", "proj_bias"])
def test_one_parameter_alone_gets_its_gradient(name, device):
    """A backward that asks for one parameter's gradient only (the rest frozen, x a
    constant) computes it: each gradient's products run on their own needs, not on another's."""
    torch.manual_seed(0)
    x = torch.randn(10, 16, device=device)
    weights = dict(zip(("fc_weight", "fc_bias", "proj_weight", "proj_bias"), _weights(16, 64, torch.float32, device)))
    weights[name].requires_grad_()
    ours, want = (torch.autograd.grad(fn(x, *weights.values()).square().sum(), weights[name])[0]
                  for fn in (ffn, reference.ffn))
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_recompute_pre_activation_is_not_stored(monkeypatch, device):
    """recompute_pre=True trades the M x H pre-activation for a matmul in the backward: the
    forward must not write it (the memory the option exists to save)."""
    auxes = []
    matmul = ffn_module._matmul
    monkeypatch.setattr(ffn_module, "_matmul", lambda *a, **k: auxes.append(k.get("aux")) or matmul(*a, **k))
    fc_w, fc_b, proj_w, proj_b = _weights(16, 64, torch.float32, device)
    x = torch.randn(5, 16, device=device, requires_grad=True)
    ffn(x, fc_w, fc_b, proj_w, proj_b, recompute_pre=True)
    assert auxes == [None, None]
    ffn(x, fc_w, fc_b, proj_w, proj_b)
    assert auxes[2] is not None  # saved by default


def test_k_splits_fill_the_rounds():
    """The split-K policy on its docstring's case, GPT-2 small's weight gradients (144 tiles on
    132 SMs: two rounds, 55% busy): cut in four (five rounds of 4.4 tiles' work); a K too
    short for four slices of 16 steps takes the best of fewer, too short for two is not cut,
    nor is a product that fills its rounds already."""
    assert _k_splits(144, 100, 132) == 4
    assert _k_splits(144, 63, 132) == 3
    assert _k_splits(144, 31, 132) == 1
    assert _k_splits(132, 100, 132) == 1


def test_split_plan_cuts_the_last_round_alone():
    """The tail split on the same case: the 132 tiles of the whole round uncut, the 12 left
    cut into as many slices as there are programs for them (11; 4 where K has 64 steps, each
    slice 16 or more); fewer tiles than programs, or the tail split not asked for, cut every
    tile as _k_splits does; a product whose rounds are full is not cut at all."""
    assert _split_plan(144, 256, 132, True) == (132, 11)
    assert _split_plan(144, 64, 132, True) == (132, 4)
    assert _split_plan(400, 256, 132, True) == (396, 16)  # GPT-2 large's weight gradients (C = 1280)
    assert _split_plan(144, 256, 132, False) == (0, 4)
    assert _split_plan(72, 256, 132, True) == (0, _k_splits(72, 256, 132)) == (0, 5)
    assert _split_plan(144, 31, 132, True) == (144, 1)
    assert _split_plan(264, 256, 132, True) == (264, 1)


def test_partial_gradients_and_inference(device):
    """Only the gradients autograd asks for are computed; without grad nothing is saved."""
    torch.manual_seed(0)
    fc_w, fc_b, proj_w, proj_b = _weights(16, 64, torch.float32, device)
    x = torch.randn(10, 16, device=device, requires_grad=True)
    ffn(x, fc_w, fc_b, proj_w, proj_b).sum().backward()
    expected = torch.autograd.grad(reference.ffn(x, fc_w, fc_b, proj_w, proj_b).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y = ffn(x, fc_w, fc_b, proj_w, proj_b)
    torch.testing.assert_close(y, reference.ffn(x, fc_w, fc_b, proj_w, proj_b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tma", [False, True], ids=["table", "tma"])
def test_empty_input(tma, monkeypatch, device):
    """No rows: the weight gradients are products with K = 0, which TMA cannot describe."""
    if tma:
        original = ffn_module._tiles
        monkeypatch.setattr(ffn_module, "_tiles", lambda t, kind: original(t, kind)._replace(tma=True, split_k=True))
    fc_w, fc_b, proj_w, proj_b = (t.requires_grad_() for t in _weights(16, 64, torch.float32, device))
    x = torch.randn(0, 16, device=device, requires_grad=True)
    y = ffn(x, fc_w, fc_b, proj_w, proj_b)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert not fc_w.grad.any() and not fc_b.grad.any() and not proj_w.grad.any() and not proj_b.grad.any()


@pytest.mark.parametrize("rows", [300, 5], ids=["many-rows", "few-rows"])
@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["hopper", "sm80"])
def test_gpu_tile_shapes_in_interpreter(capability, rows, monkeypatch, device):
    """The tiles the GPU tables launch (128 x 256, grouped ordering over several row tiles;
    16-row tiles for a decode step's few rows) compute the right thing through the
    interpreter, in fp16, on ragged shapes."""
    if device == "cuda":
        pytest.skip("the GPU runs its own table in the other tests")
    monkeypatch.setattr(ffn_module, "device_capability", lambda index=0: capability)
    monkeypatch.setattr(ffn_module, "_tiles", _gpu_tiles(capability))
    torch.manual_seed(0)
    x = torch.randn(rows, 48, device=device).half()
    _check(x, lambda t: t, _weights(48, 280, torch.float16, device), torch.float16, 2e-3, 2e-3)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_tma_kernel_in_interpreter(dtype, atol, rtol, monkeypatch, device):
    """The TMA kernel (descriptors, persistent schedule) runs all six products, the
    transposed operands of the backward included, on ragged shapes: zero fill past the
    edges stands in for masks."""
    if device == "cuda":
        pytest.skip("test_tma_kernel_gpu runs it on Hopper")
    calls = _launches(monkeypatch, "_matmul_tma_kernel", ffn_module._INTERPRETER._replace(tma=True))
    torch.manual_seed(0)
    x = torch.randn(300, 48, device=device).to(dtype)  # 10 x 5 tiles of 32 x 64 on 2 programs
    _check(x, lambda t: t, _weights(48, 280, dtype, device), dtype, atol, rtol)
    assert len(calls) == 6  # h, y; dpre, dWproj, dWfc, dx


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_ws_kernel_in_interpreter(dtype, atol, rtol, monkeypatch, device):
    """The warp-specialised TMA kernel (descriptors built on the device) runs five of the
    six products; dpre, whose epilogue sums its columns, takes the TMA kernel. The
    interpreter runs it unspecialised: the test checks descriptors, strides and schedule."""
    if device == "cuda":
        pytest.skip("test_tma_kernel_gpu runs it on Hopper")
    tiles = ffn_module._INTERPRETER._replace(tma=True, warp_specialize=True)
    ws_calls = _launches(monkeypatch, "_matmul_ws_kernel", tiles)
    calls = _launches(monkeypatch, "_matmul_tma_kernel", tiles)
    torch.manual_seed(0)
    x = torch.randn(300, 48, device=device).to(dtype)  # 10 x 5 tiles of 32 x 64 on 2 programs
    _check(x, lambda t: t, _weights(48, 280, dtype, device), dtype, atol, rtol)
    assert len(ws_calls) == 5 and len(calls) == 1


def test_ws_kernel_keeps_the_callers_allocator(monkeypatch, device):
    """Device-side descriptors need Triton's allocator; the launcher sets its own in a copy
    of the context, so an allocator the caller set is still in place afterwards."""
    if device == "cuda":
        pytest.skip("interpreter check of the launcher")
    from triton.runtime import _allocation

    def callers_allocator(size, alignment, stream):
        raise AssertionError("the kernel used the caller's allocator")

    token = _allocation._allocator.set(callers_allocator)
    try:
        monkeypatch.setattr(ffn_module, "_tiles", lambda t, kind: ffn_module._INTERPRETER._replace(
            tma=True, warp_specialize=True))
        fc_w, fc_b, proj_w, proj_b = _weights(16, 64, torch.float32, device)
        with torch.no_grad():
            ffn(torch.randn(20, 16, device=device), fc_w, fc_b, proj_w, proj_b)
        assert _allocation._allocator.get() is callers_allocator
    finally:
        _allocation._allocator.reset(token)


@pytest.mark.parametrize("table", ["tma", "tma-gelu-epilogues-in-halves", "warp-specialized"])
def test_tma_tiles_in_interpreter(table, monkeypatch, device):
    """Hopper's TMA tiles themselves (128 x 256 with the epilogue in two halves, 128 x 128),
    128 x 256 GELU epilogues (pre-activation stored, loaded and column-summed a half at a
    time), and the warp-specialised table (128 x 256, full width), fp16, ragged, through
    the interpreter."""
    if device == "cuda":
        pytest.skip("test_tma_kernel_gpu runs them on Hopper")
    tiles = dict(ffn_module._WS_TILES if table == "warp-specialized" else ffn_module._TMA_TILES)
    if table == "tma-gelu-epilogues-in-halves":
        tiles[ffn_module._EPILOGUE] = tiles[ffn_module._EPILOGUE]._replace(block_n=256, num_stages=2)
    calls = _launches(monkeypatch, "_matmul_tma_kernel", lambda t, kind: tiles[kind])
    ws_calls = _launches(monkeypatch, "_matmul_ws_kernel", lambda t, kind: tiles[kind])
    torch.manual_seed(0)
    x = torch.randn(300, 80, device=device).half()  # C = 80: no product has few (<= 64) rows
    _check(x, lambda t: t, _weights(80, 320, torch.float16, device), torch.float16, 2e-3, 2e-3)
    assert len(calls) + len(ws_calls) == 6


@pytest.mark.parametrize("kernel", ["tma", "pointers", "warp-specialized"])
def test_split_k_in_interpreter(kernel, monkeypatch, device):
    """Products cut along K (the weight gradients on GPUs where their tiles are few), the
    last slice running past K (into zero fill, or masked loads), sum to the same gradients."""
    if device == "cuda":
        pytest.skip("interpreter check; test_tma_kernel_gpu covers the GPU's choice")
    asked = []
    monkeypatch.setattr(ffn_module, "_split_plan", _split_plan)  # every tile cut, even under --candidates
    monkeypatch.setattr(ffn_module, "_k_splits", lambda tiles, k_steps, slots: asked.append(k_steps) or 3)
    _launches(monkeypatch, "_matmul_tma_kernel", ffn_module._INTERPRETER._replace(
        tma=kernel != "pointers", split_k=True, warp_specialize=kernel == "warp-specialized"))
    torch.manual_seed(0)
    x = torch.randn(300, 48, device=device)  # K = 300 tokens: 19 steps of 16, 7 per slice
    _check(x, lambda t: t, _weights(48, 280, torch.float32, device), torch.float32, 1e-5, 1e-5)
    assert sorted(asked) == [18, 19, 19]  # dx (K = 280), dWproj and dWfc (K = 300); never the biased ones


@pytest.mark.parametrize("kernel", ["tma", "warp-specialized"])
def test_tail_split_in_interpreter(kernel, monkeypatch, device):
    """The tail split: the first tiles launched whole into the output, the others cut
    along K in a second launch (their tile numbers offset) and summed into it, give the
    same gradients; the plan is asked for it only where TMA runs the product."""
    if device == "cuda":
        pytest.skip("interpreter check; test_split_plans_gpu runs both plans on Hopper")
    asked = []

    def plan(tiles, k_steps, slots, tail_only):
        asked.append(tail_only)
        return (tiles // 2, 3) if tail_only else (0, 3)

    monkeypatch.setattr(ffn_module, "_split_plan", plan)
    tiles = ffn_module._INTERPRETER._replace(tma=True, split_k=True, tail_split=True,
                                             warp_specialize=kernel == "warp-specialized")
    calls = _launches(monkeypatch, "_matmul_tma_kernel", tiles)
    ws_calls = _launches(monkeypatch, "_matmul_ws_kernel", tiles)
    sums = _launches(monkeypatch, "_sum_slices_kernel", tiles)
    torch.manual_seed(0)
    x = torch.randn(300, 48, device=device)  # dWproj 2 x 5 tiles, dWfc 9 x 1, dx 10 x 1 (32 x 64)
    _check(x, lambda t: t, _weights(48, 280, torch.float32, device), torch.float32, 1e-5, 1e-5)
    assert asked == [True] * 3  # dWproj, dWfc, dx; never the biased ones
    # A launch for each half of each split product, one for each of the others (h, y, dpre).
    assert len(calls) + len(ws_calls) == 3 + 2 * 3
    # The sums cover the cut tiles alone: 5 of dWproj's 10, 5 of dWfc's 9, 5 of dx's 10.
    assert sorted(grid[0] for grid in sums) == [5, 5, 5]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_approx_gelu_in_interpreter(tma, monkeypatch, device):
    """The GELU epilogues on the approximate tanh (the interpreter computes that tanh
    exactly: this checks the formulas around it, forward and gradient), asked for 16-bit
    outputs only: fp32 keeps the exact GELU."""
    if device == "cuda":
        pytest.skip("interpreter check; test_approx_gelu_gpu runs the hardware's tanh")
    seen = []
    tiles = ffn_module._INTERPRETER._replace(tma=tma, approx_gelu=True)
    monkeypatch.setattr(ffn_module, "_tiles", lambda t, kind: tiles)
    for name in ("_matmul_kernel", "_matmul_tma_kernel"):
        kernel = getattr(ffn_module, name)
        monkeypatch.setattr(ffn_module, name, _FlagRecorder(kernel, seen))
    torch.manual_seed(0)
    for dtype, atol, rtol in ((torch.float16, 2e-3, 2e-3), (torch.float32, 1e-5, 1e-5)):
        seen.clear()
        x = torch.randn(70, 32, device=device).to(dtype)
        _check(x, lambda t: t, _weights(32, 128, dtype, device), dtype, atol, rtol)
        gelu_flags = [flags["APPROX_GELU"] for flags in seen if flags["EPILOGUE"] != ffn_module._NONE]
        assert gelu_flags == [dtype == torch.float16] * 2  # h's GELU, dpre's GELU gradient


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_launch_flags_only_a_gpu_build_acts_on(dtype, atol, rtol, monkeypatch, device):
    """A flag of the pointer kernel's launches that the interpreter ignores (it multiplies
    in full precision): fp32 products ask tl.dot for IEEE precision, without which a GPU
    rounds their inputs to tf32 (16-bit ones take the default)."""
    seen = []
    monkeypatch.setattr(ffn_module, "_tiles", lambda t, kind: ffn_module._INTERPRETER)
    monkeypatch.setattr(ffn_module, "_matmul_kernel", _FlagRecorder(ffn_module._matmul_kernel, seen))
    torch.manual_seed(0)
    x = torch.randn(37, 16, device=device).to(dtype)
    _check(x, lambda t: t, _weights(16, 64, dtype, device), dtype, atol, rtol)
    # h, y; then dWproj, dpre, dWfc, dx.
    assert [flags["PRECISION"] for flags in seen] == ["ieee" if dtype == torch.float32 else None] * 6


class _FlagRecorder:
    """A kernel that records the constexpr flags of each launch and runs it."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **flags):
            self.seen.append(flags)
            return self.kernel[grid](*args, **flags)
        return launch


def test_tma_kernel_falls_back_where_tma_cannot_address(monkeypatch, device):
    """x sliced from rows of 52 fp16 values (104 bytes, not a multiple of 16): TMA cannot
    describe it, so the two products that read x take the pointer kernel, the other four
    TMA, and the results still match."""
    if device == "cuda":
        pytest.skip("interpreter check of the launcher's choice")
    calls = _launches(monkeypatch, "_matmul_tma_kernel", ffn_module._INTERPRETER._replace(tma=True))
    torch.manual_seed(0)
    x = torch.randn(70, 52, device=device).half()
    _check(x, lambda t: t[:, :48], _weights(48, 192, torch.float16, device), torch.float16, 2e-3, 2e-3)
    assert len(calls) == 4  # y, dpre, dWproj, dx


@pytest.mark.parametrize("case, tma_products", [("start-off-16-bytes", 4), ("broadcast-rows", 4), ("3-column-output", 3)])
def test_tma_kernel_falls_back_per_operand(case, tma_products, monkeypatch, device):
    """What a TMA descriptor cannot take goes to the pointer kernel, product by product: x
    starting 4 bytes into its storage, x broadcast along its rows (row stride 0), or an output
    of 3 fp32 columns (12-byte rows: y, and dWproj and dpre, which read dy). On Hopper such a
    descriptor fails (Triton asserts alignment) or, with stride 0, cannot be described."""
    if device == "cuda":
        pytest.skip("interpreter check of the launcher's choice")
    calls = _launches(monkeypatch, "_matmul_tma_kernel", ffn_module._INTERPRETER._replace(tma=True))
    torch.manual_seed(0)
    M, C = 40, 16
    view, x = {
        "start-off-16-bytes": (lambda t: t[1:].view(M, C), torch.randn(1 + M * C, device=device)),
        "broadcast-rows": (lambda t: t.expand(M, C), torch.randn(C, device=device)),
        "3-column-output": (lambda t: t, torch.randn(M, C, device=device)),
    }[case]
    weights = _weights(C, 64, torch.float32, device, out=3 if case == "3-column-output" else C)
    _check(x, view, weights, torch.float32, 1e-5, 1e-5)
    assert len(calls) == tma_products


def _launches(monkeypatch, kernel: str, tiles) -> list:
    """Runs the FFN on `tiles` (a _Tiles, or a function like _tiles(tensor, kind)) and returns
    the list that will hold the grid of each launch of the kernel named `kernel`."""
    calls = []
    monkeypatch.setattr(ffn_module, kernel, _Recorder(getattr(ffn_module, kernel), calls))
    monkeypatch.setattr(ffn_module, "_tiles", tiles if callable(tiles) else lambda t, kind: tiles)
    return calls


class _Recorder:
    """A kernel that records its launches and runs them."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def _gpu_tiles(capability):
    def tiles(t, kind):
        return ffn_module._TILES[(capability[0], kind)]
    return tiles


@pytest.mark.parametrize(
    "shapes, dtype, device_of_w, match",
    [
        (((4, 8), (32, 8), (32,), (8, 32), (8,)), torch.float32, None, None),
        (((4, 9), (32, 8), (32,), (8, 32), (8,)), torch.float32, None, "in-features 8"),
        (((4, 8), (32, 8), (32,), (8, 31), (8,)), torch.float32, None, "out-features 32"),
        (((4, 8), (32, 8), (31,), (8, 32), (8,)), torch.float32, None, "fc_bias must have shape"),
        (((4, 8), (32, 8, 1), (32,), (8, 32), (8,)), torch.float32, None, "2-D"),
        (((4, 8), (32, 8), (32,), (8, 32, 1), (8,)), torch.float32, None, "2-D"),
        (((), (32, 8), (32,), (8, 32), (8,)), torch.float32, None, "in-features 8, got x of shape ()"),
        (((4, 8), (32, 8), (32,), (8, 32), (7,)), torch.float32, None, r"proj_bias must have shape \(8,\)"),
        (((4, 8), (32, 8), (32,), (0, 32), (0,)), torch.float32, None, "zero-width weights"),
        (((4, 8), (32, 8), (32,), (8, 32), (8,)), torch.int32, None, "dtype"),
        (((4, 8), (32, 8), (32,), (8, 32), (8,)), torch.float32, "meta", "one device"),
    ],
    ids=["valid", "x-width", "proj-in", "bias-shape", "3d-weight", "3d-proj-weight", "scalar-x", "proj-bias-shape",
         "no-outputs", "int-dtype", "devices"],
)
def test_invalid_inputs(shapes, dtype, device_of_w, match, device):
    x, fc_w, fc_b, proj_w, proj_b = (torch.ones(s, device=device, dtype=dtype) for s in shapes)
    if device_of_w:
        fc_w = torch.ones(fc_w.shape, device=device_of_w, dtype=dtype)
    if match is None:
        assert ffn(x, fc_w, fc_b, proj_w, proj_b).shape == (4, 8)
        return
    with pytest.raises(ValueError, match=match):
        ffn(x, fc_w, fc_b, proj_w, proj_b)


class _Reached(Exception):
    """Raised in place of the matmuls: the inputs got past every check."""


@pytest.mark.parametrize("big", ["tokens", "C", "hidden", "C_out"])
def test_sizes_past_int32_are_refused(monkeypatch, big, device):
    """2^30 tokens (all the rows of a (B, T, C) input, not B), or an input, hidden or output
    width of 2^30 (views: no memory), are refused before anything is allocated or launched;
    from a tile short of 2^31 the int32 indices wrapped. One less is taken."""
    def reached(*args, **kwargs):
        raise _Reached
    monkeypatch.setattr(ffn_module, "_matmul", reached)

    def run(n):
        rows = {2**30: (2**15, 2**15), 2**30 - 1: (3, (2**30 - 1) // 3)}[n] if big == "tokens" else (2, 2)
        C, hidden, C_out = (n if big == name else size for name, size in (("C", 8), ("hidden", 32), ("C_out", 8)))
        zero = torch.zeros(1, 1, 1, device=device)
        x, fc_w, proj_w = zero.expand(*rows, C), zero[0].expand(hidden, C), zero[0].expand(C_out, hidden)
        ffn(x, fc_w, zero[0, 0].expand(hidden), proj_w, zero[0, 0].expand(C_out))

    with pytest.raises(ValueError, match=rf"below 2\^30 .* {big}=1073741824"):
        run(2**30)
    with pytest.raises(_Reached):
        run(2**30 - 1)


def test_mixed_dtypes_are_refused(device):
    x, fc_w, fc_b, proj_w, proj_b = torch.ones(4, 8, device=device).half(), *_weights(8, 32, torch.float32, device)
    with pytest.raises(ValueError, match="share one dtype"):
        ffn(x, fc_w, fc_b, proj_w, proj_b)


def test_cpu_without_interpreter_points_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kernels.reference.ffn"):
        ffn(torch.ones(4, 8), *_weights(8, 32, torch.float32, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize(
    "M, C",
    [
        pytest.param(1000, 768, id="gpt2"),
        pytest.param(513, 1024, id="gpt2-medium"),
        pytest.param(257, 1600, id="gpt2-xl"),
        pytest.param(77, 48, id="small"),
    ],
)
def test_ffn_gpu(M, C, dtype, atol, rtol):
    torch.manual_seed(0)
    x = torch.randn(M, C, device="cuda").to(dtype)
    _check(x, lambda t: t, _weights(C, 4 * C, dtype, "cuda"), dtype, atol, rtol)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "M, C", [pytest.param(1000, 768, id="gpt2"), pytest.param(513, 1600, id="gpt2-xl"), pytest.param(77, 48, id="small")])
@pytest.mark.parametrize("candidate", ["tma", "tma-gelu-epilogues-in-halves", "warp-specialized"])
def test_tma_kernel_gpu(M, C, candidate, monkeypatch):
    """The Hopper TMA candidates (bench_ffn --sweep times them) in bf16 at GPT-2 sizes."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA tiles are Hopper's")
    table = dict(ffn_module._WS_TILES if candidate == "warp-specialized" else ffn_module._TMA_TILES)
    if candidate == "tma-gelu-epilogues-in-halves":
        table[ffn_module._EPILOGUE] = table[ffn_module._EPILOGUE]._replace(block_n=256, num_stages=2)
    original = ffn_module._tiles
    calls = _launches(monkeypatch, "_matmul_tma_kernel", lambda t, kind: table.get(kind) or original(t, kind))
    ws_calls = _launches(monkeypatch, "_matmul_ws_kernel", lambda t, kind: table.get(kind) or original(t, kind))
    torch.manual_seed(0)
    x = torch.randn(M, C, device="cuda").bfloat16()
    _check(x, lambda t: t, _weights(C, 4 * C, torch.bfloat16, "cuda"), torch.bfloat16, 1e-2, 1e-2)
    # dWproj of C <= 64 rows takes the few-rows tiles; the warp-specialised table sends
    # the column-summing dpre product to the TMA kernel.
    assert len(calls) + len(ws_calls) == (6 if C > 64 else 5)
    assert len(ws_calls) == (len(calls + ws_calls) - 1 if candidate == "warp-specialized" else 0)


@pytest.mark.gpu
@pytest.mark.parametrize("tail_split", [False, True], ids=["every-tile-cut", "tail-split"])
def test_split_plans_gpu(tail_split, monkeypatch):
    """The weight gradients cut along K on Hopper, as GPT-2 small's are in training (144
    tiles on 132 SMs; 4096 tokens: 64 K steps, cut in 4), every tile or the last round's
    alone, in bf16. test_ffn_gpu's 1000 tokens are too few K steps to cut."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the split tiles are Hopper's")
    plans = []
    original = ffn_module._split_plan
    monkeypatch.setattr(ffn_module, "_split_plan", lambda *args: plans.append(original(*args)) or plans[-1])
    table = {kind: t._replace(tail_split=tail_split) for kind, t in ffn_module._TMA_TILES.items()}
    monkeypatch.setattr(ffn_module, "_tiles", lambda t, kind: table.get(kind) or ffn_module._TILES[(9, kind)])
    torch.manual_seed(0)
    x = torch.randn(4096, 768, device="cuda").bfloat16()
    _check(x, lambda t: t, _weights(768, 3072, torch.bfloat16, "cuda"), torch.bfloat16, 1e-2, 1e-2)
    if ffn_module.sm_count(torch.cuda.current_device()) == 132:  # H100 SXM, H200
        # dWproj and dWfc (144 tiles each, 64 K steps), then dx (96 tiles of 128 x 256: one round).
        whole = 132 if tail_split else 0
        assert plans == [(whole, 4), (whole, 4), (96, 1)]
    assert any(splits > 1 for _, splits in plans)


@pytest.mark.gpu
@pytest.mark.parametrize("M, C", [pytest.param(1000, 768, id="gpt2"), pytest.param(77, 48, id="small")])
def test_approx_gelu_gpu(M, C, monkeypatch):
    """The GELU epilogues on the hardware's approximate tanh (tanh.approx.f32), a candidate
    (bench_ffn --sweep times it), within bf16's tolerance of float64, on the table's tiles
    (Hopper's TMA kernel, the pointer kernel elsewhere)."""
    original = ffn_module._tiles
    monkeypatch.setattr(ffn_module, "_tiles", lambda t, kind: original(t, kind)._replace(approx_gelu=True))
    torch.manual_seed(0)
    x = torch.randn(M, C, device="cuda").bfloat16()
    _check(x, lambda t: t, _weights(C, 4 * C, torch.bfloat16, "cuda"), torch.bfloat16, 1e-2, 1e-2)


@pytest.mark.gpu
def test_recompute_pre_activation_gpu():
    torch.manual_seed(0)
    x = torch.randn(4, 256, 768, device="cuda").bfloat16()
    _check(x, lambda t: t, _weights(768, 3072, torch.bfloat16, "cuda"), torch.bfloat16, 1e-2, 1e-2, recompute_pre=True)


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", [False, True], ids=["gelu-kernel", "gelu-epilogue"])
def test_decode_sized_ffn_on_cublas_gpu(monkeypatch, epilogue):
    """gpt.ops sends decode-sized FFNs to cuBLAS, with the GELU in its own kernel or in the
    matmul's epilogue (GELU_EPILOGUE): both match the float64 reference."""
    from gpt import ops

    monkeypatch.setattr(ops, "GELU_EPILOGUE", epilogue)
    torch.manual_seed(0)
    C = 768
    x = torch.randn(4, 1, C, device="cuda")
    fc_w, proj_w = torch.randn(4 * C, C, device="cuda") * 0.02, torch.randn(C, 4 * C, device="cuda") * 0.02
    fc_b, proj_b = torch.randn(4 * C, device="cuda"), torch.randn(C, device="cuda")
    args = [t.bfloat16() for t in (x, fc_w, fc_b, proj_w, proj_b)]
    with torch.no_grad():
        got = ops.ffn(*args)
    want = reference.ffn(*(t.double() for t in args))
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("auto_triton", [False, True])
@pytest.mark.parametrize("rows", [8, 512])
def test_auto_picks_the_ffn_by_policy(monkeypatch, auto_triton, rows):
    """kernels="auto" on a GPU (the Triton module standing in for CUDA here) runs the Triton
    FFN only when AUTO_TRITON_FFN is on and the call has FFN_MIN_ROWS rows or more; the
    other calls take the reference (cuBLAS). Either way the result is the reference's."""
    import kernels
    from gpt import ops

    monkeypatch.setattr(ops, "AUTO_TRITON_FFN", auto_triton)
    monkeypatch.setattr(ops, "step_backend", lambda x, mode, width: kernels)
    calls = []
    monkeypatch.setattr(kernels, "ffn", lambda *a: calls.append(1) or reference.ffn(*a))
    C = 16
    x = torch.randn(rows, C, dtype=torch.float64)
    w = [torch.randn(4 * C, C), torch.randn(4 * C), torch.randn(C, 4 * C), torch.randn(C)]
    w = [t.double() for t in w]
    torch.testing.assert_close(ops.ffn(x, *w), reference.ffn(x, *w))
    assert len(calls) == int(auto_triton and rows >= ops.FFN_MIN_ROWS)


def test_the_gelu_epilogue_matmul_runs_in_the_autocast_dtype(device, monkeypatch):
    """Under no_grad "auto" runs a CUDA FFN's first matmul as torch._addmm_activation (the GELU
    in cuBLAS's epilogue), which CUDA's autocast has no rule for: under autocast (train.py's
    eval, an fp32 model generating under torch.autocast) it ran in fp32, the dtype the layer
    norm hands it. Its operands must come in the autocast dtype, as F.linear's do. On CPU the
    tensors pass for CUDA ones (CPU's autocast would cast them itself, hiding the fault)."""
    from gpt import ops

    if device == "cpu":
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    seen = []
    addmm_activation = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation",
                        lambda *a, **k: seen.append({t.dtype for t in a}) or addmm_activation(*a, **k))
    torch.manual_seed(0)
    C = 16
    x = torch.randn(2, 1, C, device=device)
    w = [torch.randn(4 * C, C, device=device) * 0.1, torch.randn(4 * C, device=device),
         torch.randn(C, 4 * C, device=device) * 0.1, torch.randn(C, device=device)]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        got = ops.ffn(x, *w)
        want = reference.ffn(x, *w)
    assert seen == [{torch.bfloat16}]
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
