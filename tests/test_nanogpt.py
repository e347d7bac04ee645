"""nanoGPT checkpoints (ckpt.pt as its train.py writes it) sample, fine-tune and are refused by --resume.

The checkpoints here are built the way nanoGPT's train.py saves them: the compiled model's
state dict (keys prefixed "_orig_mod.", the causal-mask buffers where flash attention is
missing), model_args, iter_num, best_val_loss as a tensor, the run's config dict; and, for a
char-level dataset, data/<dataset>/meta.pkl beside the out dir, as its prepare.py writes it.
"""
import pickle

import pytest
import torch

import sample
import train
from gpt import GPT, GPTConfig, checkpoint
from gpt.hf import load_any

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40


def save_nanogpt(folder, model: GPT, dataset: str, compiled: bool = True) -> None:
    c = model.config
    weights = {("_orig_mod." if compiled else "") + k: v for k, v in model.state_dict().items()}
    for i in range(c.n_layer):  # nanoGPT's mask buffer, when torch lacks flash attention
        weights[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(c.block_size, c.block_size)).view(
            1, 1, c.block_size, c.block_size)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({
        "model": weights,
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "model_args": dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                           bias=c.bias, vocab_size=c.vocab_size, dropout=0.0),
        "iter_num": 100,
        "best_val_loss": torch.tensor(1.5),
        "config": {"dataset": dataset, "batch_size": 12, "learning_rate": 1e-3, "compile": compiled},
    }, folder / "ckpt.pt")


@pytest.fixture
def char_run(tmp_path):
    """tmp/out-shakespeare-char/ckpt.pt and tmp/data/shakespeare_char/meta.pkl, a nanoGPT checkout's layout."""
    chars = sorted(set(TEXT))
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    meta.parent.mkdir(parents=True)
    meta.write_bytes(pickle.dumps({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                                   "stoi": {ch: i for i, ch in enumerate(chars)}}))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False,
                          kernels="torch")).eval()
    save_nanogpt(tmp_path / "out-shakespeare-char", model, "shakespeare_char")
    return tmp_path / "out-shakespeare-char", model, chars


def test_a_char_level_checkpoint_loads_with_its_meta_pkl(char_run):
    out, model, chars = char_run
    loaded, tokenizer = load_any(out, kernels="torch")
    assert loaded.config.bias is False and loaded.config.vocab_size == len(chars)
    ids = tokenizer.encode("Before we proceed")
    assert ids == [chars.index(ch) for ch in "Before we proceed"]  # nanoGPT's stoi
    x = torch.tensor([ids])
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_sample_py_and_init_from_take_a_nanogpt_out_dir(char_run, tmp_path, capsys):
    out, _, _ = char_run
    assert sample.main(["--checkpoint", str(out), "--prompt", "First", "--max-new-tokens", "8", "--device", "cpu",
                        "--num-samples", "1"]) == 0
    assert capsys.readouterr().out.count("First") >= 1
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    result = train.train(train.parse_args([
        "--init-from", str(out / "ckpt.pt"), "--data", str(corpus), "--out-dir", str(tmp_path / "tuned"),
        "--cache-dir", str(tmp_path / "cache"), "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1",
        "--batch-size", "2", "--device", "cpu", "--kernels", "torch"]))
    assert result["step"] == 2


def test_resume_of_a_nanogpt_checkpoint_names_init_from(char_run):
    out, _, _ = char_run
    with pytest.raises(checkpoint.CheckpointError, match="is a nanoGPT checkpoint, which --resume cannot continue.*--init-from"):
        checkpoint.load(out)


def test_a_gpt2_vocabulary_checkpoint_reads_without_its_padding(tmp_path):
    """nanoGPT pads GPT-2's 50257 tokens to 50304 rows and keeps no meta.pkl for BPE datasets:
    the model is read with the GPT-2 tokenizer, without the rows no token reaches."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=50304, block_size=16, n_layer=1, n_head=1, n_embd=16, kernels="torch")).eval()
    save_nanogpt(tmp_path / "out", model, "openwebtext", compiled=False)
    loaded, tokenizer = load_any(tmp_path / "out", kernels="torch")
    assert tokenizer.name == "gpt2" and loaded.config.vocab_size == 50257
    x = torch.tensor([tokenizer.encode("Hello world")])
    torch.testing.assert_close(loaded(x)[0], model(x)[0][..., :50257], rtol=0, atol=0)


def test_a_small_vocabulary_without_meta_pkl_says_where_it_looked(char_run):
    out, _, _ = char_run
    (out.parent / "data" / "shakespeare_char" / "meta.pkl").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"nanoGPT model of \d+ tokens.*meta.pkl is not at .*copy"):
        load_any(out)


def test_a_meta_pkl_that_would_run_code_is_refused(char_run):
    """meta.pkl is a pickle: one naming a callable (os.system here) must not be called."""
    out, _, _ = char_run

    class Exploit:
        def __reduce__(self):
            import os

            return os.system, ("echo pwned",)

    (out / "meta.pkl").write_bytes(pickle.dumps({"itos": Exploit()}))
    with pytest.raises(checkpoint.CheckpointError, match="is not a nanoGPT meta.pkl .*not plain data"):
        load_any(out)


def test_a_checkpoint_without_biases_exports_to_transformers(tmp_path):
    """nanoGPT trains with bias=False by default: GPT-2's format holds such a model with zero biases."""
    transformers = pytest.importorskip("transformers")
    from gpt.export import main as export_main

    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=50304, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=False,
                          kernels="torch")).eval()
    save_nanogpt(tmp_path / "out", model, "openwebtext")
    assert export_main([str(tmp_path / "out"), str(tmp_path / "hf")]) == 0
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x)[..., :50257], rtol=1e-5, atol=1e-5)


def test_a_meta_pkl_in_any_character_order_loads(char_run):
    """A dataset's own prepare.py may number its characters in any order: the ids are meta.pkl's."""
    out, model, chars = char_run
    order = chars[3:] + chars[:3]  # not its own inverse, as a reversal would be
    (out / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(order), "itos": dict(enumerate(order))}))
    loaded, tokenizer = load_any(out, kernels="torch")
    text = "Before we proceed"
    theirs = model(torch.tensor([[order.index(ch) for ch in text]]))[0]
    ours = loaded(torch.tensor([tokenizer.encode(text)]))[0]
    torch.testing.assert_close(ours, theirs[:, [order.index(ch) for ch in tokenizer.chars]], rtol=0, atol=0)


def test_a_meta_pkl_of_another_vocabulary_names_both_sizes(char_run):
    out, _, chars = char_run
    (out / "meta.pkl").write_bytes(pickle.dumps({"itos": dict(enumerate(chars[:-1]))}))
    with pytest.raises(checkpoint.CheckpointError, match=rf"holds {len(chars) - 1} characters but .* vocabulary of "
                                                         rf"{len(chars)}: it is another dataset's"):
        load_any(out)


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module."], ids=["ddp-of-compiled", "compiled-ddp"])
def test_weights_saved_from_a_ddp_wrapper_load(char_run, prefix):
    """DDP's "module." outside torch.compile's "_orig_mod." or inside it (a mutation audit:
    stripping it only outside went unseen)."""
    out, model, _ = char_run
    state = torch.load(out / "ckpt.pt", weights_only=True)
    state["model"] = {prefix + k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    torch.save(state, out / "ckpt.pt")
    loaded, tokenizer = load_any(out, kernels="torch")
    x = torch.tensor([tokenizer.encode("First")])
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_the_dropout_of_model_args_comes_with_the_weights(char_run):
    """nanoGPT's shakespeare-char trains with dropout 0.2: --init-from keeps it unless --dropout
    says otherwise; the model loads in eval mode all the same, so sampling runs without it."""
    out, _, _ = char_run
    state = torch.load(out / "ckpt.pt", weights_only=True)
    state["model_args"]["dropout"] = 0.2
    torch.save(state, out / "ckpt.pt")
    loaded = load_any(out, kernels="torch")[0]
    assert loaded.config.dropout == 0.2 and not loaded.training


def test_load_model_puts_a_nanogpt_model_on_the_device_asked_for(char_run):
    """As it does our own checkpoints' (the meta device stands in for a GPU)."""
    out, _, _ = char_run
    model, _, _ = checkpoint.load_model(out, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"} and not model.training


def test_a_meta_pkl_under_the_current_folder_is_found(char_run, tmp_path, monkeypatch):
    """Sampling from inside a nanoGPT checkout a checkpoint kept elsewhere: data/<dataset>/meta.pkl
    is looked for under the current folder too."""
    out, _, chars = char_run
    moved = tmp_path / "elsewhere" / "runs" / "ckpt.pt"
    moved.parent.mkdir(parents=True)
    (out / "ckpt.pt").rename(moved)
    monkeypatch.chdir(tmp_path)
    _, tokenizer = load_any(moved, kernels="torch")
    assert tokenizer.name == "char" and tokenizer.vocab_size == len(chars)


@pytest.mark.parametrize("change", ["duplicate", "word"])
def test_a_meta_pkl_of_other_than_distinct_characters_is_refused(char_run, change):
    """A BPE dataset's tokens, or one character twice: no char vocabulary of the model's size."""
    out, _, chars = char_run
    itos = dict(enumerate(chars))
    itos[1] = itos[2] if change == "duplicate" else "the"
    (out / "meta.pkl").write_bytes(pickle.dumps({"itos": itos}))
    with pytest.raises(checkpoint.CheckpointError, match="does not map ids to distinct single characters"):
        load_any(out)


def test_an_older_checkpoint_of_gpt2s_vocabulary_loads(tmp_path):
    """nanoGPT's model_args named no bias before bias=False came in (its models had biases), and
    one fine-tuned from GPT-2 (init_from='gpt2') keeps GPT-2's 50257 tokens, no padding (a
    mutation audit: a missing bias read as False, and 50257 tokens refused as fewer than
    GPT-2's, went unseen)."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=1, n_embd=16, kernels="torch")).eval()
    save_nanogpt(tmp_path / "out", model, "openwebtext", compiled=False)
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    del state["model_args"]["bias"]
    torch.save(state, tmp_path / "out" / "ckpt.pt")
    loaded, tokenizer = load_any(tmp_path / "out", kernels="torch")
    assert tokenizer.name == "gpt2" and loaded.config.bias is True
    x = torch.tensor([tokenizer.encode("Hello world")])
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    ({"n_layer": None}, "its model_args cannot be read .*n_layer"),  # None: the key deleted
    ({"n_head": 3}, "its model_args cannot be read .*divisible"),
    ({"n_layer": 3}, "the weights do not match its model_args .*Missing key"),
], ids=["missing-key", "bad-heads", "other-depth"])
def test_model_args_that_do_not_fit_are_one_line_errors(char_run, change, message):
    """A hand-edited or damaged ckpt.pt: a CheckpointError naming the file, not a KeyError or
    load_state_dict's traceback (a mutation audit: letting either through went unseen)."""
    out, _, _ = char_run
    state = torch.load(out / "ckpt.pt", weights_only=True)
    for key, value in change.items():
        if value is None:
            del state["model_args"][key]
        else:
            state["model_args"][key] = value
    torch.save(state, out / "ckpt.pt")
    with pytest.raises(checkpoint.CheckpointError, match=f"ckpt.pt: {message}"):
        load_any(out)


def test_a_meta_pkl_beside_a_checkpoint_without_its_run_config_is_found(char_run):
    """A ckpt.pt whose run config (and with it the dataset's name) was dropped, say to make it
    smaller: the meta.pkl beside it is still read (a mutation audit: looking beside the
    checkpoint only when the dataset is named went unseen)."""
    out, _, chars = char_run
    (out / "meta.pkl").write_bytes((out.parent / "data" / "shakespeare_char" / "meta.pkl").read_bytes())
    state = torch.load(out / "ckpt.pt", weights_only=True)
    del state["config"]
    torch.save(state, out / "ckpt.pt")
    _, tokenizer = load_any(out, kernels="torch")
    assert tokenizer.name == "char" and tokenizer.vocab_size == len(chars)


@pytest.mark.parametrize("content", [b"", pickle.dumps({"vocab_size": 65})], ids=["empty", "no-itos"])
def test_a_damaged_meta_pkl_is_a_one_line_error(char_run, content):
    """An interrupted copy (empty) or a meta.pkl of another kind: a CheckpointError naming the
    file, not an EOFError or KeyError (a mutation audit: catching only OSError and pickle's
    own error went unseen)."""
    out, _, _ = char_run
    (out / "meta.pkl").write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match="meta.pkl is not a nanoGPT meta.pkl of characters"):
        load_any(out)
