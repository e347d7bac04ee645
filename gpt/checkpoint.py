"""Checkpoints: written atomically, loaded as plain data (weights_only=True).

A checkpoint is a dict of tensors and plain Python values only (config,
tokenizer and RNG states included), so loading one can never run code.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, tokenizer_from_state

CKPT_NAME = "ckpt.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or an out dir holding ckpt.pt."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CKPT_NAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}; train one with train.py --out-dir or pass its path")
    return p


def save(state: dict, path: str | os.PathLike) -> None:
    """Writes to a temporary file in the same folder, fsyncs, then renames over `path`.

    A crash or a full disk mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    p = resolve(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{p} holds objects other than tensors and plain data, refused for safety "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{p} is truncated or not a tritongpt checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not {"model", "config", "tokenizer"} <= state.keys():
        raise CheckpointError(f"{p} is not a tritongpt checkpoint (missing model, config or tokenizer)")
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, raw checkpoint) from a checkpoint file or out dir."""
    state = load(path)
    model = GPT(GPTConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer_from_state(state["tokenizer"]), state


def rng_state(data_generator: torch.Generator) -> dict:
    """Every random stream a run draws from, as plain data and tensors."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": data_generator.get_state(),
    }


def set_rng_state(state: dict, data_generator: torch.Generator) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_generator.set_state(state["data"])
