import argparse
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import data
from gpt.data import CorpusError, default_corpus_files, load_dataset, scan_corpus
from gpt.tokenizer import GPT2Tokenizer


def test_default_corpus_is_the_stdlib_source():
    files = default_corpus_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_file_is_tokenized_once_and_cached(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefghij" * 50)
    logs = []
    d = load_dataset(str(corpus), "char", str(tmp_path / "cache"), log=logs.append)
    assert len(logs) == 1 and d.tokenizer.vocab_size == 10
    assert len(d.train) + len(d.val) == 500 and len(d.val) == 50
    again = load_dataset(str(corpus), "char", str(tmp_path / "cache"), log=logs.append)
    assert len(logs) == 1, "the second load must come from the cache"
    assert np.array_equal(again.train, d.train)
    # A different tokenizer is a different cache entry.
    load_dataset(str(corpus), "byte", str(tmp_path / "cache"), log=logs.append)
    assert len(logs) == 2


def test_folder_uses_text_files_and_skips_binary(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "sub" / "b.md").write_text("world")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\x00\x01\xff")
    (tmp_path / ".hidden").write_text("secret")
    corpus = scan_corpus(str(tmp_path))
    text, what = corpus.text(), corpus.description
    assert text == "hello \nworld"
    assert "2 text files" in what and "1 non-text skipped: img.png)" in what  # named: a latin-1 .txt is skipped too


def test_folder_leaves_out_the_trainers_own_folders(tmp_path):
    """--data . with the out dir inside it: the lock, metrics and checkpoints are not corpus."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.csv").write_text("step,loss\n")
    corpus = scan_corpus(str(tmp_path), exclude=(str(tmp_path / "out"),))
    text, what = corpus.text(), corpus.description
    assert text == "hello" and "1 text files" in what


def test_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfabc")
    assert scan_corpus(str(tmp_path / "bom.txt")).text() == "abc"


@pytest.mark.timeout(30)  # reopening the drained pipe, rather than spooling it, blocks for ever
def test_fifo_is_read_as_a_file(tmp_path):
    """A process substitution (train.py --data <(cat a b)) is a pipe, not a folder."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("from a pipe"))
    writer.start()
    text = scan_corpus(str(fifo)).text()
    writer.join()
    assert text == "from a pipe"


def test_batches_are_shifted_windows(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(chr(ord("a") + i % 26) for i in range(2000)))
    d = load_dataset(str(corpus), "char", str(tmp_path / "cache"))
    x, y = d.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 26, y)  # the corpus is the alphabet repeated
    x2, _ = d.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
        (b"caf\xe9 latin-1", "not UTF-8 text"),
        (b"\x7fELF\x00\x00binary", "looks binary"),
    ],
)
def test_bad_corpus_files(tmp_path, content, message):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_dataset(str(corpus), "char", str(tmp_path / "cache"))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        scan_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no UTF-8 text files"):
        scan_corpus(str(tmp_path / "empty"))


def test_corpus_shorter_than_a_block(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("short text " * 5)
    d = load_dataset(str(corpus), "char", str(tmp_path / "cache"))
    with pytest.raises(CorpusError, match="corpus too short.*--block-size"):
        d.check_block_size(64)


def test_a_split_exactly_one_window_long(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(chr(ord("a") + i % 26) for i in range(2000)))
    d = load_dataset(str(corpus), "char", str(tmp_path / "cache"))
    T = len(d.val) - 1  # the only window: all of val
    x, y = d.batch("val", 64, T, torch.Generator().manual_seed(0))
    val = torch.from_numpy(np.asarray(d.val, dtype=np.int64))
    assert (x == val[:-1]).all() and (y == val[1:]).all()


def test_default_is_refused_when_a_path_named_default_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("my own corpus")
    with pytest.raises(CorpusError, match="pass ./default for that path"):
        scan_corpus("default")
    assert scan_corpus("./default").text() == "my own corpus"


def test_a_corpus_too_short_for_a_validation_split_is_a_clear_error(tmp_path):
    (tmp_path / "c.txt").write_text("hello wor")
    with pytest.raises(CorpusError, match="corpus too short: 9 tokens"):
        load_dataset(str(tmp_path / "c.txt"), "char", str(tmp_path / "cache"), log=lambda *a: None)
    assert not [p for p in (tmp_path / "cache").glob("*") if not p.name.startswith(".")]  # no entry left behind


def test_a_cache_built_by_another_run_meanwhile_is_read_not_rebuilt(tmp_path, monkeypatch):
    """Two runs started on one corpus: the second saw no cache, then the first renamed its
    build into place. The second used to take that cache for a damaged one, delete it (under
    the first run's feet) and tokenize again; under the build lock it now reads it."""
    corpus, cache = tmp_path / "c.txt", str(tmp_path / "cache")
    corpus.write_text("abcdefghij" * 50)
    load_dataset(str(corpus), "char", cache, log=lambda *a: None)
    read_meta, looks = data._read_meta, []

    def read_meta_late(folder):  # the first look came just before the other run's rename
        looks.append(folder)
        return None if len(looks) == 1 else read_meta(folder)

    monkeypatch.setattr(data, "_read_meta", read_meta_late)
    logs = []
    d = load_dataset(str(corpus), "char", cache, log=logs.append)
    assert not [m for m in logs if m.startswith(("tokenizing", "rebuilding"))], logs
    assert len(d.train) + len(d.val) == 500


def test_a_second_run_waits_for_the_first_to_tokenize(tmp_path):
    corpus, cache = tmp_path / "c.txt", tmp_path / "cache"
    corpus.write_text("abcdefghij" * 50)
    scanned = data.scan_corpus(str(corpus))
    folder = cache / f"{scanned.digest}-char"
    logs, results = [], []
    with data._build_lock(folder, log=None):  # the first run, tokenizing
        second = threading.Thread(target=lambda: results.append(load_dataset(str(corpus), "char", str(cache),
                                                                             log=logs.append)), daemon=True)
        second.start()
        for _ in range(500):
            if any("waiting for another process" in m for m in logs):
                break
            time.sleep(0.01)
        data._build_cache(folder, scanned, "char", None, log=lambda *a: None)
    second.join(timeout=60)
    assert not second.is_alive(), "the second run still waits: the lock was not released"
    assert any("waiting for another process" in m for m in logs)
    assert not any(m.startswith("tokenizing") for m in logs), logs
    assert len(results[0].train) + len(results[0].val) == 500


@pytest.mark.parametrize("corpus, tokenizer", [("b.txt", "char"), ("a.txt", "byte")],
                         ids=["another-corpus", "another-tokenizer"])
def test_a_run_building_another_cache_entry_does_not_wait(tmp_path, corpus, tokenizer):
    """The lock is one cache entry's: while a run tokenizes a.txt with the char tokenizer, a
    run on another corpus or tokenizer builds its own at once, not after the first's."""
    cache = tmp_path / "cache"
    for name, text in (("a.txt", "abcdefghij" * 50), ("b.txt", "klmnopqrst" * 50)):
        (tmp_path / name).write_text(text)
    folder = cache / f"{data.scan_corpus(str(tmp_path / 'a.txt')).digest}-char"
    logs, results = [], []
    with data._build_lock(folder, log=None):  # the first run, tokenizing
        other = threading.Thread(target=lambda: results.append(load_dataset(str(tmp_path / corpus), tokenizer,
                                                                            str(cache), log=logs.append)), daemon=True)
        other.start()
        other.join(timeout=20)
        assert results, f"the other run waited for the first: {logs}"
    assert not any("waiting for another process" in m for m in logs), logs


def test_the_build_lock_opens_for_other_users(tmp_path):
    """On a --cache-dir users share, another user's run opens the lock file read-only: it is
    readable by all, as far as the umask lets it be."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefghij" * 50)
    umask = os.umask(0o022)
    try:
        load_dataset(str(corpus), "char", str(tmp_path / "cache"), log=lambda *a: None)
    finally:
        os.umask(umask)
    (lock,) = (tmp_path / "cache").glob(".*.lock")
    assert lock.stat().st_mode & 0o444 == 0o444


@pytest.mark.parametrize("damage", ["truncated", "grown", "no meta", "empty meta"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefghij" * 50)
    whole = load_dataset(str(corpus), "char", str(tmp_path / "cache"), log=lambda *a: None)
    train_ids, val_ids = np.array(whole.train), np.array(whole.val)  # copies: the memmaps see the damage
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    if damage == "truncated":
        with open(entry / "train.bin", "r+b") as f:
            f.truncate(100)
    elif damage == "grown":  # more tokens than its meta.json counts
        with open(entry / "train.bin", "ab") as f:
            f.write(b"\0" * 10)
    elif damage == "no meta":
        (entry / "meta.json").unlink()
    else:  # what a power loss can leave: the folder's rename kept, its meta.json's text never synced
        (entry / "meta.json").write_text("")
    logs = []
    again = load_dataset(str(corpus), "char", str(tmp_path / "cache"), log=logs.append)
    assert any("rebuilding the damaged cache" in line for line in logs)
    assert np.array_equal(again.train, train_ids) and np.array_equal(again.val, val_ids)


def test_an_unwritable_cache_dir_is_a_clear_error(tmp_path):
    (tmp_path / "c.txt").write_text("abcdefghij" * 50)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CorpusError, match="cannot write the token cache .* pass --cache-dir a writable folder"):
        load_dataset(str(tmp_path / "c.txt"), "char", str(tmp_path / "file" / "cache"), log=lambda *a: None)


@pytest.mark.parametrize("tokenizer, itemsize", [("byte", 1), ("char", 1), ("gpt2", 2)])
def test_the_cache_takes_the_narrowest_id_type(tmp_path, tokenizer, itemsize):
    (tmp_path / "c.txt").write_text("abcdefghij" * 50 + "é")
    d = load_dataset(str(tmp_path / "c.txt"), tokenizer, str(tmp_path / "cache"), log=lambda *a: None)
    assert d.train.dtype.itemsize == itemsize
    assert d.tokenizer.decode(np.concatenate([d.train, d.val]).tolist()).endswith("abcdefghijé")


@pytest.fixture
def small_reads(monkeypatch):
    """Blocks of 61 bytes: multi-byte characters, CRLFs and files all straddle block edges."""
    monkeypatch.setattr(data, "READ_BYTES", 61)


@pytest.mark.parametrize("tokenizer", ["byte", "char", "gpt2"])
def test_a_corpus_tokenized_a_block_at_a_time_has_the_ids_of_the_whole_text(tmp_path, small_reads, tokenizer):
    texts = [
        "\ufeffFirst Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 3,
        "caf\u00e9 \u00fcber na\u00efve \u2014 \U0001f600 emoji\r\nand CRLF\r\nlines\r\n" * 4,
        "x = 1\n    indented\n\tdone<|endoftext|>next\n",
    ]
    for i, text in enumerate(texts):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"{i}.txt").write_bytes(text.encode("utf-8"))
    d = load_dataset(str(tmp_path / "corpus"), tokenizer, str(tmp_path / "cache"), log=lambda *a: None)
    whole = "\n".join(t.removeprefix("\ufeff") for t in texts)
    assert np.concatenate([d.train, d.val]).tolist() == d.tokenizer.encode(whole)


def test_tokenizing_holds_a_block_not_the_corpus(tmp_path, monkeypatch):
    """A corpus far larger than memory tokenizes: what is held does not grow with the corpus."""
    monkeypatch.setattr(data, "READ_BYTES", 1 << 16)
    (tmp_path / "c.txt").write_text("to be or not to be, that is the question\n" * 200_000)  # 8 MB
    for tokenizer in ("byte", "char"):
        tracemalloc.start()
        load_dataset(str(tmp_path / "c.txt"), tokenizer, str(tmp_path / "cache"), log=lambda *a: None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 << 20, f"{tokenizer}: {peak / 2**20:.1f} MB held while tokenizing 8 MB"


def test_an_invalid_byte_past_the_first_block_is_named_by_its_offset(tmp_path, small_reads):
    (tmp_path / "c.txt").write_bytes("\u00e9".encode() * 100 + b"\xff" + b"tail")
    with pytest.raises(CorpusError, match=r"not UTF-8 text \(invalid byte at offset 200\)"):
        scan_corpus(str(tmp_path / "c.txt"))


def test_a_file_changed_after_the_scan_is_a_clear_error(tmp_path):
    (tmp_path / "c.txt").write_text("abcdefghij" * 50)
    corpus = scan_corpus(str(tmp_path / "c.txt"))
    (tmp_path / "c.txt").write_text("abcdefghij" * 51)
    with pytest.raises(CorpusError, match="changed while it was being read; run again"):
        corpus.text()


def test_an_unreadable_file_in_a_folder_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    blocks = data._blocks

    def denied(source):
        if source.path.name == "b.txt":
            raise PermissionError(13, "Permission denied")
        return blocks(source)

    monkeypatch.setattr(data, "_blocks", denied)
    with pytest.raises(CorpusError, match=r"cannot read .*b.txt \(Permission denied\); check its permissions"):
        scan_corpus(str(tmp_path))


def test_long_passes_over_a_corpus_say_how_far_they_are(tmp_path, monkeypatch):
    """Reading (every start hashes the corpus) and tokenizing report progress when slow."""
    clock = iter(range(0, 10_000, 10))  # every look at the clock is 10 s later
    monkeypatch.setattr(data.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(data, "READ_BYTES", 1000)
    (tmp_path / "c.txt").write_text("abcdefghij\n" * 1000)
    logs = []
    load_dataset(str(tmp_path / "c.txt"), "byte", str(tmp_path / "cache"), log=logs.append)
    assert any(line.startswith("  read ") and "of 0.00 GB" in line for line in logs), logs
    assert any(line.startswith("  tokenized ") and " tokens" in line for line in logs), logs


def test_a_validation_split_shorter_than_a_window_is_refused(tmp_path):
    (tmp_path / "c.txt").write_text("".join(chr(97 + i % 26) for i in range(600)))
    d = load_dataset(str(tmp_path / "c.txt"), "char", str(tmp_path / "cache"), log=lambda *a: None)
    assert len(d.train) >= 65 > len(d.val)
    with pytest.raises(CorpusError, match="corpus too short: 540 train / 60 val tokens"):
        d.check_block_size(64)


def test_gpt2_pieces_end_at_its_cuts_and_stay_bounded():
    """Tokenizing a gpt2 corpus holds one piece at a time: pieces are cut, each (but the
    last) at least the piece size and ending where GPT-2's pre-tokenizer splits."""
    text = "ab\ncd\n" * 100
    pieces = list(data._pieces((text[i:i + 61] for i in range(0, len(text), 61)), GPT2Tokenizer.cut, 61))
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(len(p) >= 61 and not p[-1].isspace() and q[0].isspace() for p, q in zip(pieces, pieces[1:]))


@pytest.mark.parametrize("text", [
    "A paragraph on one line, as markdown and exports write them.\n\n",  # no lone newline
    "one long line of words and no line break at all ",
    "CRLF paragraphs, one line each.\r\n\r\n",
])
def test_gpt2_pieces_stay_bounded_in_text_without_lone_newlines(tmp_path, text):
    """Only lone newlines were cuts: a 1 GB corpus of one-line paragraphs (or one line) was
    held, and encoded, whole. Spaces are cuts too; the ids are still those of the whole text."""
    text = text * 200
    pieces = list(data._pieces((text[i:i + 61] for i in range(0, len(text), 61)), GPT2Tokenizer.cut, 61))
    assert "".join(pieces) == text and max(map(len, pieces)) < 2 * 61
    tok = GPT2Tokenizer()
    assert [t for p in pieces for t in tok.encode(p)] == tok.encode(text)
    assert tok.encode_array(text, chunk_chars=97).tolist() == tok.encode(text)


def test_the_default_corpus_leaves_out_files_it_cannot_read(monkeypatch):
    blocks, denied = data._blocks, []

    def some_denied(source):
        if len(denied) < 3:
            denied.append(source.path)
            raise PermissionError(13, "Permission denied")
        return blocks(source)

    monkeypatch.setattr(data, "_blocks", some_denied)
    corpus = scan_corpus(None)
    assert len(corpus.sources) == len(default_corpus_files()) - 3
    assert not set(denied) & {s.path for s in corpus.sources}


def test_a_pipe_is_spooled_to_disk_not_held(tmp_path, monkeypatch):
    """--data <(zcat big.gz): the pipe's text goes to an unnamed file in the cache folder,
    so memory does not grow with it; the tokens are those of the text."""
    monkeypatch.setattr(data, "READ_BYTES", 1 << 16)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    raw = b"to be or not to be, that is the question\n" * 200_000  # 8 MB, made before tracing
    writer = threading.Thread(target=lambda: fifo.write_bytes(raw))
    writer.start()
    tracemalloc.start()
    d = load_dataset(str(fifo), "byte", str(tmp_path / "cache"), log=lambda *a: None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    writer.join()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MB held while reading an 8 MB pipe"
    assert len(d.train) + len(d.val) == len(raw)
    # The cache entry (and its build's lock file), no leftover spool file.
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]) == 1


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_text_is_named_with_its_fix(tmp_path, encoding):
    """Windows PowerShell's `>` writes UTF-16 with a BOM: it is not "binary", and the latin1
    conversion the generic message suggested would turn CJK text into mojibake."""
    bom = {"utf-16-be": b"\xfe\xff"}.get(encoding, b"")
    (tmp_path / "c.txt").write_bytes(bom + "日本語のテキスト hello".encode(encoding))
    family = encoding[:6]
    with pytest.raises(CorpusError, match=f"is {family.upper()} text, not UTF-8; .*iconv -f {family} -t utf-8"):
        scan_corpus(str(tmp_path / "c.txt"))


def test_a_symlinked_folder_inside_the_corpus_is_read(tmp_path):
    """A link to a folder was silently left out (not even counted), while a link to a file
    was read; a link to an ancestor is read once, not followed round a loop."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("mine")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text("linked")
    (tmp_path / "corpus" / "books").symlink_to(tmp_path / "books")
    (tmp_path / "corpus" / "loop").symlink_to(tmp_path / "corpus")
    corpus = scan_corpus(str(tmp_path / "corpus"))
    assert corpus.text() == "mine\nlinked" and "2 text files" in corpus.description


def test_a_full_disk_names_the_reason(tmp_path):
    """numpy's tofile raises an OSError with no errno: a full disk read "(None)"."""
    (tmp_path / "c.txt").write_text("abcdefghij" * 20_000)
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # writes past 100 kB fail, as on a full disk\n"
        "from gpt.data import CorpusError, load_dataset\n"
        "try:\n"
        "    load_dataset(sys.argv[1], 'byte', sys.argv[2], log=lambda *a: None)\n"
        "except CorpusError as e:\n"
        "    print(e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.txt"), str(tmp_path / "cache")],
                         cwd=root, capture_output=True, text=True, timeout=120).stdout
    assert "cannot write the token cache" in out and "(File too large); free some space" in out, out


def test_an_unreadable_folder_in_the_corpus_is_a_clear_error(tmp_path, monkeypatch):
    """A folder that cannot be listed was silently left out, an unreadable file not."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("world")
    scandir = os.scandir

    def denied(p="."):
        if os.fspath(p).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return scandir(p)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(CorpusError, match=r"cannot read folder .*sub \(Permission denied\); check its permissions"):
        scan_corpus(str(tmp_path))


def test_a_killed_build_leaves_no_folder_behind(tmp_path):
    """A process killed while tokenizing (SIGKILL, the OOM killer) left its hidden build folder,
    up to the corpus's size, in the cache for good. The next build removes it; a build of a
    process that still runs (another trainer's, in progress) stays."""
    import socket

    (tmp_path / "c.txt").write_text("some text to tokenize " * 100)
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = (cache / f".tmp-{socket.gethostname()}-{pid}-x1y2" for pid in (done.stdout.strip(), os.getpid()))
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "train.bin").write_bytes(b"\0" * 1000)
    load_dataset(str(tmp_path / "c.txt"), "byte", str(cache), log=lambda *a: None)
    assert not dead.exists() and live.exists()


def test_a_file_cut_off_inside_a_character_is_not_utf8(tmp_path):
    """An interrupted copy can end halfway through a multi-byte character: not text to train on."""
    (tmp_path / "c.txt").write_bytes("hello caf\u00e9".encode()[:-1])
    with pytest.raises(CorpusError, match=r"not UTF-8 text \(invalid byte at offset 9\)"):
        scan_corpus(str(tmp_path / "c.txt"))


def test_a_hidden_folder_is_not_read(tmp_path):
    """--data on a checkout: .git's config, HEAD and hook samples are text, but not corpus."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n")
    corpus = scan_corpus(str(tmp_path))
    assert corpus.text() == "hello" and "1 text files" in corpus.description


def test_a_link_into_the_trainers_own_folders_is_not_read(tmp_path):
    """A symlinked file or folder that leads into the out dir is left out as the out dir is."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "out" / "plots").mkdir(parents=True)
    (tmp_path / "out" / "metrics.csv").write_text("step,loss\n")
    (tmp_path / "out" / "plots" / "notes.txt").write_text("a note")
    (tmp_path / "log.csv").symlink_to(tmp_path / "out" / "metrics.csv")
    (tmp_path / "plots").symlink_to(tmp_path / "out" / "plots")
    corpus = scan_corpus(str(tmp_path), exclude=(str(tmp_path / "out"),))
    assert corpus.text() == "hello" and "1 text files" in corpus.description


@pytest.mark.parametrize("n, named", [(3, "a.bin, b.bin, c.bin)"), (4, "a.bin, b.bin, c.bin, ...)")])
def test_skipped_files_are_named_up_to_three(tmp_path, n, named):
    (tmp_path / "t.txt").write_text("hello")
    for name in "abcd"[:n]:
        (tmp_path / f"{name}.bin").write_bytes(b"\x00\x01")
    assert scan_corpus(str(tmp_path)).description.endswith(f"{n} non-text skipped: {named}")


def test_the_block_size_check_admits_a_split_of_exactly_one_window(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(chr(ord("a") + i % 26) for i in range(2000)))
    d = load_dataset(str(corpus), "char", str(tmp_path / "cache"))
    d.check_block_size(len(d.val) - 1)  # one window: block_size inputs and the target after them
    with pytest.raises(CorpusError, match=f"{len(d.val)} val tokens, but one window needs {len(d.val) + 1}"):
        d.check_block_size(len(d.val))


def test_a_char_vocabulary_past_65536_keeps_every_id(tmp_path):
    """65537 distinct characters need ids past uint16's range: the cache must hold them whole."""
    chars = [chr(c) for c in range(0x21, 0x1_2000) if not 0xD800 <= c <= 0xDFFF][:65537]
    text = "".join(reversed(chars))
    (tmp_path / "c.txt").write_text(text)
    d = load_dataset(str(tmp_path / "c.txt"), "char", str(tmp_path / "cache"), log=lambda *a: None)
    assert d.tokenizer.vocab_size == 65537
    ids = np.concatenate([d.train, d.val]).tolist()
    assert d.tokenizer.decode(ids) == text


def test_a_corpus_cached_with_its_own_characters_is_encoded_again_with_the_weights(tmp_path):
    """A char model fine-tuned on a corpus an earlier run cached with the corpus's own (smaller)
    vocabulary: its ids must be the weights' vocabulary's, not that cache's."""
    (tmp_path / "c.txt").write_text("bd" * 100)
    cache = str(tmp_path / "cache")
    own = load_dataset(str(tmp_path / "c.txt"), "char", cache, log=lambda *a: None)
    assert own.tokenizer.chars == "bd" and set(own.train.tolist()) == {0, 1}
    wider = load_dataset(str(tmp_path / "c.txt"), "char", cache, log=lambda *a: None, chars="dcba")
    assert wider.tokenizer.chars == "abcd" and set(wider.train.tolist()) == {1, 3}


def test_a_cache_entry_is_readable_as_the_umask_allows(tmp_path):
    """A shared --cache-dir: others read the tokens, as with a folder mkdir made (not mkdtemp's 0700)."""
    (tmp_path / "c.txt").write_text("hello world " * 20)
    old = os.umask(0o022)
    try:
        load_dataset(str(tmp_path / "c.txt"), "char", str(tmp_path / "cache"), log=lambda *a: None)
    finally:
        os.umask(old)
    (entry,) = (tmp_path / "cache").glob("*-char")
    assert entry.stat().st_mode & 0o777 == 0o755


def test_data_default_names_the_built_in_corpus(tmp_path, monkeypatch):
    """--data default (what a run on the built-in corpus saves for its resume) is that corpus,
    not a path ./default that does not exist."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "default_corpus_files", lambda: [Path(argparse.__file__)])
    corpus = scan_corpus("default")
    assert corpus.text() == Path(argparse.__file__).read_text() and "standard library" in corpus.description


def test_a_byte_order_mark_inside_the_text_is_a_character(tmp_path, small_reads):
    """U+FEFF is a byte-order mark only where a file starts; inside the text (here just where a
    read block starts) it is a zero-width no-break space, kept like any other character."""
    text = "a" * 60 + "\ufeff" + "b"  # the mark's 3 bytes straddle the first 61-byte block
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    assert scan_corpus(str(tmp_path / "c.txt")).text() == text


def test_a_blank_file_in_a_folder_of_text_is_read(tmp_path):
    """A corpus is empty when all of it is blank, not when its last file is."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("\n\n")
    assert scan_corpus(str(tmp_path)).text() == "hello\n\n\n"


def test_a_folder_is_read_in_one_order_whatever_order_it_is_listed_in(tmp_path, monkeypatch):
    """A folder reached twice (by a link and by its own name) is read where the sorted walk
    first meets it, so the corpus (and its cache key) is the same on every file system."""
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "x.txt").write_text("x")
    (tmp_path / "m.txt").write_text("m")
    (tmp_path / "a").symlink_to(tmp_path / "z")
    scandir, texts = os.scandir, set()

    class Listing:  # os.walk enters a listing as a context and takes its entries with next()
        def __init__(self, entries):
            self.entries = iter(entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def __next__(self):
            return next(self.entries)

    def listed(reverse):
        def scan(p="."):
            with scandir(p) as entries:
                return Listing(sorted(entries, key=lambda e: e.name, reverse=reverse))
        return scan

    for reverse in (False, True):
        monkeypatch.setattr(os, "scandir", listed(reverse))
        texts.add(scan_corpus(str(tmp_path)).text())
    assert texts == {"x\nm"}  # a/x.txt, then m.txt


def test_two_weights_vocabularies_on_one_corpus_each_get_their_own_ids(tmp_path):
    """Two char models fine-tuned on one corpus: each is encoded with its own vocabulary, not
    with the one the other cached."""
    (tmp_path / "c.txt").write_text("bd" * 100)
    cache = str(tmp_path / "cache")
    for chars, ids in (("abcd", {1, 3}), ("bdxy", {0, 1})):
        d = load_dataset(str(tmp_path / "c.txt"), "char", cache, log=lambda *a: None, chars=chars)
        assert d.tokenizer.chars == chars and set(d.train.tolist()) == ids
