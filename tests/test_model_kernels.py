"""The model on the Triton kernels trains like the model on the torch reference.

On CPU the kernels run in the Triton interpreter, so the model is tiny; on a GPU
the `gpu` test repeats it at a real size in bf16.
"""
from collections import Counter

import pytest
import torch

import kernels
from gpt import GPT, GPTConfig


def _counted(fn, name, calls):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def train_losses(
    kernels: str, device: str, dtype=torch.float32, steps: int = 3, adam: bool = False, **cfg
) -> tuple[list[float], GPT]:
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32), **cfg, "kernels": kernels})
    model = GPT(config).to(device)
    # SGD, not Adam: Adam's normalisation would blow the rounding noise in gradients that
    # are zero in exact arithmetic (the key bias) up to full-size steps.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if adam else torch.optim.SGD(model.parameters(), lr=0.5)
    # One fixed batch, memorised step by step, so that the loss must fall.
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (2, config.block_size), generator=gen).to(device)
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, x.roll(-1, dims=1), return_logits=False)  # as train.py
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("cfg", [{}, {"bias": False}, {"n_embd": 64, "n_head": 4}], ids=["base", "no-bias", "wider"])
def test_triton_path_matches_reference_path(device, cfg, monkeypatch):
    calls = Counter()
    for op in ("add_layer_norm", "layer_norm", "attention", "ffn", "linear_cross_entropy"):
        monkeypatch.setattr(kernels, op, _counted(getattr(kernels, op), op, calls))
    ref, ref_model = train_losses("torch", device, **cfg)
    assert not calls
    tri, tri_model = train_losses("triton", device, **cfg)
    assert {"add_layer_norm", "attention", "ffn", "linear_cross_entropy"} <= set(calls), calls
    assert ref[-1] < ref[0]
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(ref_model.named_parameters(), tri_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("min_width, expected", [
    (64, set()), (32, {"add_layer_norm", "layer_norm", "attention", "linear_cross_entropy"})])
def test_auto_runs_narrow_models_on_torch(min_width, expected, monkeypatch, device):
    """kernels="auto" on a GPU (on CPU the interpreted Triton module stands in): a model
    narrower than AUTO_MIN_WIDTH trains on the reference, a wide enough one on the Triton
    LayerNorm, attention and fused loss; the FFN stays on cuBLAS while AUTO_TRITON_FFN is off."""
    from gpt import ops

    calls = Counter()
    for op in ("add_layer_norm", "layer_norm", "attention", "ffn", "linear_cross_entropy"):
        monkeypatch.setattr(kernels, op, _counted(getattr(kernels, op), op, calls))
    monkeypatch.setattr(ops, "backend", lambda x, mode="auto": kernels if mode != "torch" else ops.reference)
    monkeypatch.setattr(ops, "AUTO_MIN_WIDTH", min_width)
    monkeypatch.setattr(ops, "AUTO_TRITON_FFN", False)
    auto, _ = train_losses("auto", device, steps=1)
    assert set(calls) == expected, calls
    ref, _ = train_losses("torch", device, steps=1)
    torch.testing.assert_close(auto, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_triton_path_matches_reference_path_bf16_gpt2_width():
    """20 AdamW steps on real text (a stdlib module's source, as bytes), bf16 autocast:
    the loss curves of the two paths agree to within bf16 noise."""
    import argparse
    import inspect

    data = torch.tensor(list(inspect.getsource(argparse).encode()), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - 257, (20, 8), generator=gen)
    batches = [torch.stack([data[s : s + 257] for s in row]).cuda() for row in starts]
    cfg = GPTConfig(vocab_size=256, block_size=256, n_layer=4, n_head=12, n_embd=768)
    curves = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        model = GPT(cfg.updated(kernels=kernels)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for b in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(b[:, :-1], b[:, 1:], return_logits=False)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[kernels] = losses
    ref, tri = curves["torch"], curves["triton"]
    assert ref[-1] < ref[0] - 0.5, ref
    assert max(abs(a - b) for a, b in zip(ref, tri)) < 0.05, (ref, tri)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_takes_the_kernels_into_one_graph(device, backend):
    """torch.compile of a model on the Triton kernels: one graph (fullgraph: the kernels are
    custom ops, no break around them), and the loss and gradients of the eager reference."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    ref = GPT(cfg.updated(kernels="torch")).to(device)
    tri = GPT(cfg.updated(kernels="triton")).to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.randint(0, 64, (2, 16), device=device)
    ref_loss = ref(x, x.roll(-1, dims=1))[1]
    ref_loss.backward()
    tri_loss = torch.compile(tri, fullgraph=True, backend=backend)(x, x.roll(-1, dims=1), return_logits=False)[1]
    tri_loss.backward()
    torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_torch_compile_draws_the_dropout_of_eager(device):
    """Under torch.compile the attention's dropout seed comes from the generator eager draws
    from: one torch.manual_seed, the same masks, the same loss and gradients, step after step."""
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.3, kernels="triton")
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    x = torch.randint(0, 64, (2, 16), device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        results = []
        for fwd in (model, compiled):
            torch.manual_seed(step)
            model.zero_grad()
            loss = fwd(x, x.roll(-1, dims=1))[1]
            loss.backward()
            results.append((loss, [p.grad.clone() for p in model.parameters()]))
        (eager_loss, eager_grads), (loss, grads) = results
        assert loss == eager_loss
        assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads))


def test_dropout_reaches_the_triton_attention(device, monkeypatch):
    """config.dropout drops attention probabilities on the Triton path too (training only)."""
    seen, attention = [], kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **kw: seen.append(kw.get("dropout_p")) or attention(*a, **kw))
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.25, kernels="triton"))
    model = model.to(device)
    idx = torch.randint(0, 50, (2, 16), device=device)
    model.train()(idx, idx)[1].backward()
    model.eval()(idx, idx)
    assert seen == [0.25, 0.0]
