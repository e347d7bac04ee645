"""Hugging Face GPT-2 interop, fully offline: a small random GPT2LMHeadModel built here."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt import GPT, GPTConfig, checkpoint  # noqa: E402
from gpt.export import main as export_main  # noqa: E402
from gpt.generate import generate  # noqa: E402
from gpt.hf import HFError, config_from_hf, load_any, load_hf, save_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save_pretrained(model, folder, safe: bool, shards: int = 1, extra: dict | None = None) -> None:
    """model.save_pretrained, or for safe=False the pytorch_model.bin (and its index, for
    shards > 1) that transformers before 5.0 wrote: 5.x writes safetensors whatever
    safe_serialization says. `extra`: more entries for the .bin's state dict."""
    if safe:
        model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": "20KB"} if shards > 1 else {}))
        return
    model.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()} | (extra or {})
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map |= dict.fromkeys(part, name)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(params=[True, False], ids=["safetensors", "pytorch_model.bin"])
def hf_dir(request, hf_model, tmp_path):
    save_pretrained(hf_model, tmp_path / "hf", safe=request.param)
    assert (tmp_path / "hf" / ("model.safetensors" if request.param else "pytorch_model.bin")).is_file()
    return tmp_path / "hf"


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def test_from_hf_gives_the_same_logits(hf_model, hf_dir):
    ours = GPT.from_hf(hf_dir, kernels="torch").eval()
    idx = torch.randint(0, 100, (2, 40))
    torch.testing.assert_close(ours(idx), hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)
    assert ours.config.block_size == 64 and ours.lm_head.weight is ours.transformer.wte.weight


def test_save_hf_round_trips_into_transformers(hf_model, tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=2, n_embd=32, kernels="torch")).eval()
    ours.save_hf(tmp_path / "out")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 100, (2, 30))
    torch.testing.assert_close(hf_logits(theirs, idx), ours(idx), rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_transformers(hf_model, hf_dir):
    ours = load_hf(hf_dir, kernels="torch").eval()
    prompt = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert generate(ours, [prompt[0].tolist()], 20, temperature=0) == [theirs]


def test_fine_tuning_from_hf_lowers_the_loss(hf_dir):
    model = load_hf(hf_dir, kernels="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(20):
        _, loss = model(x, x.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
        ({"n_inner": 100}, "n_inner=100 is not supported"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"model_type": "llama"}, "only GPT-2"),
        ({"n_head": 3}, r"config.json: n_embd \(\d+\) must be divisible by n_head \(3\)"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=false is not supported"),
        ({"scale_attn_weights": False}, "scale_attn_weights=False is not supported"),
        ({"add_cross_attention": True}, "add_cross_attention=True is not supported"),
        ({"activation_function": "gelu"}, "activation_function='gelu' is not supported"),  # erf, not tanh
    ],
)
def test_unsupported_architectures_are_refused(hf_dir, change, message):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(HFError, match=message):
        load_hf(hf_dir)


@pytest.mark.parametrize("change", [{"activation_function": "gelu_pytorch_tanh"}, {"activation_function": "gelu_fast"},
                                    {"n_inner": 128}], ids=["gelu_pytorch_tanh", "gelu_fast", "n_inner"])
def test_other_spellings_of_gpt2s_config_are_read(hf_model, change):
    """The tanh GELU under each of its names, and the MLP width written out (4 * 32) rather
    than null (a mutation audit: refusing either went unseen, transformers writing neither)."""
    config = config_from_hf({**hf_model.config.to_dict(), **change})
    assert (config.n_embd, config.n_layer, config.block_size) == (32, 2, 64)


def test_a_config_without_optional_fields_reads_with_gpt2s_defaults():
    """GPT-2's defaults for what a hand-written config.json leaves out: 1024 positions (or
    n_ctx, the older name), epsilon 1e-5 (a mutation audit: another default epsilon, or n_ctx
    read before n_positions, went unseen, transformers writing every field)."""
    minimal = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 2}
    config = config_from_hf(minimal)
    assert (config.block_size, config.layer_norm_eps, config.dropout) == (1024, 1e-5, 0.0)
    assert config_from_hf({**minimal, "n_ctx": 128}).block_size == 128
    assert config_from_hf({**minimal, "n_ctx": 128, "n_positions": 64}).block_size == 64


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(HFError, match="no config.json"):
        load_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 10}))
    with pytest.raises(HFError, match="no model.safetensors or pytorch_model.bin"):
        load_hf(tmp_path)


def test_sinusoidal_model_cannot_be_saved_as_gpt2(tmp_path):
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=16, pos_embedding="sinusoidal"))
    with pytest.raises(HFError, match="learned position embeddings"):
        model.save_hf(tmp_path)


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_export_cli_round_trip(tmp_path, fmt):
    torch.manual_seed(2)
    cfg = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    model = GPT(cfg).eval()
    checkpoint.save({"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "gpt2"}}, tmp_path / "ckpt.pt")
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "exp"), "--format", fmt]) == 0
    loaded, tok = load_any(tmp_path / "exp", kernels="torch")
    idx = torch.randint(0, 50257, (1, 10))
    torch.testing.assert_close(loaded.eval()(idx), model(idx))
    assert tok.name == "gpt2"
    assert not list((tmp_path / "exp").glob("*.pt")) and not list((tmp_path / "exp").glob("*.bin"))


def test_a_char_model_is_not_exported_as_gpt2(tmp_path, capsys):
    """A Hugging Face GPT-2 directory is read with GPT-2's tokenizer: a char model's vocabulary would be lost."""
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    model = GPT(cfg)
    checkpoint.save({"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "byte"}}, tmp_path / "ckpt.pt")
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "exp")]) == 2
    assert "uses the byte tokenizer" in capsys.readouterr().err and not (tmp_path / "exp").exists()
    save_hf(model, tmp_path / "hf")  # one written by hand is refused on loading
    with pytest.raises(HFError, match="vocab_size=65, fewer than the GPT-2 tokenizer's 50257"):
        load_any(tmp_path / "hf")


def test_train_and_sample_from_a_hf_directory(tmp_path):
    """The README's fine-tuning recipe: train.py --init-from DIR, then sample.py from DIR and from the result."""
    import sample
    import train

    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).eval()
    theirs.save_pretrained(tmp_path / "hf")
    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ["--init-from", str(tmp_path / "hf"), "--data", str(corpus), "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--block-size", "32", "--batch-size", "4", "--max-steps", "15",
            "--eval-interval", "15", "--eval-iters", "2", "--lr", "3e-3", "--warmup", "2", "--device", "cpu", "--kernels", "torch"]
    result = train.train(train.parse_args(args))
    assert result["model"].config.block_size == 32 and result["val"] < 9.8  # from ln(50257) = 10.8 at random init
    assert sample.main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "The quick", "--max-new-tokens", "5", "--seed", "0", "--device", "cpu"]) == 0
    assert sample.main(["--checkpoint", str(tmp_path / "out"), "--prompt", "The quick", "--max-new-tokens", "5", "--seed", "0", "--device", "cpu"]) == 0


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_sharded_checkpoints_load(hf_model, tmp_path, safe):
    """save_pretrained shards past max_shard_size (5 GB by default: gpt2-xl in fp32)."""
    save_pretrained(hf_model, tmp_path / "hf", safe=safe, shards=5)
    assert len(list((tmp_path / "hf").glob("*.index.json"))) == 1
    ours = load_hf(tmp_path / "hf", kernels="torch").eval()
    idx = torch.randint(0, 100, (1, 20))
    torch.testing.assert_close(ours(idx), hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)
    next((tmp_path / "hf").glob("*model-00002-*")).unlink()
    with pytest.raises(HFError, match="missing the shard"):
        load_hf(tmp_path / "hf", kernels="torch")


def test_export_names_the_dropout_the_model_trains_with(tmp_path):
    GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=1, n_embd=16, dropout=0.2)).save_hf(tmp_path / "o")
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["attn_pdrop"] == config["resid_pdrop"] == config["embd_pdrop"] == 0.2  # as nanoGPT and GPT-2


def _small_checkpoint(path, tokenizer="byte"):
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    model = GPT(cfg).eval()
    checkpoint.save({"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": tokenizer}}, path)
    return model


def test_damaged_model_folders_are_one_line_errors(tmp_path):
    """What an interrupted copy or a hand edit leaves: each a plain HFError naming the file."""
    _small_checkpoint(tmp_path / "ckpt.pt")
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "exp"), "--format", "safetensors"]) == 0
    good = (tmp_path / "exp" / "model.safetensors").read_bytes()
    (tmp_path / "exp" / "model.safetensors").write_bytes(good[:1000])
    with pytest.raises(HFError, match="cannot read .*model.safetensors .*re-copy"):
        load_any(tmp_path / "exp")
    (tmp_path / "exp" / "model.safetensors").unlink()
    with pytest.raises(HFError, match="no model.safetensors"):
        load_any(tmp_path / "exp")
    (tmp_path / "exp" / "config.json").write_text("{bad json")
    with pytest.raises(HFError, match="cannot read .*config.json"):
        load_any(tmp_path / "exp")
    (tmp_path / "exp" / "config.json").write_bytes(b"\xff\xfe{}")  # not UTF-8
    with pytest.raises(HFError, match="cannot read .*config.json"):
        load_any(tmp_path / "exp")
    (tmp_path / "exp" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    with pytest.raises(HFError, match="lacks 'n_embd'"):
        load_any(tmp_path / "exp")


def test_checkpoints_from_another_version_are_one_line_errors(tmp_path):
    model = _small_checkpoint(tmp_path / "a.pt", tokenizer="bogus")
    with pytest.raises(checkpoint.CheckpointError, match="a.pt holds a config or tokenizer this version cannot read"):
        checkpoint.load(tmp_path / "a.pt")
    cfg = model.config.to_dict() | {"n_embd": 32}
    checkpoint.save({"model": model.state_dict(), "config": cfg, "tokenizer": {"name": "byte"}}, tmp_path / "b.pt")
    with pytest.raises(checkpoint.CheckpointError, match="b.pt: the weights do not match its config"):
        checkpoint.load_model(tmp_path / "b.pt")


def test_an_export_and_a_training_run_do_not_share_a_folder(tmp_path, capsys):
    """sample.py would not know which of the two models to read: export refuses a run's out
    dir, and a folder holding both is refused with the way out."""
    _small_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert export_main([str(tmp_path / "run"), str(tmp_path / "run"), "--format", "safetensors"]) == 2
    assert "holds a training run (ckpt.pt); export into a folder of its own" in capsys.readouterr().err
    assert export_main([str(tmp_path / "run"), str(tmp_path / "exp"), "--format", "safetensors"]) == 0
    (tmp_path / "exp" / "ckpt.pt").write_bytes((tmp_path / "run" / "ckpt.pt").read_bytes())
    with pytest.raises(HFError, match="holds both an exported model .* pass .*ckpt.pt"):
        load_any(tmp_path / "exp")


def test_export_converts_an_export_and_names_a_missing_config(tmp_path):
    torch.manual_seed(2)
    cfg = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    model = GPT(cfg).eval()
    checkpoint.save({"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "gpt2"}}, tmp_path / "ckpt.pt")
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "ours"), "--format", "safetensors"]) == 0
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0  # our export, converted to GPT-2's
    idx = torch.randint(0, 50257, (1, 10))
    torch.testing.assert_close(load_any(tmp_path / "hf", kernels="torch")[0](idx), model(idx))
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="holds model.safetensors but no config.json"):
        checkpoint.resolve(tmp_path / "hf")


def test_a_folder_of_pytorch_model_bin_without_its_config_names_the_config(tmp_path):
    """Hugging Face's older layout keeps the weights in pytorch_model.bin: without config.json
    beside it the error names what is missing, not a ckpt.pt the folder was never meant to hold."""
    (tmp_path / "hf").mkdir()
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(checkpoint.CheckpointError, match="holds pytorch_model.bin but no config.json"):
        checkpoint.resolve(tmp_path / "hf")


def test_a_padded_vocabulary_samples_only_real_tokens(tmp_path):
    """nanoGPT pads GPT-2's 50257 tokens to 50304 rows; ids past the tokenizer's cannot be
    decoded, so the model is read without those rows (sample.py ended in a KeyError)."""
    import sample

    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=32,
                                                                   vocab_size=50304)).eval()
    with torch.no_grad():  # the padding rows are where every draw would go
        theirs.transformer.wte.weight[50257:] = 10 * theirs.transformer.wte.weight[0]
    theirs.save_pretrained(tmp_path / "hf")
    model, tokenizer = load_any(tmp_path / "hf")
    assert model.config.vocab_size == tokenizer.vocab_size == 50257
    idx = torch.tensor([[464, 2068]])
    torch.testing.assert_close(model(idx), hf_logits(theirs, idx)[..., :50257], rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sample.main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "The", "--max-new-tokens", "20", "--seed", "0",
                        "--device", "cpu"]) == 0


def test_an_export_whose_config_does_not_fit_its_weights_names_the_keys(tmp_path):
    _small_checkpoint(tmp_path / "ckpt.pt")
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "exp"), "--format", "safetensors"]) == 0
    meta = json.loads((tmp_path / "exp" / "config.json").read_text())
    meta["tritongpt"]["n_layer"] += 1
    (tmp_path / "exp" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(HFError, match=r"do not match its config.json \(.*Missing key\(s\) in state_dict: \"transformer.h"):
        load_any(tmp_path / "exp")


def test_layer_norm_epsilon_travels_both_ways(tmp_path):
    """A GPT-2 with another epsilon (and ours) keeps it through loading and saving."""
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32,
                                                                   vocab_size=100, layer_norm_epsilon=1e-2)).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf", kernels="torch").eval()
    idx = torch.randint(0, 100, (1, 20))
    assert ours.config.layer_norm_eps == 1e-2
    torch.testing.assert_close(ours(idx), hf_logits(theirs, idx), rtol=1e-5, atol=1e-5)
    ours.save_hf(tmp_path / "again")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(hf_logits(again, idx), hf_logits(theirs, idx), rtol=1e-5, atol=1e-5)


def test_a_half_precision_model_saves_as_the_float32_its_config_names(tmp_path):
    from safetensors.torch import load_file

    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    model.to(torch.bfloat16).save_hf(tmp_path / "o")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "float32"
    assert {t.dtype for t in load_file(tmp_path / "o" / "model.safetensors").values()} == {torch.float32}


def test_an_older_transformers_save_with_mask_buffers_loads(hf_model, tmp_path):
    """transformers before 4.3x saved each layer's causal mask (attn.bias, attn.masked_bias) with
    the weights, as the hub's own gpt2 pytorch_model.bin holds them: they are no weights."""
    n, buffers = hf_model.config.n_positions, {}
    for i in range(hf_model.config.n_layer):
        buffers[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        buffers[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_pretrained(hf_model, tmp_path / "hf", safe=False, extra=buffers)
    ours = load_hf(tmp_path / "hf", kernels="torch").eval()
    idx = torch.randint(0, 100, (1, 20))
    torch.testing.assert_close(ours(idx), hf_logits(hf_model, idx), rtol=1e-5, atol=1e-5)


def test_a_config_whose_sizes_do_not_fit_the_weights_names_the_tensor(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "n_positions": 32}))
    with pytest.raises(HFError, match=r"transformer.wpe.weight has shape \(64, 32\), expected \(32, 32\)"):
        load_hf(hf_dir)


def test_a_model_without_biases_exports_every_tensor_gpt2_has(tmp_path):
    """GPT-2's format has biases: a bias=False model writes zeros for them, not a file
    that other readers of the format find tensors missing from."""
    from safetensors.torch import load_file

    for bias in (True, False):
        GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=bias)).save_hf(tmp_path / str(bias))
    with_biases, without = (load_file(tmp_path / str(b) / "model.safetensors") for b in (True, False))
    assert without.keys() == with_biases.keys()
    assert all(not t.any() for k, t in without.items() if k.endswith(".bias"))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pytorch_model_bin_that_would_run_code_is_refused(hf_model, tmp_path):
    marker = tmp_path / "ran"
    save_pretrained(hf_model, tmp_path / "hf", safe=False, extra={"evil": _RunsCode(marker)})
    with pytest.raises(HFError, match="cannot read .*pytorch_model.bin"):
        load_hf(tmp_path / "hf")
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [({"n_layer": 1}, r"unexpected \['transformer.h.1."), ({"n_layer": 3}, r"missing \['transformer.h.2.")])
def test_weights_of_another_depth_than_the_config_are_refused(hf_dir, change, message):
    """Never a model with some layers left at their random initialisation, or some dropped."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(HFError, match=f"weights do not match a GPT-2 of this config .*{message}"):
        load_hf(hf_dir)


def test_export_refuses_a_folder_holding_only_a_best_checkpoint(tmp_path, capsys):
    _small_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes((tmp_path / "ckpt.pt").read_bytes())
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "run"), "--format", "safetensors"]) == 2
    assert "holds a training run (best.pt)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()


def test_export_into_a_path_under_a_file_is_a_one_line_error(tmp_path, capsys):
    """Any OSError writing the folder is the one line, not only the FileExistsError of a file
    at the path itself: a path under a file (NotADirectoryError) too (a mutation audit:
    catching FileExistsError alone went unseen)."""
    _small_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "file").write_text("x")
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "file" / "exp"), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {tmp_path / 'file' / 'exp'}: Not a directory"), err


def test_a_hf_directory_loads_on_the_kernels_asked_for_in_eval_mode(tmp_path):
    """As our checkpoints and exports do (tests/test_train.py): load_any and load_hf pass the
    kernels on (a mutation audit: either dropping them went unseen, on a CPU every mode
    running the same ops, and so did load_any's model left in training mode)."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=16)).save_pretrained(
        tmp_path / "hf")
    model, _ = load_any(tmp_path / "hf", kernels="triton")
    assert model.config.kernels == "triton" and not model.training
    assert {m.kernels for m in model.modules() if hasattr(m, "kernels")} == {"triton"}
    assert load_hf(tmp_path / "hf", kernels="torch").config.kernels == "torch"


def test_a_safetensors_export_keeps_its_tokenizer(tmp_path):
    """A byte-level model exported and read back is read with its own tokenizer, not GPT-2's (a
    mutation audit: the export naming GPT-2's went unseen, the round-trip test's model using it)."""
    model = _small_checkpoint(tmp_path / "ckpt.pt", tokenizer="byte")
    assert export_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "exp"), "--format", "safetensors"]) == 0
    loaded, tokenizer = load_any(tmp_path / "exp", kernels="torch")
    assert tokenizer.name == "byte" and tokenizer.encode("hé") == list("hé".encode())
    x = torch.tensor([tokenizer.encode("hello")])
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_model_paths_may_start_with_a_tilde(hf_model, tmp_path, monkeypatch):
    """~/models/gpt2, as a shell would not expand it inside quotes (a mutation audit: the
    expansion dropped from load_hf or load_any went unseen)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    save_pretrained(hf_model, tmp_path / "hf", safe=True)
    assert load_hf("~/hf", kernels="torch").config.n_layer == 2
    with pytest.raises(HFError, match="vocab_size=100, fewer than"):  # read, and refused for its vocabulary
        load_any("~/hf")
