"""nanoGPT's checkpoints (the ckpt.pt its train.py writes) as tritongpt models.

The two models share their parameter names and layout, so the weights load as they are,
less torch.compile's "_orig_mod." prefix and the causal-mask buffers nanoGPT keeps where
flash attention is missing. One difference stays: nanoGPT's MLP uses the exact (erf) GELU
and ours GPT-2's tanh approximation (nanoGPT loads GPT-2's weights the other way round);
the two differ by at most 4.7e-4, at x = -2.7.

The tokenizer: nanoGPT's char-level datasets keep theirs in data/<dataset>/meta.pkl of the
nanoGPT checkout, read here (as plain data only) from beside the checkpoint or from that
path under the current or the checkpoint's parent folder; without one, GPT-2's, as
nanoGPT's sample.py does.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_state


class NanoGPTError(ValueError):
    """A nanoGPT checkpoint that cannot be read; the message names the problem and the fix."""


def is_nanogpt(state: object) -> bool:
    return isinstance(state, dict) and {"model", "model_args"} <= state.keys() and "tokenizer" not in state


def from_nanogpt(state: dict, path: Path) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a nanoGPT checkpoint's contents, loaded from `path`."""
    from gpt.hf import without_padding

    args = state["model_args"]
    try:
        config = GPTConfig(vocab_size=args["vocab_size"], block_size=args["block_size"], n_layer=args["n_layer"],
                           n_head=args["n_head"], n_embd=args["n_embd"], bias=bool(args.get("bias", True)),
                           dropout=float(args.get("dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise NanoGPTError(f"{path}: its model_args cannot be read ({e})") from None
    # torch.compile's prefix, and DDP's where a wrapped model's state dict was saved.
    weights = {k.removeprefix("module.").removeprefix("_orig_mod.").removeprefix("module."): v
               for k, v in state["model"].items()}
    weights = {k: v for k, v in weights.items() if not k.endswith(".attn.bias")}  # the causal mask
    dataset = (state.get("config") or {}).get("dataset")
    tokenizer, order = _char_tokenizer(path, dataset, config.vocab_size) or (None, None)
    if order is not None:
        # nanoGPT's ids are meta.pkl's itos order; ours the sorted characters': reorder the
        # embedding rows (the output head is the same matrix) to match.
        for k in ("transformer.wte.weight", "lm_head.weight"):
            if k in weights and weights[k].size(0) == len(order):
                weights[k] = weights[k][order]
    model = GPT(config)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:200]
        raise NanoGPTError(f"{path}: the weights do not match its model_args ({detail})") from None
    if tokenizer is None:
        tokenizer = get_tokenizer("gpt2")
        if config.vocab_size < tokenizer.vocab_size:
            looked = ", ".join(str(p) for p in _meta_paths(path, dataset))
            raise NanoGPTError(f"{path} is a nanoGPT model of {config.vocab_size} tokens, not GPT-2's, and its "
                               f"meta.pkl is not at {looked}; copy data/<dataset>/meta.pkl from the nanoGPT "
                               f"checkout beside it")
        model = without_padding(model, tokenizer.vocab_size)  # nanoGPT's 50304 rows
    return model, tokenizer


def _meta_paths(path: Path, dataset: str | None) -> list[Path]:
    paths = [path.parent / "meta.pkl"]
    if dataset:
        paths += [Path.cwd() / "data" / dataset / "meta.pkl", path.parent.parent / "data" / dataset / "meta.pkl"]
    return paths


class _PlainData(pickle.Unpickler):
    """meta.pkl holds dicts of ints and strings: anything that names a class or function is
    refused, so reading it cannot run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def _char_tokenizer(path: Path, dataset: str | None, vocab_size: int) -> tuple[Tokenizer, list[int]] | None:
    """The char tokenizer of meta.pkl, and for each of its (sorted) ids the nanoGPT id of that character."""
    meta_path = next((p for p in _meta_paths(path, dataset) if p.is_file()), None)
    if meta_path is None:
        return None
    try:
        with open(meta_path, "rb") as f:
            itos = _PlainData(f).load()["itos"]
        chars = [itos[i] for i in range(len(itos))]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise NanoGPTError(f"{meta_path} is not a nanoGPT meta.pkl of characters ({e})") from None
    if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
        raise NanoGPTError(f"{meta_path} does not map ids to distinct single characters, as a char-level "
                           f"dataset's meta.pkl does; only those (or GPT-2's tokens, with no meta.pkl) are read")
    if len(chars) != vocab_size:
        raise NanoGPTError(f"{meta_path} holds {len(chars)} characters but {path} has a vocabulary of "
                           f"{vocab_size}: it is another dataset's; put the meta.pkl of the dataset it was "
                           f"trained on beside it")
    tokenizer = tokenizer_from_state({"name": "char", "chars": "".join(chars)})
    nanogpt_id = {c: i for i, c in enumerate(chars)}
    return tokenizer, [nanogpt_id[c] for c in tokenizer.chars]
