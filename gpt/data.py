"""Corpora: read text, tokenize once into cached memmap files, serve random windows.

A corpus is a text file, a folder (every UTF-8 text file under it) or, by
default, the Python standard library's own source: text every Python install
has, so training works with no data supplied and no network.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt.checkpoint import umask_mode
from gpt.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_state

VAL_FRACTION = 0.1
DEFAULT_CACHE = os.environ.get(
    "TRITONGPT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tritongpt")
)
# Tests, IDLE and vendored packages are left out: they are long and repetitive.
_STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}


class CorpusError(ValueError):
    """A corpus that cannot be used; the message names the problem and the fix."""


def default_corpus_files() -> list[Path]:
    """The standard library's .py files, found via sysconfig (sorted, so the corpus is stable)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not _STDLIB_SKIP.intersection(f.relative_to(root).parts)]
    return sorted(files)


def _decode(raw: bytes, path: Path) -> str:
    if b"\x00" in raw:
        raise CorpusError(f"{path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path} is not UTF-8 text (invalid byte at offset {e.start}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_corpus(data: str | None, exclude: tuple[str, ...] = ()) -> tuple[str, str]:
    """Returns (text, description). data: a file, a folder, or None for the default corpus.

    A folder's files under `exclude` (the trainer's out and cache dirs) are not read: with
    --data . they would otherwise feed the run's own lock, metrics and checkpoints back in.
    """
    if data == "default" and Path(data).exists():
        raise CorpusError("--data default names the built-in corpus, but ./default also exists; "
                          "pass ./default for that path, or leave --data out for the built-in corpus")
    if data is None or data == "default":
        files, what = default_corpus_files(), "the Python standard library's source"
        if not files:
            raise CorpusError("found no standard-library .py files; pass --data PATH")
        texts = []
        for f in files:
            try:
                texts.append(_decode(f.read_bytes(), f))
            except (CorpusError, OSError):
                continue
        return "\n".join(texts), f"{what} ({len(texts)} files)"
    path = Path(data).expanduser()
    if not path.exists():
        raise CorpusError(f"data path {path} does not exist; pass a text file or a folder of text files")
    if not path.is_dir():  # a file, FIFO or /dev/fd/N (process substitution)
        text, what = _decode(path.read_bytes(), path), str(path)
    else:
        skip = [Path(x).expanduser().resolve() for x in exclude]
        files = sorted(
            f for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
            and not any(f.resolve().is_relative_to(s) for s in skip)
        )
        texts, skipped = [], 0
        for f in files:
            try:
                texts.append(_decode(f.read_bytes(), f))
            except CorpusError:
                skipped += 1  # a folder may hold images and the like; use its text files only
        if not texts:
            raise CorpusError(f"folder {path} holds no UTF-8 text files ({skipped} non-text files skipped)")
        text = "\n".join(texts)
        what = f"{path} ({len(texts)} text files" + (f", {skipped} non-text skipped)" if skipped else ")")
    if not text.strip():
        raise CorpusError(f"corpus {path} is empty; pass a file with some text in it")
    return text, what


@dataclass
class Dataset:
    """Train and validation token streams (memmaps) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    description: str

    def check_block_size(self, block_size: int) -> None:
        need = block_size + 1
        if len(self.train) < need or len(self.val) < need:
            raise CorpusError(
                f"corpus too short: {len(self.train)} train / {len(self.val)} val tokens, but one "
                f"window needs {need}; use a smaller --block-size or more text"
            )

    def batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and the next-token targets y (B, T), int64 on CPU."""
        tokens = self.train if split == "train" else self.val
        starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()
        idx = starts[:, None] + np.arange(block_size + 1)
        window = torch.from_numpy(tokens[idx].astype(np.int64))
        return window[:, :-1], window[:, 1:]


def load_dataset(
    data: str | None, tokenizer: str = "char", cache_dir: str = DEFAULT_CACHE, log=print, exclude: tuple[str, ...] = ()
) -> Dataset:
    """Tokenizes a corpus once, caching by content hash and tokenizer name."""
    text, description = read_corpus(data, exclude)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
    folder = Path(cache_dir) / f"{digest}-{tokenizer}"
    meta = _read_meta(folder)
    if meta is None:
        if folder.exists():  # truncated, or left half-written by hand: never trained on
            log(f"rebuilding the damaged cache {folder}")
            shutil.rmtree(folder, ignore_errors=True)
        log(f"tokenizing {description} with the {tokenizer} tokenizer (cached in {folder})")
        _write_cache(folder, text, get_tokenizer(tokenizer, text))
        meta = _read_meta(folder)
        if meta is None:
            raise CorpusError(f"the token cache {folder} could not be written whole; pass another --cache-dir")
    dtype = np.dtype(meta["dtype"])
    return Dataset(
        train=np.memmap(folder / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(folder / "val.bin", dtype=dtype, mode="r"),
        tokenizer=tokenizer_from_state(meta["tokenizer"]),
        description=description,
    )


def _read_meta(folder: Path) -> dict | None:
    """The cache entry's metadata, or None unless its token files hold the tokens it counts."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        size = np.dtype(meta["dtype"]).itemsize
        stored = sum((folder / name).stat().st_size for name in ("train.bin", "val.bin"))
        return meta if stored == meta["tokens"] * size and (folder / "val.bin").stat().st_size > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(folder: Path, text: str, tok: Tokenizer) -> None:
    ids = tok.encode_array(text)
    # The narrowest that holds every id: a byte corpus caches at its own size, not twice it.
    dtype = np.uint8 if tok.vocab_size <= 1 << 8 else np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    n_val = int(len(ids) * VAL_FRACTION)
    if n_val == 0:
        raise CorpusError(f"corpus too short: {len(ids)} tokens, too few to hold out a validation split; "
                          f"pass more text")
    # Build in a temporary folder and rename it into place: a crash never leaves half a cache.
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError as e:
        raise CorpusError(f"cannot write the token cache in {folder.parent} ({e.strerror}); "
                          f"pass --cache-dir a writable folder") from None
    try:
        tmp.chmod(umask_mode(0o777))  # a shared cache stays readable by others, as mkdir would leave it
        ids[: len(ids) - n_val].astype(dtype).tofile(tmp / "train.bin")
        ids[len(ids) - n_val :].astype(dtype).tofile(tmp / "val.bin")
        meta = {"tokenizer": tok.state_dict(), "dtype": np.dtype(dtype).name, "tokens": int(len(ids))}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its cache is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
