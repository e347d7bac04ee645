"""The fused linear cross-entropy (kernels/cross_entropy.py) against kernels/reference.py in
float64: the loss and the gradients of x, weight and bias (tolerances: tests/compare.py)."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compare import compare
from kernels import reference
from kernels.cross_entropy import linear_cross_entropy

cross_entropy_module = importlib.import_module("kernels.cross_entropy")

TOLERANCES = [  # dtype, atol, rtol
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
]
GPU_TOLERANCES = TOLERANCES + [pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16")]


def _inputs(lead, C, V, dtype, device, bias=True, ignored=0.0):
    x = torch.randn(*lead, C, device=device).to(dtype)
    weight = (torch.randn(V, C, device=device) / C**0.5).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    targets = torch.randint(0, V, lead, device=device)
    targets[torch.rand(lead, device=device) < ignored] = -100
    return x, weight, b, targets


def _check(x, weight, bias, targets, atol, rtol, reduction="mean", ignore_index=-100):
    upstream = torch.randn((), device=x.device).to(torch.float32)  # not 1: the backward must scale
    compare(
        lambda x, w, b: linear_cross_entropy(x, w, b, targets, ignore_index, reduction),
        lambda x, w, b: reference.linear_cross_entropy(x, w, b, targets, ignore_index, reduction),
        [x, weight, bias], [upstream], atol, rtol,
    )


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("lead, C, V", [
    pytest.param((9,), 16, 17, id="M9-V17"),
    pytest.param((3, 11), 32, 300, id="3d-V300"),
    pytest.param((1,), 16, 50, id="M1"),
    pytest.param((5,), 16, 5000, id="V5000"),  # past one block of columns, ragged
])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy(lead, C, V, bias, reduction, dtype, atol, rtol, device):
    torch.manual_seed(0)
    x, weight, b, targets = _inputs(lead, C, V, dtype, device, bias, ignored=0.2)
    _check(x, weight, b, targets, atol, rtol, reduction)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("chunk_rows", [1, 4, 7])
def test_rows_in_chunks(chunk_rows, dtype, atol, rtol, device, monkeypatch):
    """Rows split over chunks, the last one ragged: each chunk's gradients add into the same
    x rows and weight and bias sums, and the mean counts the rows of every chunk."""
    monkeypatch.setattr(cross_entropy_module, "_CHUNK_ELEMENTS", chunk_rows * 40)
    torch.manual_seed(1)
    x, weight, b, targets = _inputs((2, 9), 16, 40, dtype, device, ignored=0.3)
    _check(x, weight, b, targets, atol, rtol)


def test_no_more_than_a_chunk_of_logits_at_a_time(device, monkeypatch):
    """The point of the op: no tensor as large as all the logits, forward or backward (the
    reference makes several, one of them the M x V fp32 log-softmax it saves). Counted in
    bytes, over every tensor a torch op returns (the interpreter's copies of the kernel's
    arguments too)."""
    monkeypatch.setattr(cross_entropy_module, "_CHUNK_ELEMENTS", 8 * 64)
    torch.manual_seed(2)
    x, weight, b, targets = _inputs((64,), 16, 64, torch.float32, device)
    x.requires_grad_()
    weight.requires_grad_()
    logits_bytes = 64 * 64 * 4

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.nbytes = max(Largest.nbytes, t.numel() * t.element_size())
            return out

    for fn in (linear_cross_entropy, reference.linear_cross_entropy):
        Largest.nbytes = 0
        with Largest():
            fn(x, weight, b, targets).backward()
        if fn is linear_cross_entropy:
            assert Largest.nbytes <= logits_bytes // 4  # x and the weight's gradient: 4 KiB each
        else:
            assert Largest.nbytes >= logits_bytes


def test_strided_inputs_and_int32_targets(device):
    """x a transposed view, the weight a slice of a wider matrix, targets int32 and strided."""
    torch.manual_seed(3)
    x = torch.randn(16, 6, device=device).t()  # (6, 16), column-major
    weight = (torch.randn(30, 32, device=device) / 4)[:, ::2]
    targets = torch.randint(0, 30, (12,), device=device, dtype=torch.int32)[::2]
    _check(x, weight, None, targets, 1e-5, 1e-5)


def test_another_ignore_index(device):
    torch.manual_seed(4)
    x, weight, b, targets = _inputs((10,), 16, 20, torch.float32, device)
    targets[::3] = -1
    _check(x, weight, b, targets, 1e-5, 1e-5, ignore_index=-1)


def test_only_some_inputs_need_gradients(device):
    """A frozen head (weight without grad) and a frozen input: only the asked-for gradients."""
    torch.manual_seed(5)
    x, weight, b, targets = _inputs((7,), 16, 20, torch.float32, device)
    x.requires_grad_()
    loss = linear_cross_entropy(x, weight, b, targets)
    (dx,) = torch.autograd.grad(loss, x)
    x_ = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.linear_cross_entropy(x_, weight.double(), b.double(), targets), x_)
    torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-6)
    weight.requires_grad_()
    loss = linear_cross_entropy(x.detach(), weight, None, targets)
    (dw,) = torch.autograd.grad(loss, weight)
    assert dw.shape == weight.shape


def test_under_no_grad_the_loss_alone(device):
    torch.manual_seed(6)
    x, weight, b, targets = _inputs((7,), 16, 20, torch.float32, device)
    weight.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, b, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference.linear_cross_entropy(x, weight, b, targets).detach())


def test_every_row_ignored_is_nan_as_in_torch(device):
    x, weight, b, targets = _inputs((4,), 16, 20, torch.float32, device)
    targets.fill_(-100)
    weight.requires_grad_()
    loss = linear_cross_entropy(x, weight, b, targets)
    assert torch.isnan(loss) and torch.isnan(reference.linear_cross_entropy(x, weight, b, targets))
    loss.backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))  # nothing to learn from
    assert torch.isnan(linear_cross_entropy(x, weight, b, targets, reduction="sum") * 0 + float("nan"))
    assert linear_cross_entropy(x, weight, b, targets, reduction="sum").item() == 0


def test_a_target_out_of_range_makes_the_loss_nan(device):
    """Not a read past the row (the kernel cannot raise): a NaN loss and gradient, as a
    corrupted batch should show up."""
    x, weight, b, targets = _inputs((4,), 16, 20, torch.float32, device)
    weight.requires_grad_()
    targets[2] = 20
    loss = linear_cross_entropy(x, weight, b, targets)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(weight.grad).any()


@pytest.mark.parametrize("call, match", [
    (lambda x, w, t: linear_cross_entropy(x, w[:, :8], None, t), "do not fit"),
    (lambda x, w, t: linear_cross_entropy(x, w, torch.zeros(3, device=x.device), t), "bias"),
    (lambda x, w, t: linear_cross_entropy(x, w, None, t.float()), "targets must be integer indices"),
    (lambda x, w, t: linear_cross_entropy(x, w, None, t[:2]), "targets must be integer indices of shape"),
    (lambda x, w, t: linear_cross_entropy(x, w, None, t, reduction="none"), "reduction must be 'mean' or 'sum'"),
    (lambda x, w, t: linear_cross_entropy(x.half(), w, None, t), "one dtype"),
], ids=["weight-shape", "bias-shape", "float-targets", "targets-shape", "reduction-none", "dtypes"])
def test_bad_input_is_a_value_error(call, match, device):
    x, weight, _, targets = _inputs((4,), 16, 20, torch.float32, device)
    with pytest.raises(ValueError, match=match):
        call(x, weight, targets)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
@pytest.mark.parametrize("M, C, V", [(2048, 768, 50304), (1000, 64, 65)], ids=["gpt2", "char"])
def test_linear_cross_entropy_gpu(M, C, V, dtype, atol, rtol):
    torch.manual_seed(0)
    x, weight, b, targets = _inputs((M,), C, V, dtype, "cuda", bias=False, ignored=0.05)
    _check(x, weight, b, targets, atol, rtol)


@pytest.mark.gpu
def test_peak_memory_is_a_chunk_of_logits_gpu():
    """GPT-2's head on 16384 tokens in bf16: the reference holds ~8 GB of logits, their fp32
    copy and log-softmax at its peak; ours no more than its chunk (256 MiB) and the gradients."""
    torch.manual_seed(0)
    M, C, V = 16384, 768, 50304
    x, weight, _, targets = _inputs((M,), C, V, torch.bfloat16, "cuda", bias=False)
    x.requires_grad_()
    weight.requires_grad_()
    peaks = []
    for fn in (linear_cross_entropy, reference.linear_cross_entropy):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, weight, None, targets).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        x.grad = weight.grad = None
    ours, torch_ = peaks
    grads = 2 * weight.numel() * 4 + x.numel() * 2  # the fp32 weight sum and its cast, dx
    assert ours <= 2 * cross_entropy_module._CHUNK_ELEMENTS * 2 + grads, (ours, torch_)
    assert torch_ > 4 * ours, (ours, torch_)
