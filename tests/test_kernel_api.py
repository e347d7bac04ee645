"""What the kernels refuse, and where the model steps around them, for callers who reuse them.

Each case here once gave silently wrong numbers or a traceback from deep inside.
"""
import ast
import contextlib
import importlib
import inspect

import numpy as np
import pytest
import torch

import kernels
from gpt import ops
from kernels import _utils, reference

ffn_module = importlib.import_module("kernels.ffn")  # the module, not the function of that name
attention_module = importlib.import_module("kernels.attention")
layer_norm_module = importlib.import_module("kernels.layer_norm")
cross_entropy_module = importlib.import_module("kernels.cross_entropy")


def _layer_norm(x):
    return kernels.layer_norm(x, torch.randn(x.shape[-1], device=x.device, requires_grad=True), None)


def _add_layer_norm(x):
    return kernels.add_layer_norm(x, torch.randn_like(x), torch.ones(x.shape[-1], device=x.device), None)[1]


def _attention(x):
    q = x.view(1, 2, 4, 16)
    return kernels.attention(q, q, q)


def _ffn(x):
    w = torch.randn(64, 16, device=x.device) / 4
    return kernels.ffn(x, w, None, w.t().contiguous(), None)


def _linear_cross_entropy(x):
    return kernels.linear_cross_entropy(x, x.detach().flip(0), None, torch.arange(x.shape[0], device=x.device))


@pytest.mark.parametrize("op", [_layer_norm, _add_layer_norm, _attention, _ffn, _linear_cross_entropy],
                         ids=lambda f: f.__name__[1:])
def test_double_backward_is_refused(op, device):
    """create_graph=True would differentiate gradients that carry no graph: the second-order
    terms (a gradient penalty, say) would be dropped without a word."""
    x = torch.randn(8, 16, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(op(x).pow(3).sum(), x)  # first order is fine
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(op(x).pow(3).sum(), x, create_graph=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's limits")
def test_bfloat16_is_refused_in_the_interpreter():
    # The interpreter multiplies bf16 bit patterns in tl.dot (outputs ~1e8 for inputs ~1).
    q = torch.randn(1, 1, 20, 16).bfloat16()
    with pytest.raises(ValueError, match="bfloat16 is not supported under the Triton interpreter"):
        kernels.attention(q, q, q)


def test_interpreting_is_decided_at_import(monkeypatch):
    # @triton.jit read TRITON_INTERPRET at import: setting it later cannot make CPU tensors work.
    monkeypatch.setattr(_utils, "_INTERPRET_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _utils.interpreting()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.layer_norm(torch.randn(2, 8), torch.ones(8), None)


@pytest.mark.parametrize("value", ["", "0", "false", "off", "False"])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):
    """TRITON_INTERPRET values Triton reads as off are off here too: @triton.jit then built
    compiled kernels, which cannot take CPU tensors, so a CPU call must be the ValueError that
    points to the reference (read as on, "false" let CPU tensors through to a launch that
    failed inside Triton, and on a GPU gave every launcher the interpreter's tiny tiles)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert not _utils.interpreting()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.layer_norm(torch.randn(2, 8), torch.ones(8), None)
    monkeypatch.setattr(_utils, "_INTERPRET_AT_IMPORT", True)
    for on in ("1", "true", "ON"):
        monkeypatch.setenv("TRITON_INTERPRET", on)
        assert _utils.interpreting(), on
    # Read in Python (torch.compile traces it), value for value as Triton's own knob reads it.
    import triton

    for other in ("yes", "Y", "2", " 1", "no", "enabled", value):
        monkeypatch.setenv("TRITON_INTERPRET", other)
        assert _utils.interpreting() == bool(triton.knobs.runtime.interpret), other


def test_decode_attention_refuses_autograd(device):
    q = torch.randn(1, 2, 16, device=device, requires_grad=True)
    cache = torch.randn(1, 2, 8, 16, device=device)
    lens = torch.tensor([8], device=device)
    with pytest.raises(ValueError, match="forward-only"):
        kernels.decode_attention(q, cache, cache, lens)
    with torch.no_grad():
        torch.testing.assert_close(kernels.decode_attention(q, cache, cache, lens),
                                   reference.decode_attention(q, cache, cache, lens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: kernels.layer_norm(torch.randn(3, 8, device=d), None, torch.zeros(8, device=d)), "weight is required"),
        (lambda d: kernels.layer_norm(torch.randn(3, 0, device=d), torch.ones(0, device=d), None), "last dimension is 0"),
        (lambda d: kernels.ffn(torch.randn(3, 0, device=d), torch.randn(4, 0, device=d), None,
                               torch.randn(0, 4, device=d), None), "zero-width weights"),
    ],
    ids=["no-weight", "zero-width-rows", "zero-width-ffn"],
)
def test_degenerate_inputs_are_value_errors(call, match, device):
    with pytest.raises(ValueError, match=match):
        call(device)


@pytest.mark.parametrize("op", ["layer_norm", "attention", "ffn", "decode_attention", "sample"])
def test_an_input_that_is_not_a_tensor_is_a_value_error(op, device):
    """A numpy array or a list where a tensor goes is named in the one-line ValueError, not
    an AttributeError (a list's .dtype) or a dtype complaint about numpy's float32."""
    def t(*shape):
        return torch.zeros(*shape, device=device)

    lens, counter = torch.ones(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)
    call = {
        "layer_norm": lambda: kernels.layer_norm(t(2, 8), np.ones(8, dtype=np.float32), None),
        "attention": lambda: kernels.attention(t(1, 1, 4, 16), np.zeros((1, 1, 4, 16), dtype=np.float32), t(1, 1, 4, 16)),
        "ffn": lambda: kernels.ffn(t(2, 8), t(32, 8), None, np.zeros((8, 32), dtype=np.float32), None),
        "decode_attention": lambda: kernels.decode_attention(t(1, 1, 16), t(1, 1, 4, 16), t(1, 1, 4, 16), lens,
                                                             k_new=[0.0] * 16, v_new=t(1, 1, 16)),
        "sample": lambda: kernels.sample(np.zeros((1, 5), dtype=np.float32), counter, counter),
    }[op]
    with pytest.raises(ValueError, match=r"must be a torch.Tensor, got (ndarray|list)"):
        call()


def test_launch_arithmetic():
    """cdiv sizes the grids and next_power_of_2 the blocks: a program short leaves a tile
    unwritten, a program too many or a block twice a row's width (an fp32 row of 16384 at
    128 KiB of registers) costs only time in the interpreter, so its numbers do not show it."""
    assert [_utils.cdiv(a, 4) for a in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]
    assert [_utils.next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 16384)] == [1, 1, 2, 4, 4, 8, 16, 32, 16384]


def test_ffn_under_no_grad_saves_nothing(device, monkeypatch):
    """An eval model's weights require grad; under no_grad the forward must still not
    write the M x 4C pre-activation that only a backward reads."""
    auxes = []
    matmul = ffn_module._matmul
    monkeypatch.setattr(ffn_module, "_matmul", lambda *a, **k: auxes.append(k.get("aux")) or matmul(*a, **k))
    x = torch.randn(5, 16, device=device)
    w = torch.randn(64, 16, device=device, requires_grad=True)
    with torch.no_grad():
        kernels.ffn(x, w, None, w.t().contiguous(), None)
    assert auxes == [None, None]
    kernels.ffn(x, w, None, w.t().contiguous(), None)
    assert auxes[2] is not None  # with grad on, the backward's input is saved


@pytest.fixture
def auto_runs_kernels(monkeypatch):
    """"auto" as on CUDA: the Triton kernels for models at least AUTO_MIN_WIDTH wide."""
    monkeypatch.setattr(ops, "backend", lambda x, mode="auto": reference if mode == "torch" else kernels)


@pytest.mark.parametrize("heads, head_dim, runs", [(16, 48, "reference"), (48, 16, "kernels")])
def test_auto_attention_takes_the_reference_for_other_head_dims(auto_runs_kernels, monkeypatch, heads, head_dim, runs):
    used = []
    for name, module in (("reference", reference), ("kernels", kernels)):
        fn = module.attention
        monkeypatch.setattr(module, "attention", lambda *a, _fn=fn, _n=name, **k: used.append(_n) or _fn(*a, **k))
    q = torch.randn(1, heads, 2, head_dim)
    ops.attention(q, q, q, mode="auto")
    assert used == [runs]
    if runs == "reference":  # "triton" asks for the kernel, and hears why it cannot run
        with pytest.raises(ValueError, match="head dim 48 is not supported"):
            ops.attention(q, q, q, mode="triton")


@pytest.mark.parametrize("grad", [False, True])
def test_auto_decode_attention_takes_the_reference_under_autograd(auto_runs_kernels, grad):
    q = torch.randn(1, 2, 16, requires_grad=grad)
    cache = torch.randn(1, 2, 8, 16)
    new = torch.randn(1, 2, 16)
    out = ops.decode_attention(q, cache, cache.clone(), torch.tensor([8]), new, new, mode="auto")
    assert out.requires_grad == grad  # the kernel's output has no graph; the reference's has


@pytest.mark.parametrize("dtype, width, runs", [
    (torch.float64, 768, "reference"),  # the kernels take 16- and 32-bit floats
    (torch.float32, 16384 + 64, "reference"),  # wider than a row the kernel holds in registers
    (torch.float32, 768, "kernels"),
    (torch.float32, 16384, "kernels"),  # exactly 64 KiB: still the kernel's
])
def test_auto_layer_norm_takes_the_reference_for_what_the_kernel_refuses(auto_runs_kernels, monkeypatch, dtype, width, runs):
    used = []
    for name, module in (("reference", reference), ("kernels", kernels)):
        for op in ("layer_norm", "add_layer_norm"):
            fn = getattr(module, op)
            monkeypatch.setattr(module, op, lambda *a, _fn=fn, _n=name, **k: used.append(_n) or _fn(*a, **k))
    x = torch.randn(1, width, dtype=dtype)
    w = torch.ones(width, dtype=dtype)
    ops.layer_norm(x, w, w, 1e-5, mode="auto")
    ops.add_layer_norm(x, x, w, w, 1e-5, mode="auto")
    assert set(used) == {runs}


def test_auto_attention_takes_the_reference_for_float64(auto_runs_kernels):
    q = torch.randn(1, 12, 2, 64, dtype=torch.float64)
    ops.attention(q, q, q, mode="auto")  # the kernel would raise on float64
    with pytest.raises(ValueError, match="float64"):
        ops.attention(q, q, q, mode="triton")


def _record(monkeypatch, *names):
    """The list each call of the named ops appends "reference" or "kernels" to, by which ran."""
    used = []
    for name, module in (("reference", reference), ("kernels", kernels)):
        for op in names:
            fn = getattr(module, op)
            monkeypatch.setattr(module, op, lambda *a, _fn=fn, _n=name, **k: used.append(_n) or _fn(*a, **k))
    return used


@pytest.mark.parametrize("dtype, autocast, switch, runs", [
    (torch.float32, None, True, "kernels"),
    (torch.float32, torch.float16, True, "reference"),
    (torch.float16, None, True, "reference"),
    (torch.float32, None, False, "reference"),
], ids=["fp32", "fp16-autocast", "fp16", "switched-off"])
def test_auto_fused_loss_takes_the_reference_in_fp16_or_switched_off(auto_runs_kernels, monkeypatch, dtype, autocast,
                                                                      switch, runs):
    """fp16 holds the rows' gradients too coarsely (kernels/cross_entropy.py): "auto" takes
    torch's head and loss there, in the autocast dtype as much as in the tensors' own."""
    monkeypatch.setattr(ops, "AUTO_TRITON_LOSS", switch)
    monkeypatch.setattr(ops, "AUTO_MIN_WIDTH", 16)
    used = _record(monkeypatch, "linear_cross_entropy")
    x, w = torch.randn(2, 3, 16, dtype=dtype), torch.randn(20, 16, dtype=dtype)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        ops.linear_cross_entropy(x, w, torch.randint(0, 20, (2, 3)), -1, mode="auto")
    assert used == [runs]


@pytest.mark.parametrize("x_dtype, residual_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_auto_add_layer_norm_sizes_a_row_by_the_wider_of_x_and_residual(auto_runs_kernels, monkeypatch, x_dtype,
                                                                        residual_dtype):
    """The kernel holds a row of up to 64 KiB in the wider of x's and the residual's dtypes:
    16448 values are past it when either is fp32, and "auto" takes the reference. Sized by x
    alone, an fp16 x beside an fp32 residual went to the kernel, which raised its ValueError
    (found by a mutation audit of gpt/ops.py)."""
    used = _record(monkeypatch, "add_layer_norm")
    N = 16384 + 64
    x, residual = torch.randn(1, N, dtype=x_dtype), torch.randn(1, N, dtype=residual_dtype)
    s, y = ops.add_layer_norm(x, residual, torch.ones(N), None, 1e-5, mode="auto")
    assert used == ["reference"]
    torch.testing.assert_close(s, x.float() + residual.float())


def test_auto_reads_the_capability_of_the_tensors_own_gpu(monkeypatch):
    """An sm75 as cuda:1 beside an sm90 as cuda:0: a model on cuda:1 runs on torch under "auto",
    and kernels="triton" is refused there naming that GPU (a mutation audit: asking cuda:0's
    capability whatever the tensor's GPU went unseen, every test's tensor being on cuda:0)."""
    import types

    from gpt import GPTConfig

    monkeypatch.setattr(_utils, "device_capability", lambda index=0: {0: (9, 0), 1: (7, 5)}[index])
    on = lambda index: types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))  # noqa: E731
    assert ops.backend(on(1), "auto") is reference
    assert ops.backend(on(0), "auto") is kernels
    config = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=32, kernels="triton")
    assert "this one is sm75" in ops.triton_unsupported(config, torch.device("cuda", 1), torch.float16)
    assert ops.triton_unsupported(config, torch.device("cuda", 0), torch.float16) is None


def test_auto_runs_cpu_tensors_on_torch_beside_a_gpu(monkeypatch):
    """A model on the CPU of a machine with an sm90 GPU: "auto" runs its CPU tensors on the
    reference, not on the kernels, which need CUDA tensors outside the interpreter (a mutation
    audit: asking only the GPU's capability went unseen, the interpreter's (0, 0) sending CPU
    tensors to torch anyway)."""
    monkeypatch.setattr(_utils, "device_capability", lambda index=0: (9, 0))
    assert ops.backend(torch.zeros(1), "auto") is reference


@pytest.mark.parametrize("capability, hopper", [((8, 0), False), ((9, 0), True), ((10, 0), False), ((12, 0), False)])
def test_only_sm90_takes_the_hopper_paths(monkeypatch, capability, hopper):
    """The Hopper-only settings (tiles timed on an H200, the persistent LayerNorm forward's
    two 96 KiB programs an SM) are for sm90 alone, not every newer GPU (sm120 has 100 KiB of
    shared memory an SM); a mutation audit: sm90 "or newer" went unseen."""
    import types

    monkeypatch.setattr(_utils, "device_capability", lambda index=0: capability)
    assert _utils.is_hopper(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))) is hopper
    assert not _utils.is_hopper(torch.zeros(1))


@pytest.mark.skipif(not _utils.interpreting(), reason="the interpreter's capability")
def test_the_interpreter_has_no_gpu_capability(monkeypatch):
    """Under TRITON_INTERPRET on a machine with a GPU, kernels run on CPU tensors with the
    interpreter's settings, not the GPU's (a mutation audit: reading the GPU's capability
    there went unseen, CI having no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    _utils.device_capability.cache_clear()
    try:
        assert _utils.device_capability(0) == (0, 0)
    finally:
        _utils.device_capability.cache_clear()


@pytest.mark.parametrize("causal, Tq, Tk", [(False, 16, 16), (True, 16, 16), (True, 8, 16)],
                         ids=["full", "causal", "causal-cache"])
def test_the_reference_attention_drops_out_in_each_branch(causal, Tq, Tk):
    """kernels.reference.attention, the oracle and the CPU path, drops probabilities whichever
    SDPA call it makes: about half at p = 0.5, the rest doubled (a mutation audit: the
    non-causal branch ignoring dropout_p went unseen, the model being causal)."""
    torch.manual_seed(0)
    q, k, v = torch.zeros(1, 1, Tq, Tk), torch.zeros(1, 1, Tk, Tk), torch.eye(Tk).view(1, 1, Tk, Tk)
    plain = reference.attention(q, k, v, causal=causal)  # v = I: the probabilities themselves
    out = reference.attention(q, k, v, causal=causal, dropout_p=0.5)
    seen, kept = plain > 0, out > 0
    assert not (kept & ~seen).any()
    assert 0.3 < (out[seen] == 0).float().mean() < 0.7
    torch.testing.assert_close(out[kept], 2 * plain[kept])


def test_an_unknown_kernels_mode_is_refused():
    """A caller's typo is a ValueError naming the choices, not the torch reference run quietly
    (a mutation audit: backend() returning the reference for any other mode went unseen)."""
    with pytest.raises(ValueError, match="kernels must be 'auto', 'triton' or 'torch', got 'trition'"):
        ops.backend(torch.zeros(1), "trition")


@pytest.mark.parametrize("dtype, width, match", [(torch.float64, 16, "float64"), (torch.float32, 16384 + 64, "64 KiB")])
def test_triton_layer_norm_is_refused_where_auto_takes_the_reference(dtype, width, match):
    """kernels="triton" means the kernels: what "auto" sends to torch (float64, a row past 64 KiB)
    is the kernel's ValueError under "triton", not torch run quietly (a mutation audit: the
    LayerNorm's fallback taken under "triton" too went unseen)."""
    x = torch.randn(1, width, dtype=dtype)
    w = torch.ones(width, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        ops.layer_norm(x, w, None, 1e-5, mode="triton")
    with pytest.raises(ValueError, match=match):
        ops.add_layer_norm(x, x, w, None, 1e-5, mode="triton")


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_attention_is_bidirectional_with_causal_off(mode):
    """ops.attention(causal=False) reaches the implementation (a mutation audit: causal=True
    passed whatever the caller asked went unseen, the model always being causal)."""
    q, k, v = torch.randn(3, 1, 2, 8, 16).unbind(0)
    out = ops.attention(q, k, v, causal=False, mode=mode)
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=False), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, ops.attention(q, k, v, causal=True, mode=mode))


@pytest.mark.parametrize("head_dim, dtype, grad, requires_grad, runs, refused", [
    (16, torch.float32, True, False, "kernels", None),  # a frozen model decoding with grad mode on
    (16, torch.float32, False, True, "kernels", None),  # under no_grad nothing is recorded
    (16, torch.float32, True, True, "reference", "forward-only"),
    (48, torch.float32, False, False, "reference", "head dim 48"),
    (16, torch.float64, False, False, "reference", "float64"),
], ids=["grad-mode-only", "no-grad", "autograd", "head-dim-48", "float64"])
def test_auto_decode_attention_takes_the_kernel_unless_it_would_refuse(auto_runs_kernels, monkeypatch, head_dim, dtype,
                                                                       grad, requires_grad, runs, refused):
    """"auto" decodes on the kernel unless autograd records the call (grad mode on and q
    requiring grad), the head dim or the dtype is one it does not take; "triton" then raises
    the kernel's error rather than run torch (a mutation audit: dropping the head-dim or
    dtype fallback, either half of the autograd test, or falling back under "triton" too all
    went unseen)."""
    used = _record(monkeypatch, "decode_attention")
    q = torch.randn(1, 2, head_dim, dtype=dtype, requires_grad=requires_grad)
    cache = torch.randn(1, 2, 8, head_dim, dtype=dtype)
    new = torch.randn(1, 2, head_dim, dtype=dtype)
    with torch.set_grad_enabled(grad):
        ops.decode_attention(q, cache, cache.clone(), torch.tensor([8]), new, new, mode="auto")
        assert used == [runs]
        if refused:
            with pytest.raises(ValueError, match=refused):
                ops.decode_attention(q, cache, cache.clone(), torch.tensor([8]), new, new, mode="triton")


@pytest.mark.parametrize("shape, triton", [((2, 128, 16), True), ((1, 255, 16), False)], ids=["256-rows", "255-rows"])
def test_auto_ffn_counts_rows_over_every_leading_dim(monkeypatch, shape, triton):
    """FFN_MIN_ROWS counts tokens, batch times sequence: 2 x 128 is FFN_MIN_ROWS (256) rows and
    takes the Triton FFN once AUTO_TRITON_FFN is on, 255 do not (a mutation audit: a boundary
    of <= and counting the batch dim alone went unseen, the policy test's inputs being 2-D)."""
    monkeypatch.setattr(ops, "AUTO_TRITON_FFN", True)
    monkeypatch.setattr(ops, "step_backend", lambda x, mode, width: kernels)
    used = _record(monkeypatch, "ffn")
    C = shape[-1]
    x = torch.randn(shape)
    ops.ffn(x, torch.randn(4 * C, C) / 4, torch.randn(4 * C), torch.randn(C, 4 * C) / 8, torch.randn(C), mode="auto")
    assert used == ["kernels" if triton else "reference"]


def test_auto_ffn_folds_the_gelu_into_the_matmul_only_on_cuda_with_a_bias(monkeypatch):
    """Under no_grad, "auto" runs a CUDA FFN's GELU in cuBLAS's epilogue (torch._addmm_activation),
    which needs a bias to fold: a model without biases (bias=False) takes the separate GELU, and
    CPU tensors the reference, whose tanh GELU the CPU's _addmm_activation does not compute
    (a mutation audit: the epilogue for a bias-free FFN, a TypeError on a GPU, and on CPU
    tensors both went unseen). CPU tensors pass for CUDA ones in the second half."""
    calls = []
    addmm_activation = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(1) or addmm_activation(*a, **k))
    C = 16
    x = torch.randn(2, 1, C)
    w = torch.randn(4 * C, C) / 4, torch.randn(4 * C), torch.randn(C, 4 * C) / 8, torch.randn(C)
    no_bias = w[0], None, w[2], None
    with torch.no_grad():
        torch.testing.assert_close(ops.ffn(x, *w), reference.ffn(x, *w))
        assert not calls
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        torch.testing.assert_close(ops.ffn(x, *no_bias), reference.ffn(x, *no_bias))
        assert not calls
        torch.testing.assert_close(ops.ffn(x, *w), reference.ffn(x, *w), rtol=1e-2, atol=1e-3)
        assert calls == [1]


@pytest.mark.parametrize("grad, epilogue", [(True, True), (False, False)], ids=["training", "switched-off"])
def test_auto_ffn_takes_the_separate_gelu_when_training_or_switched_off(monkeypatch, grad, epilogue):
    """The epilogue is for inference with GELU_EPILOGUE on: torch._addmm_activation has no
    derivative, so a CUDA FFN that autograd records takes the separate GELU and trains (a
    mutation audit: the epilogue with grad on, and GELU_EPILOGUE = False ignored, both went
    unseen, the epilogue test running under no_grad alone). CPU tensors pass for CUDA ones."""
    calls = []
    addmm_activation = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(1) or addmm_activation(*a, **k))
    monkeypatch.setattr(ops, "GELU_EPILOGUE", epilogue)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    C = 16
    x = torch.randn(2, 1, C)
    w = [t.requires_grad_() for t in (torch.randn(4 * C, C) / 4, torch.randn(4 * C), torch.randn(C, 4 * C) / 8, torch.randn(C))]
    with torch.set_grad_enabled(grad):
        out = ops.ffn(x, *w)
    torch.testing.assert_close(out, reference.ffn(x, *w))
    assert not calls
    if grad:
        out.sum().backward()
        assert all(t.grad is not None for t in w)


def test_auto_ffn_folds_the_gelu_in_the_autocast_dtype(monkeypatch):
    """Autocast has no rule for _addmm_activation: gpt.ops casts its operands, so an fp32 model
    generating under autocast runs the epilogue's matmul in the autocast dtype, not in fp32 (a
    mutation audit: leaving them uncast went unseen, the output being cast by the second
    matmul). CPU tensors pass for CUDA ones, bf16 autocast on the CPU for CUDA's."""
    dtypes = []
    addmm_activation = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation",
                        lambda *a, **k: dtypes.append({t.dtype for t in a}) or addmm_activation(*a, **k))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    C = 16
    x = torch.randn(2, 1, C)
    w = torch.randn(4 * C, C) / 4, torch.randn(4 * C), torch.randn(C, 4 * C) / 8, torch.randn(C)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.ffn(x, *w)
    assert dtypes == [{torch.bfloat16}] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.ffn(x, *w), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_triton_ffn_runs_in_the_autocast_dtype(device, bias):
    """Autocast does not reach into the Triton kernels: gpt.ops casts the FFN's operands as
    F.linear's would, so a model training under autocast gets the FFN in the autocast dtype on
    either path (a mutation audit: leaving them fp32 went unseen, the results being close; a
    later one: the missing biases of a bias=False model dropped from the cast operands, which
    then no longer unpacked, went unseen too). The interpreter computes bf16 wrongly: fp16 on CPU."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    torch.manual_seed(0)
    C = 16
    x = torch.randn(2, 3, C, device=device)
    w = [t.to(device) for t in (torch.randn(4 * C, C) / 4, torch.randn(4 * C), torch.randn(C, 4 * C) / 8, torch.randn(C))]
    if not bias:
        w[1] = w[3] = None
    with torch.autocast(device, dtype=dtype):
        got, want = ops.ffn(x, *w, mode="triton"), ops.ffn(x, *w, mode="torch")
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def _opcheck_cases(d: str) -> list:
    """(op, args) for torch.library.opcheck: each custom op that torch.compile traces, on the
    layouts the model passes (a fused QKV projection's views, fp32 weights beside fp16
    activations) and the edges (no bias, Tq < Tk, dropout with a seed, unused gradients)."""
    def t(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, device=d, dtype=dtype).requires_grad_(grad)

    qkv = t(2, 9, 3, 2, 16)
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))
    q2, k2, v2 = t(1, 2, 5, 32), t(1, 2, 12, 32), t(1, 2, 12, 32)
    x, w, b = t(3, 5, 48), t(48), t(48)
    fc, proj = t(64, 16) / 4, t(16, 64) / 4
    ln, add_ln, attn, ffn = (layer_norm_module._layer_norm_op, layer_norm_module._add_layer_norm_op,
                             attention_module._attention_op, ffn_module._ffn_op)
    cases = [
        (ln, (x, w, b, 1e-5)),
        (ln, (x.transpose(0, 1), w, None, 1e-5)),
        (ln, (t(4, 48, dtype=torch.float16), w, b, 1e-5)),
        (add_ln, (x, t(3, 5, 48, dtype=torch.float16), w, b, 1e-5)),
        (add_ln, (t(3, 5, 48, dtype=torch.float16), x, w, None, 1e-5)),
        (attn, (q, k, v, True, None, 0.0, None, False, None)),
        (attn, (q2, k2, v2, True, 0.3, 0.0, None, False, None)),
        (attn, (q2, k2, v2, True, 0.3, 0.0, None, False, 3)),  # a sliding window
        (attn, (t(1, 2, 5, 16, dtype=torch.float16), t(1, 2, 7, 16, dtype=torch.float16),
                t(1, 2, 7, 16, dtype=torch.float16), True, None, 0.0, None, False, None)),
        (attn, (t(1, 4, 5, 16), k2[:, :1, :, :16], v2[:, 1:, :, :16], True, None, 0.0, None, True, None)),  # grouped
        (attention_module._attention_dropout_op, (q2, k2, v2, False, None, 0.25, torch.tensor(1234), False, None)),
        (attention_module._dropout_seed_op, (torch.empty(0, dtype=torch.int64),)),
        (ffn, (t(2, 3, 16), fc, t(64), proj, t(16), True)),
        (ffn, (t(7, 16).t().contiguous().t(), fc, None, proj, None, False)),
        (ffn, (t(5, 16, dtype=torch.float16), (fc / 4).half(), t(64, dtype=torch.float16), (proj / 4).half(),
               None, True)),
    ]
    y, mean, rstd = ln(x, w, b, 1e-5)
    s, _, mean2, rstd2 = add_ln(x, x, w, None, 1e-5)
    o, lse, seed = attention_module._attention_dropout_op(q2, k2, v2, False, None, 0.25, torch.tensor(1234), False, None)
    x3 = t(6, 16)
    qt = t(1, 2, 16, 8).detach().transpose(-1, -2)  # dense, its last dim not contiguous
    o3, lse3, no_seed = attn(qt, qt, qt, True, None, 0.0, None, False, None)
    q4, kv4 = t(1, 4, 6, 16).detach(), t(1, 2, 6, 16).detach()
    o4, lse4, _ = attn(q4, kv4, kv4, True, None, 0.0, None, True, None)
    o5, lse5, _ = attn(qt, qt, qt, True, None, 0.0, None, False, 3)
    _, pre, h = ffn(x3, fc, t(64), proj, t(16), True)
    detached = lambda *ts: [z.detach() for z in ts]  # noqa: E731
    cases += [
        (layer_norm_module._layer_norm_backward_op, (y.detach(), None, *detached(x, w, mean, rstd), torch.float32)),
        (layer_norm_module._layer_norm_backward_op, (y.detach(), None, *detached(x, w, mean, rstd), torch.float16)),
        (layer_norm_module._layer_norm_backward_op, (*detached(s, s, s, w, mean2, rstd2), None)),
        (attention_module._attention_dropout_backward_op,
         (*detached(o, q2, k2, v2, o, lse), False, 0.25, 0.25, seed, None, None)),
        (attention_module._attention_backward_op, (o3, qt, qt, qt, o3, lse3, True, 0.25, 0.0, no_seed, None, None)),
        (attention_module._attention_backward_op, (o4, q4, kv4, kv4, o4, lse4, True, 0.25, 0.0, no_seed, None, None)),
        (attention_module._attention_backward_op, (o5, qt, qt, qt, o5, lse5, True, 0.25, 0.0, no_seed, None, 3)),
        # the log-sum-exp's gradient (return_lse), with and without the output's
        (attention_module._attention_backward_op, (o3, qt, qt, qt, o3, lse3, True, 0.25, 0.0, no_seed, lse3, None)),
        (attention_module._attention_backward_op, (None, qt, qt, qt, o3, lse3, True, 0.25, 0.0, no_seed, lse3, None)),
        (ffn_module._ffn_backward_op, (*detached(x3, x3, fc, fc[:, 0], proj, pre, h), [True] * 5)),
        (ffn_module._ffn_backward_op, (*detached(x3, x3, fc), None, proj.detach(), None, h.detach(),
                                       [False, True, False, True, False])),
        (ffn_module._ffn_backward_op, (*(z.half() for z in detached(x3, x3, fc, fc[:, 0], proj)), None,
                                       h.detach().half(), [True] * 5)),
    ]
    targets = torch.randint(0, 20, (3, 5), device=d)
    targets[0, 0] = -1
    lce = cross_entropy_module._linear_cross_entropy_op
    cases += [
        (lce, (x[..., :16], t(20, 16), t(20), targets, -1, "mean", [True, True, True])),
        (lce, (x[..., :16], t(20, 16), None, targets, -1, "sum", [False, True, False])),
        (lce, (t(4, 16, dtype=torch.float16), t(20, 16, dtype=torch.float16), None, targets[0, :4], -1, "mean",
               [True, False, False])),
    ]
    return cases


def test_the_custom_ops_are_sound(device):
    """The ops torch.compile sees: their fake implementations give the real outputs' shapes,
    strides and dtypes, and their autograd registration the real gradients (opcheck)."""
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["layer_norm", "layer_norm-eps", "layer_norm-strided-weight", "add_layer_norm", "add_layer_norm-eps",
                                  "add_layer_norm-fp16", "attention", "dropout", "seeded-dropout", "gqa", "lse", "window", "ffn",
                                  "linear_cross_entropy"])
def test_torch_compile_gives_the_results_of_eager(name, device):
    """Bit for bit (aot_eager runs the graph's other ops as eager does), gradients too."""
    x = torch.randn(8, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    fc = (torch.randn(64, 16, device=device) / 4).requires_grad_()
    op = {
        "layer_norm": lambda x: kernels.layer_norm(x, w, w),
        "layer_norm-eps": lambda x: kernels.layer_norm(x, w, w, eps=0.5),
        # The backward's custom op gets the weight as the forward saw it, a stride-2 view here.
        "layer_norm-strided-weight": lambda x: kernels.layer_norm(x, w.repeat(2)[::2], w),
        "add_layer_norm": lambda x: torch.cat(kernels.add_layer_norm(x, x.flip(0), w, None)),
        "add_layer_norm-eps": lambda x: torch.cat(kernels.add_layer_norm(x, x.flip(0), w, None, eps=0.5)),
        "add_layer_norm-fp16": lambda x: torch.cat(kernels.add_layer_norm(x.half(), x.flip(0), w, None)),
        "attention": lambda x: kernels.attention(*[x.view(1, 2, 4, 16)] * 3),
        "dropout": lambda x: kernels.attention(*[x.view(1, 2, 4, 16)] * 3, causal=False, dropout_p=0.5),
        "seeded-dropout": lambda x: kernels.attention(*[x.view(1, 2, 4, 16)] * 3, dropout_p=0.5, seed=1234),
        "gqa": lambda x: kernels.attention(x.view(1, 2, 4, 16), x.view(1, 1, 8, 16), x.view(1, 1, 8, 16).flip(2),
                                           dropout_p=0.5, enable_gqa=True),
        "lse": lambda x: torch.cat([t.flatten() for t in kernels.attention(*[x.view(1, 2, 4, 16)] * 3, return_lse=True)]),
        "window": lambda x: kernels.attention(*[x.view(1, 2, 4, 16)] * 3, dropout_p=0.5, window=2),
        "ffn": lambda x: kernels.ffn(x, fc, None, fc.t(), w),
        "linear_cross_entropy": lambda x: kernels.linear_cross_entropy(
            x, fc, None, torch.arange(8, device=x.device) * 7, ignore_index=14).view(1),
    }[name]
    results = []
    for fn in (op, torch.compile(op, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(0)
        out = fn(x)
        results.append((out, *torch.autograd.grad(out.square().sum(), (x, w, fc), allow_unused=True)))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda d: kernels.layer_norm(torch.randn(3, 8, device=d), torch.ones(5, device=d), None), "must have shape"),
    (lambda d: kernels.layer_norm(torch.tensor(1.0, device=d), torch.ones(1, device=d), None), "got a scalar"),
    (lambda d: kernels.add_layer_norm(torch.randn(3, 8, device=d), torch.randn(3, 9, device=d),
                                      torch.ones(8, device=d), None), "residual has shape"),
    (lambda d: kernels.attention(*[torch.randn(1, 2, 4, 48, device=d)] * 3), "head dim 48 is not supported"),
    (lambda d: kernels.attention(*[torch.randn(2, 4, 16, device=d)] * 3), "q must be 4-D"),
    (lambda d: kernels.attention(torch.randn(1, 4, 4, 16, device=d), *[torch.randn(1, 2, 4, 16, device=d)] * 2),
     "pass enable_gqa=True"),
    (lambda d: kernels.ffn(torch.randn(3, 8, device=d), torch.randn(32, 16, device=d), None,
                           torch.randn(16, 32, device=d), None), "in-features"),
    (lambda d: kernels.linear_cross_entropy(torch.randn(3, 8, device=d), torch.randn(32, 8, device=d), None,
                                            torch.zeros(3, device=d)), "targets must be integer indices"),
], ids=["layer_norm", "layer_norm-scalar", "add_layer_norm", "attention", "attention-3d", "attention-heads", "ffn",
        "linear_cross_entropy"])
def test_torch_compile_raises_the_eager_value_error(call, match, device):
    """Bad input under torch.compile is the eager one-line ValueError, raised while tracing,
    not a failure deep inside the fake-tensor pass."""
    with pytest.raises(ValueError, match=match):
        torch.compile(call, backend="aot_eager")(device)


@pytest.mark.parametrize("name", ["attention", "layer_norm", "ffn"])
def test_a_compiled_kernel_still_runs_after_it_raised(name, device):
    """Dynamo marks a frame that raised while it traced to run eagerly from then on; the
    eager branch must then run as eager does, not with Dynamo tracing the launches (which
    under the interpreter failed on every later call, good inputs too)."""
    t = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    q = t(1, 2, 8, 16)
    good, bad = {
        "attention": ((q, q, q), (q, q, q.half())),
        "layer_norm": ((q, t(16), None), (q, t(15), None)),
        "ffn": ((q, t(32, 16), None, t(16, 32), None), (q, t(32, 15), None, t(16, 32), None)),
    }[name]
    fn = getattr(kernels, name)
    compiled = torch.compile(fn, backend="aot_eager")
    with pytest.raises(ValueError):
        compiled(*bad)
    torch.testing.assert_close(compiled(*good), fn(*good), rtol=0, atol=0)


def test_torch_compile_recomputes_a_checkpointed_dropout_with_its_mask(device):
    """torch.utils.checkpoint under torch.compile recomputes the attention's forward for
    the backward: it must redraw the forward's seed (as eager's checkpoint does, restoring
    the CPU generator), not a new one, which gave the gradients of another mask."""
    from torch.utils.checkpoint import checkpoint

    q0 = torch.randn(1, 2, 32, 32, device=device)

    def fn(q):
        return checkpoint(lambda q: kernels.attention(q, q * 2, q, causal=False, dropout_p=0.5), q,
                          use_reentrant=False).square().sum()

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        q = q0.clone().requires_grad_()
        torch.manual_seed(0)
        loss = f(q)
        results.append((loss.detach(), *torch.autograd.grad(loss, q)))
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [lambda: np.float64(0.25), lambda: torch.tensor(0.25)], ids=["numpy", "tensor"])
def test_torch_compile_takes_the_scales_eager_takes(scale, device):
    """Eager runs float(scale): a numpy float (1 / np.sqrt(D)) or a 0-d tensor works; the
    op's float argument took neither under torch.compile (a failure in the fake-tensor pass)."""
    q = torch.randn(1, 2, 4, 16, device=device)

    def fn(q, s):
        return kernels.attention(q, q, q, scale=s)

    s = scale()
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(q, s), fn(q, s), rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="torch has no cudagraph_unsafe tag")
@pytest.mark.parametrize("dropout_p", [0.0, 0.5], ids=["no-dropout", "dropout"])
def test_only_the_dropout_ops_are_kept_out_of_cuda_graphs(dropout_p, device):
    """The ops torch.compile's graphs call, forward and backward: with dropout, the seed's draw
    and both passes are tagged cudagraph_unsafe (test_cuda_graphs_of_torch_compile_draw_each_steps_dropout
    shows why, on a GPU); without, attention runs as ops a CUDA graph may take in."""
    from torch._dynamo.backends.common import aot_autograd

    called = []

    def record(gm, _):
        called.extend(n.target for n in gm.graph.nodes if str(n.target).startswith("tritongpt."))
        return gm

    q = torch.randn(1, 2, 8, 16, device=device, requires_grad=True)
    fn = torch.compile(lambda q: kernels.attention(q, q, q, dropout_p=dropout_p).sum(), fullgraph=True,
                       backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    fn(q).backward()
    unsafe = {str(op) for op in called if torch.Tag.cudagraph_unsafe in op.tags}
    if dropout_p:
        assert {str(op) for op in called} == unsafe == {
            "tritongpt.dropout_seed.default", "tritongpt.attention_dropout.default",
            "tritongpt.attention_dropout_backward.default"}
    else:
        assert {str(op) for op in called} == {"tritongpt.attention.default", "tritongpt.attention_backward.default"}
        assert not unsafe


@pytest.mark.parametrize("recompute_pre, grad, saved",
                         [(False, True, True), (True, True, False), (False, False, False)],
                         ids=["training", "recompute_pre", "no_grad"])
def test_torch_compile_saves_the_pre_activation_only_for_a_backward_that_reads_it(recompute_pre, grad, saved, device):
    """As eager: the M x H pre-activation is kept only when a backward can come and
    recompute_pre does not trade it for a matmul."""
    from torch._dynamo.backends.common import aot_autograd

    save_pre = []

    def record(gm, _):
        save_pre.extend(n.args[-1] for n in gm.graph.nodes if n.target is torch.ops.tritongpt.ffn.default)
        return gm

    fc, x = (torch.randn(64, 16, device=device) / 4).requires_grad_(), torch.randn(4, 16, device=device)
    fn = torch.compile(lambda x: kernels.ffn(x, fc, None, fc.t(), None, recompute_pre=recompute_pre), fullgraph=True,
                       backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    with torch.set_grad_enabled(grad):
        fn(x)
    assert save_pre == [saved]


def test_attention_without_dropout_draws_no_seed(device):
    """Only dropout draws a seed from torch's generator: without it, eager or compiled, the
    kernels leave the random stream as torch's attention does."""
    q = torch.randn(1, 2, 8, 16, device=device)

    def fn(q):
        return kernels.attention(q, q, q)

    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        state = torch.get_rng_state()
        f(q)
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.gpu
def test_cuda_graphs_of_torch_compile_draw_each_steps_dropout():
    """mode="reduce-overhead" replays CUDA graphs, which would freeze the seed drawn on the
    host: the dropout ops stay out of them, so each step has eager's mask, not the first's."""
    q = torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def fn(q):
        return kernels.attention(q, q * 2, q, dropout_p=0.5).square().sum()

    compiled = torch.compile(fn, mode="reduce-overhead")
    for step in range(3):
        results = []
        for f in (fn, compiled):
            torch.manual_seed(step)
            loss = f(q)
            results.append((loss.detach().clone(), *torch.autograd.grad(loss, q)))
        for compiled_result, eager_result in zip(results[1], results[0]):
            torch.testing.assert_close(compiled_result, eager_result, rtol=1e-2, atol=1e-2)


def _launchers(module) -> dict[str, bool]:
    """Each function of a kernel module that launches a kernel (`kernel[grid](...)`, lambdas
    inside included), by name: whether it runs on its tensors' GPU, itself decorated with
    on_input_device or called only from functions that do."""
    tree = ast.parse(inspect.getsource(module))
    functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    guarded = {name for name, f in functions.items()
               if any(isinstance(d, ast.Name) and d.id == "on_input_device" for d in f.decorator_list)}
    callers = {name: {caller for caller, f in functions.items() for call in ast.walk(f)
                      if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == name}
               for name in functions}
    while True:
        more = {name for name, by in callers.items() if by and by <= guarded} - guarded
        if not more:
            break
        guarded |= more
    launching = {name for name, f in functions.items() for call in ast.walk(f)
                 if isinstance(call, ast.Call) and isinstance(call.func, ast.Subscript)}
    return {name: name in guarded for name in launching}


@pytest.mark.parametrize("module", [ffn_module, attention_module, layer_norm_module, cross_entropy_module,
                                    importlib.import_module("kernels.decode_attention"),
                                    importlib.import_module("kernels.sampling")], ids=lambda m: m.__name__)
def test_every_launch_runs_on_its_tensors_gpu(module):
    """Triton launches on the current CUDA device, not the tensors': every launch must sit
    under on_input_device, or tensors on cuda:1 (a model spread over GPUs) run on cuda:0."""
    launchers = _launchers(module)
    assert launchers and all(launchers.values()), launchers


def test_on_input_device_makes_the_first_tensors_gpu_current(monkeypatch):
    class OnSecondGPU(torch.Tensor):
        is_cuda = True
        device = torch.device("cuda", 1)

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield
    monkeypatch.setattr(torch.cuda, "device", device)
    launch = _utils.on_input_device(lambda name, t, u: (name, entered[:]))
    t = torch.zeros(1).as_subclass(OnSecondGPU)
    assert launch("op", t, torch.zeros(1)) == ("op", [torch.device("cuda", 1)])
    assert launch("op", torch.zeros(1), t) == ("op", [torch.device("cuda", 1)])  # the first tensor is on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_gpu_of_their_tensors():
    """With cuda:0 current, tensors on cuda:1 give the results they give with cuda:1 current."""
    def run(x):
        q = x.view(2, 4, 64, 64)
        w = torch.randn(256, 64, device=x.device, dtype=x.dtype, generator=torch.Generator(x.device).manual_seed(0)) / 8
        cache = q.unsqueeze(2).expand(-1, -1, 3, -1, -1).reshape(2, 4, 192, 64).contiguous()
        lens = torch.full((2,), 150, device=x.device)
        with torch.no_grad():
            dec = kernels.decode_attention(q[:, :, 0], cache, cache, lens)
            counters = torch.zeros(33, dtype=torch.int64, device=x.device)
            token = kernels.sample(x.detach().reshape(32, 1024).float(), counters[:1], counters[1:])
        y = kernels.layer_norm(x, torch.ones(64, device=x.device, dtype=x.dtype), None)
        out = kernels.attention(q, q, q).sum() + kernels.ffn(y, w, None, w.t().contiguous(), None).sum()
        return out, *torch.autograd.grad(out, x), dec, token

    x = torch.randn(2 * 4 * 64, 64, generator=torch.Generator().manual_seed(0)).to("cuda:1", torch.bfloat16)
    x.requires_grad_()
    with torch.cuda.device(1):
        expected = run(x)
    with torch.cuda.device(0):
        got = run(x)
    for g, e in zip(got, expected, strict=True):
        assert g.device == torch.device("cuda", 1)
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm", "attention", "ffn", "decode_attention",
                                  "linear_cross_entropy"])
def test_the_reference_takes_each_kernels_arguments(name):
    """kernels.reference's version of each kernel takes its arguments, in order and with
    the same defaults, less the kernels' own seed= and recompute_pre= (as the README says):
    code moves between the two by changing the import."""
    ours = inspect.signature(getattr(kernels, name)).parameters.values()
    theirs = inspect.signature(getattr(reference, name)).parameters.values()
    assert [(p.name, p.default) for p in ours if p.name not in ("seed", "recompute_pre")] == [
        (p.name, p.default) for p in theirs]
