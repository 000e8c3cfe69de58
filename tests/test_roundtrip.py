"""Every kind of input comes back byte for byte, through the model where it is text."""
from __future__ import annotations

import random

import pytest

from nacrith import container as fmt
from nacrith import pipeline
from nacrith.settings import LEVELS

from .conftest import SMALL, sparse_binary

PROSE = (
    b"Alice was beginning to get very tired of sitting by her sister on the bank, and of "
    b"having nothing to do: once or twice she had peeped into the book her sister was reading, "
    b"but it had no pictures or conversations in it, 'and what is the use of a book,' thought "
    b"Alice 'without pictures or conversations?'\n"
)

CASES = {
    "empty": b"",
    "one byte": b"x",
    "ascii": PROSE,
    "crlf": PROSE.replace(b"\n", b"\r\n") * 2,
    "space runs": b"begin" + b" " * 300 + b"middle\t\t\t" + b" " * 77 + b"end\n" + b"\n" * 40,
    "emoji and cjk": "Emoji 😀🎉👍🏽 and 中文字符，日本語のテキスト，한국어 문장 mixed with English text. ".encode() * 3,
    "special tokens": b"<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|endoftext|><|im_start|>user\n" * 3,
    "latin-1 prose": "Le café était déjà fermé à cause de la grève; où est la clé? ".encode("latin-1") * 4,
    "invalid utf-8": b"valid text \xff\xfe\xc0\x80 then \xed\xa0\x80 surrogates, \xf1 lone lead and more valid text here. " * 3,
    "random bytes": random.Random(7).randbytes(3000),
    "mixed text and binary": PROSE + random.Random(8).randbytes(700) + PROSE + bytes(300) + PROSE,
    "rare 4-byte chars": "\U00041234 plane-4 characters \U00050000 amid ASCII text long enough to be text. ".encode() * 2,
}


@pytest.mark.parametrize("name", CASES)
def test_roundtrip_through_model(roundtrip, name):
    """fallback=False: text goes through the model even where zstd would be smaller."""
    roundtrip(CASES[name], fallback=False, **SMALL)


@pytest.mark.parametrize("name", ["empty", "one byte", "ascii", "random bytes", "mixed text and binary"])
def test_roundtrip_default_settings(roundtrip, name):
    roundtrip(CASES[name])


def test_text_is_coded_by_the_model(roundtrip):
    blob = roundtrip(CASES["latin-1 prose"], fallback=False, **SMALL)
    parsed = fmt.parse(blob)
    block = parsed.blocks[0]
    assert block.kind == fmt.MODEL
    # the stray Latin-1 bytes that have byte tokens stay inside the text the model codes
    assert block.text_length >= 0.9 * block.raw_length


@pytest.mark.slow
def test_several_blocks_and_streams(roundtrip):
    data = (CASES["ascii"] + CASES["emoji and cjk"]) * 3
    blob = roundtrip(data, fallback=False, block_size=500, streams=3, **SMALL)
    parsed = fmt.parse(blob)
    assert len(parsed.blocks) == -(-len(data) // 500)
    assert max(len(block.stream_tokens) for block in parsed.blocks) == 3


def test_window_slides(roundtrip):
    """Streams much longer than the window: positions wrap through several slides."""
    blob = roundtrip(CASES["ascii"] * 2, fallback=False, streams=1, ctx=16, slide=4, min_stream_tokens=1)
    assert fmt.parse(blob).blocks[0].stream_tokens[0] > 4 * 16


@pytest.mark.slow
@pytest.mark.parametrize("level", [1, 9])
def test_levels_decode_without_being_named(roundtrip, level):
    """The fastest and the smallest level: the container records the layout the level chose
    (level 1's 512-token window slides here), so decoding needs no flag."""
    blob = roundtrip(PROSE * 8, fallback=False, level=level)
    chosen = pipeline.Settings(level=level)
    parsed = fmt.parse(blob)
    assert (parsed.header.model.ctx, parsed.header.model.slide) == (chosen.ctx, chosen.slide)
    assert tuple(parsed.blocks[0].stream_tokens) == (parsed.blocks[0].n_tokens,)  # one stream: under two floors of tokens
    assert parsed.blocks[0].n_tokens > LEVELS[1].ctx


def test_binary_only_needs_no_model(roundtrip):
    blob = roundtrip(random.Random(1).randbytes(5000))
    parsed = fmt.parse(blob)
    assert parsed.header.model is None
    assert all(block.kind in (fmt.STORED, fmt.ZSTD) for block in parsed.blocks)


def test_binary_takes_xz_when_smaller(roundtrip):
    import zstandard

    data = sparse_binary()
    blob = roundtrip(data)
    assert [block.kind for block in fmt.parse(blob).blocks] == [fmt.XZ]
    assert len(blob) < len(zstandard.ZstdCompressor(level=19).compress(data))


@pytest.mark.slow
def test_binary_segments_take_xz_when_smaller(roundtrip):
    blob = roundtrip(PROSE * 2 + sparse_binary() + PROSE * 2, fallback=False)
    block = fmt.parse(blob).blocks[0]
    assert block.kind == fmt.MODEL and block.binary_codec == fmt.BINARY_XZ


NOVEL = (
    b"It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    b"must be in want of a wife. However little known the feelings or views of such a man may be "
    b"on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    b"surrounding families, that he is considered the rightful property of some one or other of "
    b"their daughters. \"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that "
    b"Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned "
    b"she; \"for Mrs. Long has just been here, and she told me all about it.\"\n"
)


def test_model_beats_zstd_on_prose(roundtrip):
    import zstandard

    blob = roundtrip(NOVEL)
    assert fmt.parse(blob).blocks[0].kind == fmt.MODEL
    assert len(blob) < len(zstandard.ZstdCompressor(level=19).compress(NOVEL))


@pytest.mark.slow
def test_never_much_larger_than_zstd(roundtrip):
    """Repetitive text where zstd wins: the file falls back to a model-free container. (Prose
    repeated, the case here until format 5, is now the model's: 117 bytes against zstd's 194,
    once the header no longer spends 162 bytes on the model section.)"""
    import zstandard

    data = b"0123456789" * 300
    blob = roundtrip(data)
    assert len(blob) <= len(zstandard.ZstdCompressor(level=19).compress(data)) + 64
    assert fmt.parse(blob).header.model is None
