"""A small random Llama model written as a GGUF file: what the exact engine's tests run on.

:func:`write_tiny_llama` makes a complete model (weights of the types asked for, and a
byte-level GPT-2 vocabulary of the 256 byte tokens plus a few merges, which llama.cpp's
tokenizer loads), fast enough to create in every test run. The weights are random, so
the model predicts poorly, but every operation of the engine runs on it.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64 = 4, 5, 6, 7, 8, 9, 10


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(kind: int, value) -> bytes:
    if kind == _STRING:
        return _string(value)
    if kind == _ARRAY:
        item_kind, items = value
        body = b"".join(_value(item_kind, item) for item in items)
        return struct.pack("<IQ", item_kind, len(items)) + body
    return struct.pack({_U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?", _U64: "<Q"}[kind], value)


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-character mapping: the 256 byte tokens' texts, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            codes[byte] = chr(byte)
        else:
            codes[byte] = chr(256 + extra)
            extra += 1
    return [codes[byte] for byte in range(256)]


def _quantize_q8_0(values: np.ndarray) -> bytes:
    blocks = values.astype(np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = (amax / 127).astype(np.float16)
    inverse = np.where(d == 0, 0, 1 / d.astype(np.float32))
    q = np.clip(np.rint(blocks * inverse), -127, 127).astype(np.int8)
    out = np.empty(len(blocks), np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
    out["d"], out["qs"] = d[:, 0], q
    return out.tobytes()


def _quantize_q4_1(values: np.ndarray) -> bytes:
    blocks = values.astype(np.float32).reshape(-1, 32)
    low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    d = ((high - low) / 15).astype(np.float16)
    inverse = np.where(d == 0, 0, 1 / d.astype(np.float32))
    q = np.clip(np.rint((blocks - low) * inverse), 0, 15).astype(np.uint8)
    out = np.empty(len(blocks), np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]))
    out["d"], out["m"], out["qs"] = d[:, 0], low[:, 0].astype(np.float16), q[:, :16] | (q[:, 16:] << 4)
    return out.tobytes()


_ENCODERS = {
    0: lambda v: v.astype("<f4").tobytes(),
    1: lambda v: v.astype("<f2").tobytes(),
    3: _quantize_q4_1,
    8: _quantize_q8_0,
}


def write_tiny_llama(path: str | Path, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2,
                     n_ff: int = 128, merges: int = 24, matrix_type: int = 8, embedding_type: int = 8,
                     architecture: str = "llama", extra_tensors: dict | None = None) -> Path:
    """Write a random Llama model to ``path`` and return it.

    ``matrix_type`` / ``embedding_type``: ggml types 0 (F32), 1 (F16), 3 (Q4_1) or 8 (Q8_0).
    The vocabulary is the 256 byte tokens, ``merges`` merged pairs of common letters, and
    three special tokens (``<|endoftext|>``, BOS ``<|im_start|>``, EOS ``<|im_end|>``).
    """
    rng = np.random.default_rng(seed)
    symbols = byte_symbols()
    letters = "etaoinsrhl "
    pairs = [(a, b) for a in letters for b in letters][:merges]
    space = symbols[ord(" ")]
    merged = [(space if a == " " else a, space if b == " " else b) for a, b in pairs]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + symbols + [a + b for a, b in merged]
    token_types = [3, 3, 3] + [1] * (len(tokens) - 3)
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    keys = [
        ("general.architecture", _STRING, architecture),
        ("general.name", _STRING, "nacrith tiny test model"),
        (f"{architecture}.block_count", _U32, n_layer),
        (f"{architecture}.context_length", _U32, 2048),
        (f"{architecture}.embedding_length", _U32, n_embd),
        (f"{architecture}.feed_forward_length", _U32, n_ff),
        (f"{architecture}.attention.head_count", _U32, n_head),
        (f"{architecture}.attention.head_count_kv", _U32, n_head_kv),
        (f"{architecture}.rope.freq_base", _F32, 10000.0),
        (f"{architecture}.attention.layer_norm_rms_epsilon", _F32, 1e-5),
        (f"{architecture}.rope.dimension_count", _U32, head_dim),
        (f"{architecture}.vocab_size", _U32, n_vocab),
        ("tokenizer.ggml.model", _STRING, "gpt2"),
        ("tokenizer.ggml.pre", _STRING, "default"),
        ("tokenizer.ggml.tokens", _ARRAY, (_STRING, tokens)),
        ("tokenizer.ggml.token_type", _ARRAY, (_I32, token_types)),
        ("tokenizer.ggml.merges", _ARRAY, (_STRING, [f"{a} {b}" for a, b in merged])),
        ("tokenizer.ggml.bos_token_id", _U32, 1),
        ("tokenizer.ggml.eos_token_id", _U32, 2),
        ("tokenizer.ggml.add_bos_token", _BOOL, False),
        ("general.alignment", _U32, 32),
    ]
    kv = n_head_kv * head_dim
    tensors = [("token_embd.weight", (n_embd, n_vocab), embedding_type, rng.normal(0, 1.0, n_vocab * n_embd))]
    for layer in range(n_layer):
        scale = 1 / np.sqrt(n_embd)
        tensors += [
            (f"blk.{layer}.attn_norm.weight", (n_embd,), 0, 1 + rng.normal(0, 0.1, n_embd)),
            (f"blk.{layer}.attn_q.weight", (n_embd, n_embd), matrix_type, rng.normal(0, scale, n_embd * n_embd)),
            (f"blk.{layer}.attn_k.weight", (n_embd, kv), matrix_type, rng.normal(0, scale, n_embd * kv)),
            (f"blk.{layer}.attn_v.weight", (n_embd, kv), matrix_type, rng.normal(0, scale, n_embd * kv)),
            (f"blk.{layer}.attn_output.weight", (n_embd, n_embd), matrix_type, rng.normal(0, scale, n_embd * n_embd)),
            (f"blk.{layer}.ffn_norm.weight", (n_embd,), 0, 1 + rng.normal(0, 0.1, n_embd)),
            (f"blk.{layer}.ffn_gate.weight", (n_embd, n_ff), matrix_type, rng.normal(0, scale, n_embd * n_ff)),
            (f"blk.{layer}.ffn_up.weight", (n_embd, n_ff), matrix_type, rng.normal(0, scale, n_embd * n_ff)),
            (f"blk.{layer}.ffn_down.weight", (n_ff, n_embd), matrix_type, rng.normal(0, 1 / np.sqrt(n_ff), n_ff * n_embd)),
        ]
    tensors.append(("output_norm.weight", (n_embd,), 0, 1 + rng.normal(0, 0.1, n_embd)))
    for name, (dims, kind, values) in (extra_tensors or {}).items():
        tensors.append((name, dims, kind, values))
    return _write(Path(path), keys, tensors)


def _write(path: Path, keys: list, tensors: list, alignment: int = 32) -> Path:
    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(keys)))
    for key, kind, value in keys:
        header += _string(key) + struct.pack("<I", kind) + _value(kind, value)
    datas, offset = [], 0
    for name, dims, kind, values in tensors:
        data = _ENCODERS[kind](np.asarray(values, np.float64))
        header += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset)
        datas.append((offset, data))
        offset += len(data) + (-len(data)) % alignment
    header += bytes((-len(header)) % alignment)
    with open(path, "wb") as handle:
        handle.write(header)
        for _, data in datas:
            handle.write(data + bytes((-len(data)) % alignment))
    return path


def _splitmix(seed: int, count: int) -> np.ndarray:
    """``count`` 64-bit values of the splitmix64 sequence from ``seed``: integer arithmetic
    alone, the same on every machine and numpy version."""
    state = (np.uint64(seed) + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_weights(hyper, seed: int = 1):
    """An :class:`~nacrith.exact.weights.ExactWeights` of ``hyper``'s shape with integer
    random weights (no GGUF file): for timing and for checking implementations against each
    other on a model of a real model's size (``bench/gpu_exact.py``)."""
    from .weights import ExactWeights, Gain, Matrix

    counter = [seed]

    def draw(count: int) -> np.ndarray:
        counter[0] += 1
        return _splitmix(counter[0] * 1_000_003, count)

    def matrix(n_out: int, n_in: int) -> Matrix:
        bits = draw(n_out * n_in)
        # a sum of two uniform bytes: a rough bell over -127..127
        q = ((bits & np.uint64(0x7F)).astype(np.int64) + ((bits >> np.uint64(8)) & np.uint64(0x7F)).astype(np.int64) - 127).astype(np.int8)
        x = int(np.ceil(np.log2(np.sqrt(n_in)))) + 1  # rows of about unit gain: |w| up to ~2^-x * 2
        return Matrix(q.reshape(n_out, n_in), np.full(n_out, 16513 * 2, np.int64), np.full(n_out, 22 + x, np.int64))

    def gain(n: int) -> Gain:
        return Gain(np.full(n, 1 << 14, np.int64) + (draw(n) % np.uint64(2048)).astype(np.int64) - 1024, 14)

    h = hyper
    kv = h.n_head_kv * h.head_dim
    layers = []
    for _ in range(h.n_layer):
        layers.append({"attn_q": matrix(h.n_embd, h.n_embd), "attn_k": matrix(kv, h.n_embd), "attn_v": matrix(kv, h.n_embd),
                       "attn_output": matrix(h.n_embd, h.n_embd), "ffn_gate": matrix(h.n_ff, h.n_embd), "ffn_up": matrix(h.n_ff, h.n_embd),
                       "ffn_down": matrix(h.n_embd, h.n_ff), "attn_norm": gain(h.n_embd), "ffn_norm": gain(h.n_embd)})
    embedding = matrix(h.n_vocab, h.n_embd)
    return ExactWeights(h, embedding, embedding, gain(h.n_embd), layers)


def smollm2_shape():
    """The shape of SmolLM2-135M (the default model) as a :class:`~nacrith.exact.weights.Hyper`."""
    from .weights import Hyper

    return Hyper(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, head_dim=64, n_rot=64, n_vocab=49152, n_ctx_train=8192,
                 rope_base=100000.0, rms_eps=float(np.float32(1e-5)), bos=1)
