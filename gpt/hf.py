"""Hugging Face GPT-2 interop: load a local GPT-2 directory as a GPT, save a GPT as one.

Nothing is downloaded: paths point at directories on disk (config.json plus
model.safetensors or pytorch_model.bin), such as `save_pretrained` writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_state

# GPT-2 stores these as Conv1D, (in, out); nn.Linear is (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Config values we cannot represent, with the value we need.
REQUIRED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
EXPORT_MARKER = "tritongpt"


class HFError(ValueError):
    """A directory that cannot be loaded or a model that cannot be saved; the message says why."""


def is_model_dir(path: str | os.PathLike) -> bool:
    """A directory with a config.json: a Hugging Face GPT-2 model or our safetensors export."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); re-copy or re-export the folder") from None


def _read_weights(folder: Path) -> dict[str, Tensor]:
    """The weights of a single file or of the shards an index names (save_pretrained shards
    past 5 GB, e.g. gpt2-xl in fp32)."""
    from safetensors.torch import load_file

    def read_bin(path: Path) -> dict[str, Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True)

    def read(reader, path: Path) -> dict[str, Tensor]:
        try:
            return reader(path)
        except Exception as e:  # safetensors and torch.load raise their own types for a damaged file
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise HFError(f"cannot read {path} ({first}); re-copy or re-export the folder (an interrupted "
                          f"copy leaves a file like this)") from None

    for name, reader in (("model.safetensors", load_file), ("pytorch_model.bin", read_bin)):
        if (folder / name).is_file():
            return read(reader, folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise HFError(f"{folder} is missing the shard(s) {', '.join(missing)} that {index.name} names")
            return {k: t for shard in shards for k, t in read(reader, folder / shard).items()}
    raise HFError(f"{folder} has no model.safetensors or pytorch_model.bin (nor a sharded index of either)")


def config_from_hf(hf: dict, kernels: str = "auto") -> GPTConfig:
    if hf.get("model_type") != "gpt2":
        raise HFError(f"model_type is {hf.get('model_type')!r}; only GPT-2 ('gpt2') checkpoints are supported")
    for key, want in REQUIRED.items():
        if hf.get(key, want) != want:
            raise HFError(f"config {key}={hf[key]!r} is not supported (needs {want!r})")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise HFError(f"activation_function={act!r} is not supported (needs the tanh GELU: 'gelu_new')")
    n_embd = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise HFError(f"n_inner={hf['n_inner']} is not supported (the MLP is 4 * n_embd = {4 * n_embd} wide)")
    if hf.get("tie_word_embeddings", True) is False:
        raise HFError("tie_word_embeddings=false is not supported (the output head is the token embedding)")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=0.0,
        kernels=kernels,
    )


def load_hf(path: str | os.PathLike, kernels: str = "auto") -> GPT:
    """A GPT with the weights of a local Hugging Face GPT-2 directory."""
    folder = Path(path).expanduser()
    if not is_model_dir(folder):
        raise HFError(f"{folder} is not a model directory (no config.json there)")
    try:
        config = config_from_hf(_read_json(folder / "config.json"), kernels)
    except KeyError as e:
        raise HFError(f"{folder / 'config.json'} lacks {e}, which a GPT-2 config has") from None
    except HFError:
        raise
    except ValueError as e:  # GPTConfig's own checks, e.g. n_embd not divisible by n_head
        raise HFError(f"{folder / 'config.json'}: {e}") from None
    model = GPT(config)
    state = {}
    for name, t in _read_weights(folder).items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not weights
        if name == "lm_head.weight":
            continue  # tied to wte; checked below
        state["transformer." + name] = t.t() if name.endswith(CONV1D) else t
    ours = {k for k in model.state_dict() if k != "lm_head.weight"}
    missing, unexpected = ours - state.keys(), state.keys() - ours
    if missing or unexpected:
        raise HFError(f"{folder}: weights do not match a GPT-2 of this config "
                      f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k in state:
                if p.shape != state[k].shape:
                    raise HFError(f"{folder}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[k])
    return model


def without_padding(model: GPT, vocab_size: int) -> GPT:
    """The model with its first vocab_size token rows only. nanoGPT pads GPT-2's 50257
    tokens to 50304 rows, which no token id reaches: left in, sampling could draw ids that
    the tokenizer cannot decode."""
    if model.config.vocab_size <= vocab_size:
        return model
    state = model.state_dict()
    state["transformer.wte.weight"] = state["lm_head.weight"] = state["transformer.wte.weight"][:vocab_size]
    trimmed = GPT(model.config.updated(vocab_size=vocab_size))
    trimmed.load_state_dict(state)
    return trimmed


def save_hf(model: GPT, path: str | os.PathLike) -> None:
    """Writes config.json and model.safetensors that transformers.GPT2LMHeadModel loads."""
    from safetensors.torch import save_file

    c = model.config
    if c.pos_embedding != "learned":
        raise HFError(f"GPT-2's format needs learned position embeddings; this model has pos_embedding="
                      f"{c.pos_embedding!r}: export it with --format safetensors")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, t in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied: GPT-2 saves it once, as wte
        t = t.detach().to("cpu", torch.float32)
        state[k] = (t.t() if k.endswith(CONV1D) else t).contiguous().clone()
        if not c.bias and k.endswith(".weight") and not k.startswith(("transformer.wte.", "transformer.wpe.")):
            # Without biases (nanoGPT's default, bias=False) the model is GPT-2 with zero ones.
            state[k.removesuffix("weight") + "bias"] = torch.zeros(t.size(0))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_safetensors(model: GPT, tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Our own format without pickle: model.safetensors plus our config and tokenizer as JSON."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: t.detach().cpu().contiguous().clone() for k, t in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    meta = {EXPORT_MARKER: model.config.to_dict(), "tokenizer": tokenizer.state_dict()}
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_any(path: str | os.PathLike, kernels: str = "auto") -> tuple[GPT, Tokenizer]:
    """(model in eval mode on `kernels`, tokenizer) from a Hugging Face GPT-2 directory, our
    safetensors export, or our checkpoint (whatever `kernels` it was trained with)."""
    from gpt import checkpoint

    folder = Path(path).expanduser()
    if is_model_dir(folder) and (folder / checkpoint.CKPT_NAME).is_file():
        raise HFError(f"{folder} holds both an exported model (config.json) and a training checkpoint "
                      f"({checkpoint.CKPT_NAME}), which may differ; pass {folder / checkpoint.CKPT_NAME}, or "
                      f"export into a folder of its own")
    if is_model_dir(folder):
        meta = _read_json(folder / "config.json")
        if EXPORT_MARKER not in meta:
            tokenizer = get_tokenizer("gpt2")
            if meta.get("vocab_size", 0) < tokenizer.vocab_size:
                raise HFError(f"{folder} has vocab_size={meta.get('vocab_size')}, fewer than the GPT-2 tokenizer's "
                              f"{tokenizer.vocab_size} tokens it is read with; export its checkpoint with "
                              f"python -m gpt.export CKPT DIR --format safetensors, which keeps its own tokenizer")
            return without_padding(load_hf(folder, kernels), tokenizer.vocab_size).eval(), tokenizer
        try:
            model = GPT(GPTConfig.from_dict({**meta[EXPORT_MARKER], "kernels": kernels}))
            tokenizer = tokenizer_from_state(meta["tokenizer"])
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise HFError(f"{folder / 'config.json'} holds a config or tokenizer this version cannot read ({e})") from None
        state = _read_weights(folder)
        state["lm_head.weight"] = state.get("transformer.wte.weight")
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:200]
            raise HFError(f"{folder}: the weights do not match its config.json ({detail})") from None
        return model.eval(), tokenizer
    model, tokenizer, _ = checkpoint.load_model(folder)
    # A run on --kernels triton saved that mode; on another device it must not stay.
    return model.set_kernels(kernels), tokenizer
