"""Checkpoints: written atomically, loaded as plain data (weights_only=True).

A checkpoint is a dict of tensors and plain Python values only (config,
tokenizer and RNG states included), so loading one can never run code.
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from gpt import nanogpt
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
        held = sorted(f.name for f in p.glob("*") if f.suffix in (".pt", ".safetensors", ".bin"))
        if not (p / CKPT_NAME).is_file() and held:
            if held[0].endswith(".pt"):
                raise CheckpointError(f"{p} holds no {CKPT_NAME} but {', '.join(held)}: pass {p / held[0]}")
            raise CheckpointError(f"{p} holds {', '.join(held)} but no config.json: a model folder needs the "
                                  f"config.json its exporter wrote (gpt.export, save_pretrained) beside the weights")
        p = p / CKPT_NAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}; pass the out dir or .pt file of a training run "
                              f"(train.py --out-dir DIR writes DIR/{CKPT_NAME})")
    return p


def umask_mode(mode: int) -> int:
    """`mode` less the process umask: what open() or mkdir() would give, unlike mkstemp's 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def save(state: dict, path: str | os.PathLike) -> None:
    """Writes to a temporary file in the same folder, fsyncs, then renames over `path`.

    A crash or a full disk mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"cannot write in {path.parent} ({e.strerror}); pass a writable --out-dir") from None
    try:
        os.chmod(tmp, umask_mode(0o666))  # readable as a plain torch.save file would be
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise CheckpointError(f"could not write {path} ({reason}); any earlier checkpoint is intact: free some "
                              f"space or use another --out-dir, then --resume") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_partial_saves(path: str | os.PathLike) -> int:
    """Deletes the temporary files that saves of `path` killed mid-write (SIGKILL, power loss)
    left beside it; returns how many. Only for a folder whose writer holds its lock."""
    path = Path(path)
    partial = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for f in partial:
        f.unlink(missing_ok=True)
    return len(partial)


def _read(p: Path, map_location: str | torch.device = "cpu") -> object:
    """What torch.save wrote to p, tensors and plain data only (a checkpoint cannot run code)."""
    if not zipfile.is_zipfile(p):
        raise CheckpointError(f"{p} is not a tritongpt checkpoint (not a torch.save archive)")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{p} holds objects other than tensors and plain data, refused for safety "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    # Damage inside a whole zip (flipped bits, a zeroed block) shows as any of these.
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{p} is truncated or not a tritongpt checkpoint ({type(e).__name__})") from None
    return state


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A tritongpt checkpoint's contents, its config and tokenizer checked."""
    p = resolve(path)
    return _checked(_read(p, map_location), p)


def _checked(state: object, p: Path) -> dict:
    if nanogpt.is_nanogpt(state):
        raise CheckpointError(f"{p} is a nanoGPT checkpoint, which --resume cannot continue (its optimizer and "
                              f"schedule are nanoGPT's); fine-tune from it with --init-from {p}")
    if not isinstance(state, dict) or not {"model", "config", "tokenizer"} <= state.keys():
        raise CheckpointError(f"{p} is not a tritongpt checkpoint (missing model, config or tokenizer)")
    try:  # what every user of a checkpoint rebuilds, checked once here
        GPTConfig.from_dict(state["config"])
        tokenizer_from_state(state["tokenizer"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{p} holds a config or tokenizer this version cannot read ({e})") from None
    return state


def load_weights(model: GPT, weights: dict, path: str | os.PathLike) -> None:
    """model.load_state_dict, with a mismatch (another version's names or shapes) as one line."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: the weights do not match its config ({' '.join(first[:2])[:200]})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, raw checkpoint) from a checkpoint file or out dir,
    nanoGPT's too (gpt/nanogpt.py)."""
    p = resolve(path)
    state = _read(p)
    if nanogpt.is_nanogpt(state):
        try:
            model, tokenizer = nanogpt.from_nanogpt(state, p)
        except nanogpt.NanoGPTError as e:
            raise CheckpointError(str(e)) from None
        return model.to(device).eval(), tokenizer, state
    state = _checked(state, p)
    model = GPT(GPTConfig.from_dict(state["config"]))
    load_weights(model, state["model"], p)
    return model.to(device).eval(), tokenizer_from_state(state["tokenizer"]), state


def rng_state() -> dict:
    """Every global random stream (Python, NumPy, torch CPU and CUDA) as plain data and tensors."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_state_by_name(opt_state: dict, names: list[list[str]]) -> dict:
    """Re-keys a torch optimizer state_dict from parameter ids to parameter names.

    names[g] lists the names of param group g's parameters in order; the result
    does not depend on how the model was wrapped (plain, DDP or FSDP2).
    """
    ids = [n for group in names for n in group]
    return {
        "state": {ids[i]: s for i, s in opt_state["state"].items()},
        "param_groups": [
            {**g, "params": group} for g, group in zip(opt_state["param_groups"], names)
        ],
    }


def optimizer_state_by_id(named_state: dict) -> dict:
    """Inverse of optimizer_state_by_name, for Optimizer.load_state_dict."""
    ids = {n: i for i, n in enumerate(n for g in named_state["param_groups"] for n in g["params"])}
    return {
        "state": {ids[n]: s for n, s in named_state["state"].items()},
        "param_groups": [
            {**g, "params": [ids[n] for n in g["params"]]} for g in named_state["param_groups"]
        ],
    }


class OutDirLock:
    """One trainer per out dir: a lock file holding the owner's host and pid.

    A lock left by a process that no longer runs (on this host) is stale and taken over.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / "train.lock"
        self.owned = False
        self.made_dir = False  # removed again on release if the run wrote nothing into it

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when a stale lock was replaced. Raises CheckpointError if held."""
        import socket

        self.made_dir = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create --out-dir {self.path.parent} ({e.strerror}); pass a writable folder") from None
        me = f"{socket.gethostname()} {os.getpid()}"
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                host, _, pid = self.path.read_text().strip().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                    self.path.unlink(missing_ok=True)
                    note = f"removed a stale lock {self.path} left by pid {pid}, which no longer runs"
                    continue
                raise CheckpointError(
                    f"{self.path.parent} is in use by another trainer ({host} pid {pid}); stop it, "
                    f"use another --out-dir, or delete {self.path} if that process is gone"
                ) from None
            except OSError as e:
                raise CheckpointError(f"cannot write in --out-dir {self.path.parent} ({e.strerror}); "
                                      f"pass a writable folder") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.owned = True
            return note
        raise CheckpointError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False
            if self.made_dir:  # a run that failed early leaves no empty out dir behind
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass  # not empty: the run wrote checkpoints or metrics


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
