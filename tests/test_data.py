import os
import threading

import numpy as np
import pytest
import torch

from gpt.data import CorpusError, default_corpus_files, load_dataset, read_corpus


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
    text, what = read_corpus(str(tmp_path))
    assert text == "hello \nworld"
    assert "2 text files" in what and "1 non-text skipped" in what


def test_folder_leaves_out_the_trainers_own_folders(tmp_path):
    """--data . with the out dir inside it: the lock, metrics and checkpoints are not corpus."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.csv").write_text("step,loss\n")
    text, what = read_corpus(str(tmp_path), exclude=(str(tmp_path / "out"),))
    assert text == "hello" and "1 text files" in what


def test_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfabc")
    assert read_corpus(str(tmp_path / "bom.txt"))[0] == "abc"


def test_fifo_is_read_as_a_file(tmp_path):
    """A process substitution (train.py --data <(cat a b)) is a pipe, not a folder."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("from a pipe"))
    writer.start()
    text, _ = read_corpus(str(fifo))
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
        read_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no UTF-8 text files"):
        read_corpus(str(tmp_path / "empty"))


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
        read_corpus("default")
    assert read_corpus("./default")[0] == "my own corpus"


def test_a_corpus_too_short_for_a_validation_split_is_a_clear_error(tmp_path):
    (tmp_path / "c.txt").write_text("hello wor")
    with pytest.raises(CorpusError, match="corpus too short: 9 tokens"):
        load_dataset(str(tmp_path / "c.txt"), "char", str(tmp_path / "cache"), log=lambda *a: None)
    assert not [p for p in (tmp_path / "cache").glob("*") if not p.name.startswith(".")]  # no entry left behind


@pytest.mark.parametrize("damage", ["truncated", "no meta"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefghij" * 50)
    whole = load_dataset(str(corpus), "char", str(tmp_path / "cache"), log=lambda *a: None)
    train_ids, val_ids = np.array(whole.train), np.array(whole.val)  # copies: the memmaps see the damage
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    if damage == "truncated":
        with open(entry / "train.bin", "r+b") as f:
            f.truncate(100)
    else:
        (entry / "meta.json").unlink()
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
