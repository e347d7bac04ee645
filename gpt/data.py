"""Corpora: read text, tokenize once into cached memmap files, serve random windows.

A corpus is a text file, a folder (every UTF-8 text file under it) or, by
default, the Python standard library's own source: text every Python install
has, so training works with no data supplied and no network.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt.checkpoint import pid_alive, umask_mode

try:
    import fcntl
except ImportError:  # Windows: runs on one corpus at a time are not serialised
    fcntl = None
from gpt.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_state

VAL_FRACTION = 0.1
# Corpora are read and tokenized this much at a time, so tokenizing memory stays flat
# (a few hundred MB) whatever the corpus size.
READ_BYTES = 1 << 23
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


@dataclass(frozen=True)
class _Source:
    path: Path
    spooled: IO[bytes] | None = None  # a pipe, copied to an unnamed file: it can be read only once


# Byte-order marks of text in a wider encoding (UTF-32's first: it starts with UTF-16's).
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
              (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _blocks(source: _Source) -> Iterator[str]:
    """A file's text, decoded a block at a time; CorpusError if it is not UTF-8 text."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    if source.spooled is not None:
        source.spooled.seek(0)
    with contextlib.nullcontext(source.spooled) if source.spooled is not None else open(source.path, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            if offset == 0 and (bom := next((e for b, e in _WIDE_BOMS if raw.startswith(b)), None)):
                raise CorpusError(f"{source.path} is {bom.upper()} text, not UTF-8; convert it first, "
                                  f"e.g. iconv -f {bom} -t utf-8")
            if b"\x00" in raw:
                raise CorpusError(f"{source.path} looks binary (it contains NUL bytes); pass a UTF-8 text file")
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{source.path} is not UTF-8 text (invalid byte at offset {offset - pending + e.start}); "
                    f"convert it first, e.g. iconv -f latin1 -t utf-8"
                ) from None
            if offset == 0 and text.startswith("\ufeff"):
                text = text[1:]  # a byte-order mark is not text
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return


@dataclass
class Corpus:
    """The text files of a corpus, in order; their texts joined by newlines are the corpus.

    Files are read a block at a time, so no pass over a corpus holds all of it in memory.
    """

    sources: list[_Source]
    digest: str  # of the corpus's UTF-8 bytes: the cache key
    size: int  # UTF-8 bytes
    description: str = ""

    def blocks(self) -> Iterator[str]:
        """The corpus text, a block at a time; CorpusError if a file changed since it was scanned."""
        digest = hashlib.sha256()
        for i, source in enumerate(self.sources):
            if i:
                digest.update(b"\n")
                yield "\n"
            try:
                for text in _blocks(source):
                    digest.update(text.encode("utf-8"))
                    yield text
            except OSError:
                break  # deleted or moved since the scan: the digest check below says so
        if digest.hexdigest()[:20] != self.digest:
            raise CorpusError(f"{self.description} changed while it was being read; run again once it is written")

    def text(self) -> str:
        return "".join(self.blocks())


def scan_corpus(
    data: str | None, exclude: tuple[str, ...] = (), log: Callable[[str], object] | None = None,
    spool_dir: str | None = None,
) -> Corpus:
    """Finds and checks a corpus: a file, a folder, or None for the default corpus.

    A folder's files under `exclude` (the trainer's out and cache dirs) are not read: with
    --data . they would otherwise feed the run's own lock, metrics and checkpoints back in.
    `log`, if given, hears how far a long read has got. A pipe is copied into an unnamed
    file in `spool_dir` (default: the system's temporary folder), not held in memory.
    """
    if data == "default" and Path(data).exists():
        raise CorpusError("--data default names the built-in corpus, but ./default also exists; "
                          "pass ./default for that path, or leave --data out for the built-in corpus")
    if data is None or data == "default":
        files = default_corpus_files()
        corpus = _scan([_Source(f) for f in files], "the standard library", log, skip_non_text=True, skip_unreadable=True)
        if not corpus.sources:
            raise CorpusError("found no readable standard-library .py files; pass --data PATH")
        corpus.description = f"the Python standard library's source ({len(corpus.sources)} files)"
        return corpus
    path = Path(data).expanduser()
    if not path.exists():
        raise CorpusError(f"data path {path} does not exist; pass a text file or a folder of text files")
    if not path.is_dir():  # a file, FIFO or /dev/fd/N (process substitution)
        spooled = None if path.is_file() else _spool(path, spool_dir)
        corpus = _scan([_Source(path, spooled)], str(path), log, skip_non_text=False)
        corpus.description = str(path)
        return corpus
    skip = [Path(x).expanduser().resolve() for x in exclude]
    files = sorted(f for f in _folder_files(path, skip) if not any(f.resolve().is_relative_to(s) for s in skip))
    # A folder may hold images and the like; use its text files only.
    corpus = _scan([_Source(f) for f in files], str(path), log, skip_non_text=True)
    read = {source.path for source in corpus.sources}
    skipped = [f for f in files if f not in read]
    # Named, a few: a .txt in latin-1 or UTF-16 is skipped as an image is, and would go unseen.
    named = f": {', '.join(str(f.relative_to(path)) for f in skipped[:3])}{', ...' if len(skipped) > 3 else ''}"
    if not corpus.sources:
        raise CorpusError(f"folder {path} holds no UTF-8 text files ({len(skipped)} non-text files skipped{named})")
    corpus.description = (f"{path} ({len(corpus.sources)} text files"
                          + (f", {len(skipped)} non-text skipped{named})" if skipped else ")"))
    return corpus


def _folder_files(path: Path, skip: list[Path]) -> list[Path]:
    """The files under a folder but hidden ones and those under `skip`, through symlinked
    folders too (each folder once, so a link to an ancestor is no loop); CorpusError for a
    folder that cannot be listed, as for a file that cannot be read."""

    def unreadable(e: OSError):
        raise CorpusError(f"cannot read folder {e.filename} ({e.strerror}); check its permissions")

    files, seen = [], set()
    for root, dirs, names in os.walk(path, onerror=unreadable, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            continue
        dirs.sort()  # a folder reached twice is read where the sorted walk first meets it
        if (st.st_dev, st.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".") and Path(root, d).resolve() not in skip]
        files += [f for name in names if not name.startswith(".") and (f := Path(root, name)).is_file()]
    return files


def _spool(path: Path, folder: str | None) -> IO[bytes]:
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        spooled = tempfile.TemporaryFile(dir=folder)  # unlinked already: gone when closed
    except OSError as e:
        raise CorpusError(f"cannot make a temporary file in {folder or tempfile.gettempdir()} to hold {path} "
                          f"({e.strerror}); pass --cache-dir a writable folder") from None
    try:
        with open(path, "rb") as pipe:
            while chunk := pipe.read(READ_BYTES):
                spooled.write(chunk)
    except OSError as e:
        spooled.close()
        raise CorpusError(f"cannot read {path} into {folder or tempfile.gettempdir()} ({e.strerror}); check its "
                          f"permissions, or the free space there") from None
    return spooled


def _scan(sources: list[_Source], name: str, log, skip_non_text: bool, skip_unreadable: bool = False) -> Corpus:
    """Reads every source once: checks it is text, and takes the digest and size of the whole."""
    digest, size, blank, kept = hashlib.sha256(), 0, True, []
    progress = _Progress(log, "read", sum(_stat_size(s) for s in sources))
    for source in sources:
        before, file_size, file_blank = digest.copy(), 0, True  # a file found bad halfway leaves no trace
        if kept:
            digest.update(b"\n")  # the files are joined by newlines
        try:
            for text in _blocks(source):
                raw = text.encode("utf-8")
                digest.update(raw)
                file_size += len(raw)
                file_blank = file_blank and text.isspace()
                progress.advance(len(raw))
        except CorpusError:
            if not skip_non_text:
                raise
            digest = before
            continue
        except OSError as e:
            if not skip_unreadable:
                raise CorpusError(f"cannot read {source.path} ({e.strerror}); check its permissions") from None
            digest = before
            continue
        size += file_size + bool(kept)
        blank = blank and file_blank
        kept.append(source)
    if kept and blank:
        raise CorpusError(f"corpus {name} is empty; pass a file with some text in it")
    return Corpus(kept, digest.hexdigest()[:20], size)


def _stat_size(source: _Source) -> int:
    try:
        return os.fstat(source.spooled.fileno()).st_size if source.spooled is not None else source.path.stat().st_size
    except OSError:
        return 0


class _Progress:
    """A line every 15 s of a pass over the corpus: only a large one takes that long."""

    def __init__(self, log, verb: str, total: int):
        self.log, self.verb, self.total, self.done = log, verb, max(total, 1), 0
        self.started = self.last = time.monotonic()

    def advance(self, nbytes: int, note: str = "") -> None:
        self.done += nbytes
        if self.log and time.monotonic() - self.last > 15:
            self.last = time.monotonic()
            self.log(f"  {self.verb} {min(self.done / self.total, 1):.0%} of {self.total / 1e9:.2f} GB"
                     f"{note} ({self.last - self.started:.0f}s)")


@dataclass
class Dataset:
    """Train and validation token streams (memmaps) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    description: str

    def check_block_size(self, block_size: int, fixed: bool = False) -> None:
        """fixed: the block size is the model's own (a resumed run's), which no flag changes."""
        need = block_size + 1
        if len(self.train) < need or len(self.val) < need:
            fix = "more text" if fixed else "a smaller --block-size or more text"
            raise CorpusError(
                f"corpus too short: {len(self.train)} train / {len(self.val)} val tokens, but one "
                f"window needs {need}; use {fix}"
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
    data: str | None, tokenizer: str = "char", cache_dir: str = DEFAULT_CACHE, log: Callable[[str], object] = print,
    exclude: tuple[str, ...] = (),
    chars: str | None = None,
) -> Dataset:
    """Tokenizes a corpus once, caching by content hash and tokenizer name. chars: the char
    vocabulary to encode with (the one weights were trained with), not the corpus's own;
    a corpus may then use fewer characters, but no others."""
    corpus = scan_corpus(data, exclude, log, spool_dir=cache_dir)
    folder = Path(cache_dir) / f"{corpus.digest}-{tokenizer}"
    meta = _read_meta(folder)
    if chars is not None and (meta is None or meta["tokenizer"].get("chars") != "".join(sorted(set(chars)))):
        # Not the corpus's own vocabulary (or not cached yet): a cache entry of its own.
        folder = Path(cache_dir) / f"{corpus.digest}-char-{hashlib.sha256(chars.encode()).hexdigest()[:12]}"
        meta = _read_meta(folder)
    if meta is None:
        with _build_lock(folder, log):
            # Another process may have built it while this one waited for the lock.
            meta = _read_meta(folder) or _build_cache(folder, corpus, tokenizer, chars, log)
    dtype = np.dtype(meta["dtype"])
    return Dataset(
        train=np.memmap(folder / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(folder / "val.bin", dtype=dtype, mode="r"),
        tokenizer=tokenizer_from_state(meta["tokenizer"]),
        description=corpus.description,
    )


def _build_cache(folder: Path, corpus: Corpus, tokenizer: str, chars: str | None, log) -> dict:
    if folder.exists():  # truncated, or left half-written by hand: never trained on
        log(f"rebuilding the damaged cache {folder}")
        shutil.rmtree(folder, ignore_errors=True)
    log(f"tokenizing {corpus.description} with the {tokenizer} tokenizer (cached in {folder})")
    vocabulary = (chars or _characters(corpus)) if tokenizer == "char" else None
    try:
        _write_cache(folder, corpus, get_tokenizer(tokenizer, vocabulary), log)
    except ValueError as e:  # a character outside the weights' vocabulary
        if chars is None or isinstance(e, CorpusError):
            raise
        raise CorpusError(f"{corpus.description} cannot be encoded with the weights' char vocabulary: {e}") from None
    meta = _read_meta(folder)
    if meta is None:
        raise CorpusError(f"the token cache {folder} could not be written whole; pass another --cache-dir")
    return meta


@contextlib.contextmanager
def _build_lock(folder: Path, log) -> Iterator[None]:
    """Holds an exclusive lock on building `folder`: of two runs started on one corpus, the
    second waits and then reads the first's cache, instead of tokenizing it again or taking a
    cache renamed into place a moment ago for a damaged one and deleting it."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Read-only: flock needs no more, and a lock file another user made still opens.
        lock = os.open(folder.parent / f".{folder.name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as e:
        raise CorpusError(f"cannot write the token cache in {folder.parent} ({e.strerror}); "
                          f"pass --cache-dir a writable folder") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"waiting for another process tokenizing into {folder}")
                fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # releases the lock


def _characters(corpus: Corpus) -> str:
    """Every character of the corpus once: the char tokenizer's vocabulary."""
    chars: set[str] = set()
    for block in corpus.blocks():
        chars.update(block)
    return "".join(chars)


def _read_meta(folder: Path) -> dict | None:
    """The cache entry's metadata, or None unless its token files hold the tokens it counts."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        size = np.dtype(meta["dtype"]).itemsize
        stored = sum((folder / name).stat().st_size for name in ("train.bin", "val.bin"))
        return meta if stored == meta["tokens"] * size and (folder / "val.bin").stat().st_size > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(folder: Path, corpus: Corpus, tok: Tokenizer, log) -> None:
    # The narrowest that holds every id: a byte corpus caches at its own size, not twice it.
    dtype = np.dtype(np.uint8 if tok.vocab_size <= 1 << 8 else np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    # Build in a temporary folder and rename it into place: a crash never leaves half a cache.
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(folder.parent)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{socket.gethostname()}-{os.getpid()}-"))
    except OSError as e:
        raise CorpusError(f"cannot write the token cache in {folder.parent} ({e.strerror}); "
                          f"pass --cache-dir a writable folder") from None
    try:
        tmp.chmod(umask_mode(0o777))  # a shared cache stays readable by others, as mkdir would leave it
        n = _write_tokens(tmp / "train.bin", corpus, tok, dtype, log)
        n_val = int(n * VAL_FRACTION)
        if n_val == 0:
            raise CorpusError(f"corpus too short: {n} tokens, too few to hold out a validation split; "
                              f"pass more text")
        with open(tmp / "train.bin", "r+b") as train, open(tmp / "val.bin", "wb") as val:
            train.seek(-n_val * dtype.itemsize, os.SEEK_END)  # the last tenth is the validation split
            shutil.copyfileobj(train, val, READ_BYTES)
            train.truncate((n - n_val) * dtype.itemsize)
        meta = {"tokenizer": tok.state_dict(), "dtype": dtype.name, "tokens": n}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its cache is identical
            pass
    except OSError as e:
        raise CorpusError(f"cannot write the token cache in {folder.parent} ({e.strerror}); "
                          f"free some space or pass --cache-dir another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_builds(parent: Path) -> None:
    """Removes the build folders of this host's processes that are gone: one killed while
    tokenizing (SIGKILL, the OOM killer) leaves its folder, up to the size of its corpus.
    Another process's build in progress stays: its pid runs."""
    prefix = f".tmp-{socket.gethostname()}-"
    for tmp in parent.glob(prefix + "*"):
        pid = tmp.name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_tokens(path: Path, corpus: Corpus, tok: Tokenizer, dtype: np.dtype, log) -> int:
    """Encodes the corpus piece by piece into `path`; returns the token count."""
    count, progress = 0, _Progress(log, "tokenized", corpus.size)
    with open(path, "wb") as out:
        for piece in _pieces(corpus.blocks(), tok.cut, READ_BYTES):
            ids = tok.encode_array(piece)
            out.write(ids.astype(dtype))  # not tofile: its errors carry no errno (a full disk read "(None)")
            count += len(ids)
            progress.advance(len(piece.encode("utf-8")), f", {count:,} tokens")
    return count


def _pieces(blocks: Iterator[str], cut: re.Pattern | None, size: int) -> Iterator[str]:
    """Regroups text into pieces of at least `size` characters (but the last), each ending
    where `cut` matches (anywhere if None): there encoding piece by piece equals encoding
    the whole text."""
    text, search_from = "", size
    for block in blocks:
        text += block
        while len(text) >= size:
            match = cut.search(text, search_from) if cut else None
            if cut and not match:
                search_from = max(size, len(text) - 4)  # a match needs up to 4 characters
                break
            end = match.end() if match else len(text)
            yield text[:end]
            text, search_from = text[end:], size
    if text:
        yield text
