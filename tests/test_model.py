import math

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig, preset
from gpt.model import KVCache, LayerNorm, SinusoidalPositions


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, kernels="torch"), **kw})


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
def test_shapes_and_loss(pos_embedding):
    torch.manual_seed(0)
    model = GPT(tiny(pos_embedding=pos_embedding))
    idx = torch.randint(0, 50, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 50)
    logits2, loss = model(idx, torch.randint(0, 50, (3, 17)))
    assert torch.equal(logits, logits2)
    # At init the loss is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(50)) < 0.3


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
def test_causal_masking(pos_embedding):
    """Changing a future token leaves every earlier position's logits unchanged."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_embedding=pos_embedding)).eval()
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 50
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_positions_matter():
    """Both position embeddings make the model order-aware."""
    for pos in ("learned", "sinusoidal"):
        torch.manual_seed(0)
        model = GPT(tiny(pos_embedding=pos)).eval()
        idx = torch.full((1, 8), 7)
        logits = model(idx)
        assert not torch.allclose(logits[0, 0], logits[0, -1])


def test_sequence_longer_than_block_size():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="sequence length 33 exceeds the model's block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tied_head_and_gpt2_init():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=4, n_embd=64, vocab_size=2000))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * 4)
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - scaled) < 0.001
    assert torch.equal(model.transformer.h[0].ln_1.weight, torch.ones(64))


def test_gpt2_init_of_every_block_and_embedding():
    """Every block's four weights at GPT-2's std (0.02; both residual projections, attention's
    and the MLP's, over sqrt(2 * n_layer)), every bias zero, both embeddings at 0.02 (a mutation
    audit: scaling only the MLP's c_proj, and leaving nn.Linear's uniform biases, went unseen:
    only block 0's c_attn and mlp.c_proj were checked)."""
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=4, n_embd=64, vocab_size=2000))
    scaled = 0.02 / math.sqrt(2 * 4)
    for block in model.transformer.h:
        for linear, std in ((block.attn.c_attn, 0.02), (block.mlp.c_fc, 0.02), (block.attn.c_proj, scaled),
                            (block.mlp.c_proj, scaled)):
            assert abs(linear.weight.std().item() - std) < 0.1 * std
            assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    for embedding in (model.transformer.wte, model.transformer.wpe):
        assert abs(embedding.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
def test_num_params_and_flops_per_token(pos_embedding):
    """num_params() leaves out the learned position table only (a sinusoidal one has no
    parameters), num_params(False) counts all; flops_per_token is PaLM's 6N + 12 L C T at the
    sequence length given, block_size by default (train.py's MFU). A mutation audit: counting
    the table either way passed the 124M preset check (the table is 0.8M), num_params() failed
    on a sinusoidal model, and flops_per_token's seq_len and attention term went unseen."""
    model = GPT(tiny(pos_embedding=pos_embedding))
    total = sum(p.numel() for p in model.parameters())
    n = total - (32 * 32 if pos_embedding == "learned" else 0)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == n
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 32
    assert model.flops_per_token(8) == 6 * n + 12 * 2 * 32 * 8


def test_every_layer_norm_takes_the_configs_eps():
    """config.layer_norm_eps (a Hugging Face checkpoint's layer_norm_epsilon) reaches each
    LayerNorm, the final one included (a mutation audit: a fixed 1e-5 went unseen by this
    file and the model's others, seen only by test_hf, which needs transformers)."""
    torch.manual_seed(0)
    model = GPT(tiny(layer_norm_eps=0.25))
    x = torch.randn(2, 3, 32) * 0.3
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert len(norms) == 5  # two a block and ln_f
    for m in norms:
        torch.testing.assert_close(m(x)[1], F.layer_norm(x, (32,), m.weight, m.bias, 0.25))


def test_dropout_applies_to_the_embeddings_and_each_sublayers_output():
    """As nanoGPT: config.dropout drops the embeddings' sum and each attention and MLP output
    in training, and none of them in eval (a mutation audit: dropping any of the three went
    unseen: only the attention probabilities' dropout was checked)."""
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.5))
    zeros = {}
    for name in ("drop", "h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp"):
        model.transformer.get_submodule(name).register_forward_hook(
            lambda m, args, out, _n=name: zeros.__setitem__(_n, (out == 0).float().mean().item()))
    idx = torch.randint(0, 50, (4, 32))
    model.train()(idx)
    assert len(zeros) == 5 and all(0.4 < z < 0.6 for z in zeros.values()), zeros
    zeros.clear()
    model.eval()(idx)
    assert len(zeros) == 5 and all(z == 0 for z in zeros.values()), zeros


def test_the_embedding_dropout_drops_the_sum_of_token_and_position_embeddings():
    """As nanoGPT: in training the first block's input is dropout(wte + wpe), about half of it
    zero at dropout 0.5 (a mutation audit: dropout(wte) + wpe, the positions never dropped, went
    unseen: the hook on transformer.drop saw its output's zeros, not what the blocks get)."""
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.5)).train()
    seen = []
    model.transformer.h[0].ln_1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(torch.randint(0, 50, (4, 32)))
    assert 0.4 < (seen[0] == 0).float().mean().item() < 0.6


def test_no_bias():
    model = GPT(tiny(bias=False))
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())
    model(torch.zeros(1, 4, dtype=torch.long))


def test_presets():
    assert preset("gpt2").n_embd == 768 and preset("gpt2-xl").n_layer == 48
    c = preset("shakespeare-char")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (6, 6, 384, 256)
    model = GPT(preset("gpt2").updated(kernels="torch"))
    assert abs(model.num_params() / 1e6 - 124.0) < 1.0  # GPT-2 small, position embeddings excluded
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; choose one of gpt2, gpt2-medium, "):
        preset("gpt5")


def test_presets_are_the_published_architectures():
    """--preset gpt2-medium/large/xl are GPT-2's own shapes (a mutation audit: a preset's n_layer,
    n_head or n_embd, GPT-2's 50257-token vocabulary or 1024 positions, biases and
    shakespeare-char's dropout of 0.2 could all change unseen: only gpt2's width and gpt2-xl's
    depth were checked, and the 124M count to within a million)."""
    shape = lambda name: (lambda c: (c.n_layer, c.n_head, c.n_embd, c.block_size, c.dropout, c.bias))(preset(name))
    assert shape("gpt2-medium") == (24, 16, 1024, 1024, 0.0, True)
    assert shape("gpt2-large") == (36, 20, 1280, 1024, 0.0, True)
    assert shape("gpt2-xl") == (48, 25, 1600, 1024, 0.0, True)
    assert shape("shakespeare-char") == (6, 6, 384, 256, 0.2, True)  # nanoGPT's train_shakespeare_char
    assert shape("tiny") == (4, 4, 128, 128, 0.0, True)  # what `make demo` is sized for
    model = GPT(preset("gpt2").updated(kernels="torch"))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # Hugging Face's count for gpt2
    assert (GPTConfig().kernels, GPTConfig().pos_embedding, GPTConfig().layer_norm_eps) == ("auto", "learned", 1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        # Each size is checked, not only n_layer's (a mutation audit: vocab_size, block_size or
        # n_embd of 0 built a model, and n_head=0 raised ZeroDivisionError, a traceback in train.py).
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(block_size=0), "block_size must be a positive integer"),
        (dict(n_head=0), "n_head must be a positive integer"),
        (dict(n_embd=-32), "n_embd must be a positive integer"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),  # as a typo of --dropout 0.1
        (dict(n_head=2.0), r"n_head must be a positive integer, got 2\.0"),  # a hand-edited config.json
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(pos_embedding="rope"), "pos_embedding"),
        (dict(kernels="cuda"), "kernels must be"),
    ],
)
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)


def test_loss_falls_on_a_tiny_corpus():
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog. " * 40
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    model = GPT(tiny(vocab_size=len(vocab)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, len(data) - 33, (8,))
        x = torch.stack([data[s : s + 32] for s in starts])
        y = torch.stack([data[s + 1 : s + 33] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_logits_at_chosen_positions():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 40, (3, 10))
    at = torch.tensor([9, 0, 4])
    full = model(idx)
    torch.testing.assert_close(model(idx, at=at)[:, 0], full[torch.arange(3), at])


def gpt2_reference(model, idx):
    """GPT-2's forward written out in float64 from the model's weights, nothing shared with
    gpt.model or gpt.ops: positions 0..T-1, pre-LN blocks, softmax(q k^T / sqrt(D)) under a
    causal mask, a tanh-GELU MLP, the final LayerNorm, and the token embedding as the head."""
    c, (B, T) = model.config, idx.shape
    H, D = c.n_head, c.n_embd // c.n_head
    p = {n: t.detach().double() for n, t in model.named_parameters()}
    lin = lambda x, name: x @ p[name + ".weight"].T + p.get(name + ".bias", 0)
    ln = lambda x, name: F.layer_norm(x, (c.n_embd,), p[name + ".weight"], p.get(name + ".bias"), c.layer_norm_eps)
    if c.pos_embedding == "learned":
        wpe = p["transformer.wpe.weight"][:T]
    else:
        wpe = torch.tensor([[math.sin(t / 10000 ** (j / c.n_embd)) if j % 2 == 0 else math.cos(t / 10000 ** ((j - 1) / c.n_embd))
                             for j in range(c.n_embd)] for t in range(T)], dtype=torch.float64)
    x = p["transformer.wte.weight"][idx] + wpe
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for i in range(c.n_layer):
        h = f"transformer.h.{i}."
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in lin(ln(x, h + "ln_1"), h + "attn.c_attn").split(c.n_embd, -1))
        att = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(future, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, c.n_embd), h + "attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, h + "ln_2"), h + "mlp.c_fc"), approximate="tanh"), h + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ p["transformer.wte.weight"].T


@pytest.mark.parametrize("pos_embedding, bias", [("learned", True), ("sinusoidal", True), ("learned", False)])
def test_forward_is_gpt2_written_out_in_float64(pos_embedding, bias):
    """The model in float64 gives GPT-2's logits, computed by hand from its weights (all drawn at
    std 0.3, so that biases, LayerNorm gains and a sharp attention all count), at every position
    of the block and through `at=`. A mutation audit: positions counted from 1, the final
    LayerNorm dropped and q scaled twice were seen only by test_hf, which needs transformers;
    the sinusoidal table read one row short at the block's last position went unseen."""
    torch.manual_seed(0)
    model = GPT(tiny(pos_embedding=pos_embedding, bias=bias, n_layer=2, n_head=4, block_size=16)).double().eval()
    with torch.no_grad():
        for t in model.parameters():
            t.normal_(0, 0.3)
    idx = torch.randint(0, 50, (2, 16))
    expected = gpt2_reference(model, idx)
    tol = 1e-9 if pos_embedding == "learned" else 1e-6  # the sinusoidal table is built in fp32
    torch.testing.assert_close(model(idx), expected, rtol=tol, atol=tol)
    at = torch.tensor([15, 3])
    torch.testing.assert_close(model(idx, at=at)[:, 0], expected[torch.arange(2), at], rtol=tol, atol=tol)


def test_sinusoidal_table_is_vaswanis():
    n_embd, T = 10, 7
    table = SinusoidalPositions(T, n_embd).table
    for p in range(T):
        for i in range(n_embd // 2):
            angle = p / 10000 ** (2 * i / n_embd)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_take_an_odd_width():
    """n_embd 9 over 3 heads: five sin columns, four cos (a mutation audit: not trimming the
    cos half to n_embd // 2 columns, a shape error at any odd width, went unseen)."""
    table = SinusoidalPositions(4, 9).table
    assert table.shape == (4, 9)
    assert table[3, 8].item() == pytest.approx(math.sin(3 / 10000 ** (8 / 9)), abs=1e-6)
    assert table[3, 7].item() == pytest.approx(math.cos(3 / 10000 ** (6 / 9)), abs=1e-6)
    GPT(tiny(n_embd=9, n_head=3, pos_embedding="sinusoidal"))(torch.zeros(1, 4, dtype=torch.long))


def test_the_sinusoidal_table_is_not_in_the_state_dict():
    """The sinusoidal table is rebuilt from the config, not saved: a sinusoidal model's
    state_dict is its parameters, so its checkpoints load strictly into this and earlier
    versions and carry no block_size x n_embd copy (a mutation audit: the table registered as
    a persistent buffer went unseen; a checkpoint then fails load_state_dict without it)."""
    model = GPT(tiny(pos_embedding="sinusoidal"))
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters(remove_duplicate=False)]


def test_targets_of_minus_one_are_left_out_of_the_loss():
    """The loss is the mean over targets other than -1 (padding, a prompt's tokens), not an
    index error (a mutation audit: cross_entropy's default ignore_index, -100, went unseen)."""
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx, targets = torch.randint(0, 50, (2, 2, 8))
    logits, _ = model(idx, targets)
    masked = targets.clone()
    masked[:, 5:] = -1
    expected = F.cross_entropy(logits[:, :5].reshape(-1, 50), targets[:, :5].reshape(-1))
    torch.testing.assert_close(model(idx, masked)[1], expected)


def test_the_loss_of_a_half_precision_model_is_fp32():
    """A model cast to bf16 gives bf16 logits and a loss computed in fp32 (a mutation audit:
    the cross-entropy taken in the logits' dtype went unseen)."""
    torch.manual_seed(0)
    model = GPT(tiny()).to(torch.bfloat16)
    idx = torch.randint(0, 50, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float().view(-1, 50), idx.view(-1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loss_without_logits_is_the_loss_with_them(dtype):
    """return_logits=False (train.py's call) gives no logits and, on the torch path, the very
    loss and gradients of the default call: -1 targets left out, fp32 from a bf16 model."""
    torch.manual_seed(0)
    model = GPT(tiny()).to(dtype)
    idx, targets = torch.randint(0, 50, (2, 2, 8))
    targets[0, :3] = -1
    results = []
    for return_logits in (True, False):
        logits, loss = model(idx, targets, return_logits=return_logits)
        assert (logits is None) != return_logits and loss.dtype == torch.float32
        results.append((loss, *torch.autograd.grad(loss, list(model.parameters()))))
    for without, with_ in zip(*results[::-1]):
        torch.testing.assert_close(without, with_, rtol=0, atol=0)


def test_a_decode_step_updates_only_the_tensors_the_cache_lists():
    """KVCache.tensors() is every tensor a decode step writes (gpt.generate marks them as fixed
    addresses for compiled steps): a step changes some of the cache's tensors and none outside
    that list (a mutation audit: leaving out step_lengths went unseen)."""
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 3)), cache=cache)
        cache.lengths.fill_(3)
        every = [t for t in vars(cache).values() if isinstance(t, torch.Tensor)] + cache.k + cache.v
        before = [t.clone() for t in every]
        model(torch.randint(0, 50, (2, 1)), cache=cache)
    changed = [t for t, b in zip(every, before) if not torch.equal(t, b)]
    assert changed and all(any(t is u for u in cache.tensors()) for t in changed)


@pytest.mark.parametrize("kernels_mode", ["torch", "triton"])
@pytest.mark.triton
def test_a_cache_decodes_on_the_models_kernels(kernels_mode, monkeypatch):
    """A KVCache takes the model's kernels: its decode steps run where the rest of the model
    runs, here with "auto" dispatching as on CUDA (a mutation audit: a cache on "auto" whatever
    the config went unseen: on a GPU a kernels="torch" model decoded on the Triton kernel)."""
    import kernels
    from gpt import ops

    monkeypatch.setattr(ops, "backend", lambda x, mode="auto": ops.reference if mode == "torch" else kernels)
    calls = []
    decode = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a, **k: calls.append(1) or decode(*a, **k))
    torch.manual_seed(0)
    model = GPT(tiny(kernels=kernels_mode)).eval()
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    idx = torch.randint(0, 50, (1, 4))
    with torch.no_grad():
        model(idx[:, :3], cache=cache)
        cache.lengths.fill_(3)
        model(idx[:, 3:], cache=cache)
    assert len(calls) == (2 if kernels_mode == "triton" else 0)  # one a layer


def test_dropout_also_drops_attention_probabilities(monkeypatch):
    """As nanoGPT and GPT-2: config.dropout applies to the attention probabilities too,
    in training only; and it changes the attention output, on either backend."""
    from gpt import ops

    seen = []
    attention = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **kw: seen.append(kw.get("dropout_p")) or attention(*a, **kw))
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.25, kernels="torch"))
    idx = torch.randint(0, 50, (2, 16))
    model.train()(idx, idx)
    model.eval()(idx, idx)
    assert seen == [0.25, 0.25, 0.0, 0.0]
    q = k = v = torch.randn(1, 2, 8, 16)
    torch.manual_seed(0)
    assert not torch.equal(ops.attention(q, k, v, mode="torch", dropout_p=0.5), ops.attention(q, k, v, mode="torch"))


def test_a_config_from_another_version_drops_the_keys_it_does_not_know():
    """A checkpoint's config written by a version with more options still loads here."""
    saved = {**tiny().to_dict(), "rotary_base": 10000}
    assert GPTConfig.from_dict(saved) == tiny()


def test_a_config_missing_keys_takes_their_defaults():
    """A checkpoint's config from a version with fewer options loads with the defaults of the ones added since."""
    saved = tiny(kernels="auto").to_dict()
    del saved["layer_norm_eps"], saved["kernels"]
    assert GPTConfig.from_dict(saved) == tiny(kernels="auto")


def test_a_config_round_trips_through_its_dict():
    """A checkpoint keeps config.to_dict(): a model without biases, with sinusoidal positions or
    another LayerNorm eps loads back as itself, not as the defaults' architecture."""
    config = tiny(bias=False, pos_embedding="sinusoidal", dropout=0.1, layer_norm_eps=1e-6)
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert config.head_dim == 16 and isinstance(config.head_dim, int)  # a KV cache's shape


def test_updated_applies_false_and_zero_and_keeps_what_is_none():
    """train.py passes every model flag to updated(), None for one not given: --dropout 0 and
    --no-bias (bias=False) still apply over a preset with dropout or biases (a mutation audit:
    dropping falsy values instead of None went unseen), and the result is a new, checked config."""
    base = preset("shakespeare-char")
    new = base.updated(dropout=0.0, bias=False, n_layer=None, block_size=64)
    assert (new.dropout, new.bias, new.n_layer, new.block_size) == (0.0, False, 6, 64)
    assert (base.dropout, base.bias, base.block_size) == (0.2, True, 256)  # the preset is not changed
    with pytest.raises(ValueError, match="divisible by n_head"):
        base.updated(n_head=5)


def test_a_preset_is_a_copy():
    c = preset("tiny")
    c.n_layer = 1
    assert preset("tiny").n_layer == 4
