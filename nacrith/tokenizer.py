"""Exact tokenization: bytes to tokens and back with no byte lost.

The piece table maps every token id to the bytes it stands for, read with
``llama_token_to_piece`` into a buffer large enough for the longest piece
(llama-cpp-python's ``Llama.detokenize`` silently drops pieces over 32 bytes).

:meth:`Tokenizer.encode` accepts any byte string whose bytes all have a single-byte token
(:attr:`Tokenizer.byte_tokens`). Valid UTF-8 runs go through llama.cpp's tokenizer, and each
result is verified to join back to its run before it is trusted; a run that does not
round-trip is split until its parts do, down to single characters spelled as byte tokens.
Bytes that are not valid UTF-8 are spelled as byte tokens directly, so the model still
codes the text around them.
"""
from __future__ import annotations

import ctypes
import re

import numpy as np

from .engine import LlamaModel
from .llama import L

PIECE_BUFFER = 4096  # far above any real piece; checked per token below
CHUNK = 1 << 16  # tokenize long text in pieces of about this many bytes, cut after a newline
_INVALID_UTF8 = re.compile("[\udc80-\udcff]+")  # surrogateescape's stand-ins for invalid bytes


class Tokenizer:
    """Exact byte-level tokenization with a model's vocabulary."""

    def __init__(self, model: LlamaModel):
        self.model = model
        self.pieces: list[bytes] = self._piece_table()
        self.byte_tokens = np.full(256, -1, np.int64)  # byte value -> a token whose piece is that byte
        for token, piece in enumerate(self.pieces):
            if len(piece) == 1 and self.byte_tokens[piece[0]] < 0:
                self.byte_tokens[piece[0]] = token
        self.has_byte_token = self.byte_tokens >= 0

    def _piece_table(self) -> list[bytes]:
        buffer = ctypes.create_string_buffer(PIECE_BUFFER)
        pieces = []
        for token in range(self.model.n_vocab):
            n = L.llama_token_to_piece(self.model.vocab, token, buffer, PIECE_BUFFER, 0, False)
            if n < 0:
                raise RuntimeError(f"token {token} has a piece longer than {PIECE_BUFFER} bytes")
            pieces.append(buffer.raw[:n])
        return pieces

    def decode(self, tokens) -> bytes:
        """The bytes that ``tokens`` stand for."""
        pieces = self.pieces
        return b"".join([pieces[t] for t in tokens])

    def encode(self, data: bytes) -> list[int]:
        """Tokens whose pieces join to exactly ``data``.

        Every byte of ``data`` that is not part of valid UTF-8 must have a byte token
        (``has_byte_token``); :mod:`nacrith.segment` guarantees this for text segments.
        """
        text = data.decode("utf-8", "surrogateescape")
        tokens: list[int] = []
        position = 0
        for match in _INVALID_UTF8.finditer(text):
            self._encode_valid(text[position:match.start()].encode("utf-8"), tokens)
            for char in match.group():
                tokens.append(self._byte_token(ord(char) - 0xDC00))
            position = match.end()
        self._encode_valid(text[position:].encode("utf-8"), tokens)
        return tokens

    def _byte_token(self, byte: int) -> int:
        token = int(self.byte_tokens[byte])
        if token < 0:
            raise ValueError(f"byte 0x{byte:02x} has no single-byte token in this vocabulary")
        return token

    def _encode_valid(self, data: bytes, tokens: list[int]) -> None:
        start = 0
        while start < len(data):
            end = min(len(data), start + CHUNK)
            if end < len(data):
                cut = data.rfind(b"\n", start, end)
                end = cut + 1 if cut > start else end
                while end < len(data) and (data[end] & 0xC0) == 0x80:
                    end += 1  # never cut inside a UTF-8 character
            self._encode_verified(data[start:end], tokens)
            start = end

    def _encode_verified(self, data: bytes, tokens: list[int]) -> None:
        """Append tokens for valid UTF-8 ``data``, trusting llama.cpp only where it round-trips."""
        if not data:
            return
        candidate = self._llama_tokenize(data)
        if candidate is not None and self.decode(candidate) == data:
            tokens.extend(candidate)
            return
        text = data.decode("utf-8")
        if len(text) == 1:
            tokens.extend(self._byte_token(b) for b in data)
            return
        half = len(text) // 2
        self._encode_verified(text[:half].encode("utf-8"), tokens)
        self._encode_verified(text[half:].encode("utf-8"), tokens)

    def _llama_tokenize(self, data: bytes) -> list[int] | None:
        capacity = len(data) + 16
        out = (L.llama_token * capacity)()
        n = L.llama_tokenize(self.model.vocab, data, len(data), out, capacity, False, False)
        if n < 0:
            return None
        return list(out[:n])
