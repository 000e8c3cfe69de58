"""A Llama-architecture GGUF model read into the exact engine's integer form.

Every weight matrix becomes int8 rows with one scale per row (docs/exact-engine.md,
"Weights"): the weights are first taken exactly as the file stores them (Q8_0 ``d * q``,
Q4_0 ``d * (q - 8)``, Q4_1 ``d * q + m``, F16, BF16, F32: each weight an exact binary
fraction), then for row ``r`` with largest magnitude ``a_r = f * 2^x`` (``0.5 <= f < 1``)
the scale is ``m_r * 2^-e_r`` with ``e_r = 22 - x`` and ``m_r = ceil(a_r * 2^e_r / 127)``,
and each weight is ``round(w * 2^e_r / m_r)`` (halves away from zero), in -127..127. Norm
gains become integers ``round(g * 2^F_g)`` of 15 bits. All of it is exact arithmetic on
the file's values, so every machine derives the same integers.

Models of another architecture, with biases, RoPE scaling or tensor types other than those
above are refused with :class:`~nacrith.errors.UnsupportedModelError`, one line that says why.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UnsupportedModelError
from ..gguf import GGUFFormatError, read_metadata
from ..requantize import read_layout

WEIGHT_BITS = 127  # the largest int8 weight
SCALE_EXPONENT = 22  # e_r = SCALE_EXPONENT - x: m_r lies in [16513, 33026]
GAIN_BITS = 15  # norm gains: |G| <= 2^15

F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", BF16: "BF16"}
_BLOCK_DTYPES = {
    Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
}
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYER_NORMS = ("attn_norm", "ffn_norm")


@dataclass(frozen=True)
class Matrix:
    """An int8 weight matrix: row ``r`` is ``q[r] * m[r] * 2^-e[r]``."""

    q: np.ndarray  # int8 [n_out, n_in]
    m: np.ndarray  # int64 [n_out]
    e: np.ndarray  # int64 [n_out]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return self.q.shape


@dataclass(frozen=True)
class Gain:
    """RMSNorm gains as integers: ``g_i = G[i] * 2^-bits``."""

    G: np.ndarray  # int64 [n]
    bits: int


@dataclass(frozen=True)
class Hyper:
    """The shape of a Llama model, read from its GGUF header."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float  # float32 value
    rms_eps: float  # float32 value
    bos: int


@dataclass
class ExactWeights:
    """Everything the exact engine computes with: the shape, the layers' integer weights,
    the output norm and the (possibly tied) output matrix."""

    hyper: Hyper
    embedding: Matrix
    output: Matrix
    output_norm: Gain
    layers: list[dict] = field(default_factory=list)  # per layer: Matrix per LAYER_MATRICES name, Gain per LAYER_NORMS name


def _f16_exact(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float64)  # every float16 is a float64 exactly


def dequantize(kind: int, raw: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` weights a tensor of ggml type ``kind`` stores, as exact float64."""
    if kind == F32:
        return raw.view("<f4")[:n].astype(np.float64)
    if kind == F16:
        return raw.view("<f2")[:n].astype(np.float64)
    if kind == BF16:
        return (raw.view("<u2")[:n].astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    blocks = raw.view(_BLOCK_DTYPES[kind])
    d = _f16_exact(blocks["d"])[:, None]
    if kind == Q8_0:
        return (d * blocks["qs"].astype(np.float64)).reshape(-1)[:n]
    nibbles = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float64)
    if kind == Q4_0:
        return (d * (nibbles - 8)).reshape(-1)[:n]
    # Q4_1: d * q + m with d, m float16: exact as integers of 2^-24 (every float16 is one)
    scaled = np.rint(d * 2.0**24).astype(np.int64) * nibbles.astype(np.int64) + np.rint(_f16_exact(blocks["m"])[:, None] * 2.0**24).astype(np.int64)
    return np.ldexp(scaled.astype(np.float64), -24).reshape(-1)[:n]  # < 2^45: exact in float64


def quantize_rows(weights: np.ndarray) -> Matrix:
    """Rows of exact float64 weights as int8 rows with one scale each (the module docstring)."""
    weights = np.asarray(weights, np.float64)
    largest = np.abs(weights).max(axis=1)
    _, x = np.frexp(largest)  # largest = f * 2^x, 0.5 <= f < 1
    e = (SCALE_EXPONENT - x).astype(np.int64)
    zero = largest == 0
    # m = ceil(largest * 2^e / 127): largest * 2^e = f * 2^22 is exact, and f * 2^53 an integer
    top = np.ldexp(largest, e + 31).astype(np.int64)  # f * 2^53 exactly
    m = -(-top // (WEIGHT_BITS << 31))
    m[zero], e[zero] = 1, 0
    q = _round_away(np.ldexp(weights, e[:, None]), m[:, None])
    q[zero] = 0
    return Matrix(q.astype(np.int8), m, e)


def _round_away(y: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``round(y / m)`` with halves away from zero, exactly (``y`` float64, ``m`` integers
    below 2^16): a float64 estimate corrected by exact comparisons."""
    magnitude = np.abs(y)
    mf = m.astype(np.float64)
    q = np.floor(magnitude / mf + 0.5)
    twice = 2 * magnitude
    q = np.where(twice >= (2 * q + 1) * mf, q + 1, q)  # products below 2^25: exact
    q = np.where(twice < (2 * q - 1) * mf, q - 1, q)
    return (np.sign(y) * q).astype(np.int64)


def quantize_gain(gains: np.ndarray) -> Gain:
    """Norm gains as ``round(g * 2^bits)`` (halves away from zero) with ``bits`` chosen so
    that the largest is in [2^14, 2^15]."""
    gains = np.asarray(gains, np.float64)
    largest = float(np.abs(gains).max())
    if largest == 0:
        return Gain(np.zeros(len(gains), np.int64), 0)
    _, x = np.frexp(largest)
    bits = GAIN_BITS - int(x)
    scaled = np.ldexp(gains, bits)  # exact
    return Gain((np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int64), bits)  # + 0.5 exact: scaled < 2^15


def read_hyper(meta: dict, tensors: dict) -> Hyper:
    """The model's shape from its header, or :class:`UnsupportedModelError`."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"the exact engine runs Llama-architecture models; this one is {arch!r} (use --engine llama.cpp)")

    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise UnsupportedModelError(f"the model's header lacks llama.{name}")
        return value

    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    n_head_kv = int(key("attention.head_count_kv", n_head))
    if n_head <= 0 or n_embd % n_head or n_head_kv <= 0 or n_head % n_head_kv:
        raise UnsupportedModelError(f"unsupported head layout: {n_head} heads, {n_head_kv} key-value heads, width {n_embd}")
    head_dim = n_embd // n_head
    for name in ("attention.key_length", "attention.value_length"):
        if int(meta.get(f"llama.{name}", head_dim)) != head_dim:
            raise UnsupportedModelError(f"llama.{name} differs from the head size {head_dim}")
    scaling = meta.get("llama.rope.scaling.type", "none")
    factor = float(meta.get("llama.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear") or factor != 1.0:
        raise UnsupportedModelError(f"the exact engine has no RoPE scaling ({scaling}, factor {factor})")
    n_rot = int(meta.get("llama.rope.dimension_count", head_dim))
    if n_rot % 2 or not 0 < n_rot <= head_dim:
        raise UnsupportedModelError(f"unsupported RoPE dimension count {n_rot}")
    embedding = tensors.get(b"token_embd.weight")
    if embedding is None or len(embedding.dims) != 2 or embedding.dims[0] != n_embd:
        raise UnsupportedModelError("the model has no token embedding of its width")
    n_vocab = int(embedding.dims[1])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if not isinstance(bos, int) or not 0 <= bos < n_vocab:
        eos = meta.get("tokenizer.ggml.eos_token_id")
        bos = eos if isinstance(eos, int) and 0 <= eos < n_vocab else 0
    return Hyper(
        n_layer=int(key("block_count")), n_embd=n_embd, n_ff=int(key("feed_forward_length")), n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_rot=n_rot, n_vocab=n_vocab, n_ctx_train=int(key("context_length", 2048)),
        rope_base=float(np.float32(meta.get("llama.rope.freq_base", 10000.0))),
        rms_eps=float(np.float32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5))), bos=int(bos),
    )


def load(path: str | os.PathLike) -> ExactWeights:
    """Read and convert the GGUF model at ``path`` (:class:`UnsupportedModelError` for a
    model this engine cannot run, :class:`GGUFFormatError` for a damaged file)."""
    path = Path(path)
    try:
        meta = read_metadata(path)
        with open(path, "rb") as handle:
            layout = read_layout(handle)
    except struct.error:
        raise GGUFFormatError("truncated GGUF header") from None
    tensors = {tensor.name: tensor for tensor in layout.tensors}
    hyper = read_hyper(meta, tensors)
    data = np.memmap(path, np.uint8, mode="r")
    allowed = set(_TYPE_NAMES)

    def tensor(name: str, dims: tuple) -> np.ndarray:
        entry = tensors.get(name.encode())
        if entry is None:
            raise UnsupportedModelError(f"the model lacks the tensor {name}")
        if tuple(entry.dims) != dims:
            raise UnsupportedModelError(f"tensor {name} has shape {tuple(entry.dims)}, expected {dims}")
        if entry.kind not in allowed:
            raise UnsupportedModelError(f"tensor {name} has a type the exact engine does not read (ggml type {entry.kind})")
        start = layout.data_start + entry.offset
        size = entry.nbytes()
        if start + size > len(data):
            raise GGUFFormatError("truncated GGUF tensor data")
        return dequantize(entry.kind, np.asarray(data[start:start + size]), entry.weights)

    def matrix(name: str, n_in: int, n_out: int) -> Matrix:
        return quantize_rows(tensor(name, (n_in, n_out)).reshape(n_out, n_in))

    h = hyper
    for name in tensors:
        if name.endswith(b".bias"):
            raise UnsupportedModelError(f"the exact engine runs Llama models without biases; this one has {name.decode(errors='replace')}")
    kv = h.n_head_kv * h.head_dim
    shapes = {"attn_q": (h.n_embd, h.n_embd), "attn_k": (h.n_embd, kv), "attn_v": (h.n_embd, kv), "attn_output": (h.n_embd, h.n_embd),
              "ffn_gate": (h.n_embd, h.n_ff), "ffn_up": (h.n_embd, h.n_ff), "ffn_down": (h.n_ff, h.n_embd)}
    layers = []
    for index in range(h.n_layer):
        layer = {name: matrix(f"blk.{index}.{name}.weight", *shapes[name]) for name in LAYER_MATRICES}
        layer.update({name: quantize_gain(tensor(f"blk.{index}.{name}.weight", (h.n_embd,))) for name in LAYER_NORMS})
        layers.append(layer)
    embedding = matrix("token_embd.weight", h.n_embd, h.n_vocab)
    output = matrix("output.weight", h.n_embd, h.n_vocab) if b"output.weight" in tensors else embedding
    return ExactWeights(h, embedding, output, quantize_gain(tensor("output_norm.weight", (h.n_embd,))), layers)


# --- the converted weights, kept in nacrith's cache -------------------------------------------

CACHE_MAGIC = b"NXW1"
CONVERSION = 1  # bump when the conversion above changes: older cache files are then made anew


def _arrays(weights: ExactWeights) -> dict[str, np.ndarray]:
    arrays = {"embedding.q": weights.embedding.q, "embedding.m": weights.embedding.m, "embedding.e": weights.embedding.e,
              "output_norm.G": weights.output_norm.G}
    if weights.output is not weights.embedding:
        arrays.update({"output.q": weights.output.q, "output.m": weights.output.m, "output.e": weights.output.e})
    for index, layer in enumerate(weights.layers):
        for name in LAYER_MATRICES:
            for part in ("q", "m", "e"):
                arrays[f"{index}.{name}.{part}"] = getattr(layer[name], part)
        for name in LAYER_NORMS:
            arrays[f"{index}.{name}.G"] = layer[name].G
    return arrays


def save(weights: ExactWeights, target: Path) -> None:
    """Write ``weights`` to ``target`` (whole or not at all: a temporary file renamed into place)."""
    import hashlib
    import json
    from dataclasses import asdict

    arrays = _arrays(weights)
    entries, offset = [], 0
    for name, array in arrays.items():
        entries.append([name, array.dtype.str, list(array.shape), offset])
        offset += -(-array.nbytes // 64) * 64
    digest = hashlib.sha256()
    for array in arrays.values():
        digest.update(np.ascontiguousarray(array).tobytes())
    header = json.dumps({"conversion": CONVERSION, "hyper": asdict(weights.hyper), "arrays": entries,
                         "bits": {"output_norm": weights.output_norm.bits,
                                  **{f"{i}.{n}": layer[n].bits for i, layer in enumerate(weights.layers) for n in LAYER_NORMS}},
                         "payload_sha256": digest.hexdigest()}).encode()
    start = -(-(8 + len(header)) // 64) * 64
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:
            handle.write(CACHE_MAGIC + struct.pack("<I", len(header)) + header)
            handle.write(bytes(start - 8 - len(header)))
            for array in arrays.values():
                raw = np.ascontiguousarray(array).tobytes()
                handle.write(raw + bytes(-len(raw) % 64))
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()


def read_saved(source: Path) -> ExactWeights | None:
    """The weights :func:`save` wrote to ``source`` (mapped, not copied), or None when the
    file is not one of the current conversion or its payload's SHA-256 does not match."""
    import hashlib
    import json

    try:
        with open(source, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8 or head[:4] != CACHE_MAGIC:
                return None
            header = json.loads(handle.read(struct.unpack("<I", head[4:])[0]))
        if header.get("conversion") != CONVERSION:
            return None
        data = np.memmap(source, np.uint8, mode="r")
        start = -(-(8 + struct.unpack("<I", bytes(data[4:8]))[0]) // 64) * 64
        arrays, digest = {}, hashlib.sha256()
        for name, dtype, shape, offset in header["arrays"]:
            count = int(np.prod(shape, dtype=np.int64))
            array = np.frombuffer(data, np.dtype(dtype), count, start + offset).reshape(shape)
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
            arrays[name] = array
        if digest.hexdigest() != header["payload_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    bits = header["bits"]
    hyper = Hyper(**header["hyper"])
    embedding = Matrix(arrays["embedding.q"], arrays["embedding.m"], arrays["embedding.e"])
    output = Matrix(arrays["output.q"], arrays["output.m"], arrays["output.e"]) if "output.q" in arrays else embedding
    layers = []
    for index in range(hyper.n_layer):
        layer = {name: Matrix(*(arrays[f"{index}.{name}.{part}"] for part in ("q", "m", "e"))) for name in LAYER_MATRICES}
        layer.update({name: Gain(arrays[f"{index}.{name}.G"], bits[f"{index}.{name}"]) for name in LAYER_NORMS})
        layers.append(layer)
    return ExactWeights(hyper, embedding, output, Gain(arrays["output_norm.G"], bits["output_norm"]), layers)


def load_cached(path: str | os.PathLike, sha256: bytes) -> ExactWeights:
    """:func:`load` of the model at ``path`` (whose SHA-256 is ``sha256``), converted once and
    kept in nacrith's cache folder (``exact/<sha256>-<conversion>.nxw``, about the size of
    the int8 weights); later loads map that file. A cache that cannot be written only costs
    the conversion each time."""
    from ..model import cache_dir

    target = cache_dir() / "exact" / f"{sha256.hex()}-{CONVERSION}.nxw"
    if target.is_file():
        saved = read_saved(target)
        if saved is not None:
            return saved
    weights = load(path)
    try:
        save(weights, target)
    except OSError:
        pass
    return weights
