"""What shapes a container: compression levels and :class:`Settings`.

A level (``nacrith -1`` ... ``-9``) chooses lockstep streams, context window and stream
floor; :class:`Settings` holds those and every other choice a container records (model,
predictor, attention mode, range coder) or that only steers the work (threads, GPUs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .attention import ATTENTION_MODES, default_attention
from .coder import CODERS, DEFAULT_CODER
from .lockstep import check_window
from .predictors import EnsembleConfig, model_alone, predictor_settings

# Defaults, chosen from bench/tradeoff.py, bench/levels.py and bench/ablation.py
# (docs/benchmarks.md).

ENGINES = ("llama.cpp", "exact")
DEFAULT_ENGINE = "exact"  # bits within 0.3% of llama.cpp's, files that decode on any machine (docs/design.md)


def resolve_engine(engine: str | None, gpu: bool = False) -> str:
    """``engine``, or the default where it is None: :data:`DEFAULT_ENGINE`, or llama.cpp with
    ``gpu`` (its CUDA path is the measured GPU path; ``exact`` runs on GPUs through PyTorch)."""
    if engine is not None:
        return engine
    return "llama.cpp" if gpu else DEFAULT_ENGINE


def default_threads() -> int:
    """The number of CPU cores this process may use (its CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Level:
    """What a compression level (``nacrith -1`` ... ``-9``) sets on the CPU: the most lockstep
    streams per block, each stream's context window, and the fewest tokens a stream gets
    (fewer tokens and a block uses fewer streams; bench/experiments/stream_floor.py). Each level up has
    fewer streams or a longer window than the one below: a narrower batch is slower per
    token on the CPU, a stream that starts cold fewer times and sees more context predicts
    better (bench/levels.py)."""

    streams: int
    ctx: int
    min_stream_tokens: int


LEVELS = {
    1: Level(streams=64, ctx=512, min_stream_tokens=512),
    2: Level(streams=32, ctx=512, min_stream_tokens=512),
    3: Level(streams=16, ctx=512, min_stream_tokens=1024),
    4: Level(streams=16, ctx=768, min_stream_tokens=1024),
    5: Level(streams=16, ctx=1024, min_stream_tokens=1024),
    6: Level(streams=8, ctx=1024, min_stream_tokens=1024),
    7: Level(streams=8, ctx=2048, min_stream_tokens=2048),
    8: Level(streams=4, ctx=2048, min_stream_tokens=2048),
    9: Level(streams=1, ctx=2048, min_stream_tokens=2048),
}
DEFAULT_LEVEL = 5
DEFAULT_STREAMS = LEVELS[DEFAULT_LEVEL].streams
# On a GPU a llama_decode of 256 streams (llama.cpp's most sequences per context) yields
# 4.3 times the tokens of one of 16: 15.7k against 3.6k tokens/s on an H100 (docs/benchmarks.md);
# fewer streams would leave the GPU idle, for fewer bits. So there a level sets the window only.
DEFAULT_GPU_STREAMS = 256
DEFAULT_CTX = LEVELS[DEFAULT_LEVEL].ctx
DEFAULT_BLOCK_SIZE = 1 << 20
MIN_GPU_STREAM_TOKENS = 512  # on a GPU, where the batch's width is the speed: a 300 KB input keeps ~160 streams
DEFAULT_ENSEMBLE = EnsembleConfig()

Progress = Callable[[float], None]  # called with the bytes of input done since the last call


def level_of(number: int) -> Level:
    """The :class:`Level` numbered ``number``."""
    level = LEVELS.get(number)
    if level is None:
        raise ValueError(f"level must be between {min(LEVELS)} and {max(LEVELS)}")
    return level


def default_slide(ctx: int) -> int:
    """Tokens dropped from a full window of ``ctx`` when no slide is asked for: a quarter."""
    return max(1, ctx // 4)


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a container. ``model`` None means $NACRITH_MODEL or the default.

    ``level`` (1 to 9, None for :data:`DEFAULT_LEVEL`) fills in ``streams``, ``ctx``,
    ``slide`` and ``min_stream_tokens`` where they are None (:data:`LEVELS`; with ``gpu``,
    only the window); after construction every one of them is a number. The level itself is
    not recorded: the container records what it chose.
    """

    model: str | None = None
    streams: int | None = None  # None: DEFAULT_GPU_STREAMS with gpu, else the level's
    ctx: int | None = None  # None: the level's
    slide: int | None = None  # None: a quarter of ctx
    block_size: int = DEFAULT_BLOCK_SIZE
    min_stream_tokens: int | None = None  # None: MIN_GPU_STREAM_TOKENS with gpu, else the level's
    threads: int | None = None
    gpu: bool = False
    use_model: bool = True  # False: zstd/stored blocks only
    fallback: bool = True  # False: text blocks always use the model (for tests and measurements)
    ensemble: EnsembleConfig | None = DEFAULT_ENSEMBLE  # None: the language model alone
    gpu_ids: tuple | None = None  # with gpu: which GPUs the workers may use (None: all); not recorded
    attention: str | None = None  # one of attention.ATTENTION_MODES; None: the backend's default ("off" on the CPU)
    coder: str = DEFAULT_CODER  # the range coder, one of coder.CODERS
    level: int | None = None  # None: DEFAULT_LEVEL
    engine: str | None = None  # one of ENGINES; None: DEFAULT_ENGINE, llama.cpp with gpu

    def __post_init__(self):
        # resolved here, so that every reader of .streams, .ctx, ... sees a number; on a GPU
        # the batch's width is the speed, so there the level chooses only the window
        number = DEFAULT_LEVEL if self.level is None else self.level
        level = level_of(number)
        chosen = {
            "level": number,
            "streams": DEFAULT_GPU_STREAMS if self.gpu else level.streams,
            "ctx": level.ctx,
            "min_stream_tokens": MIN_GPU_STREAM_TOKENS if self.gpu else level.min_stream_tokens,
        }
        for name, value in chosen.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.slide is None:
            object.__setattr__(self, "slide", default_slide(self.ctx))
        if self.engine is None:
            object.__setattr__(self, "engine", resolve_engine(None, self.gpu))

    def validate(self) -> "Settings":
        if self.streams < 1:
            raise ValueError("streams must be at least 1")
        if self.block_size < 1:
            raise ValueError("block size must be at least 1 byte")
        if self.min_stream_tokens < 1:
            raise ValueError("min_stream_tokens must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        check_window(self.ctx, self.slide)
        if self.attention is not None and self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}")
        if self.coder not in CODERS:
            raise ValueError(f"coder must be one of {', '.join(CODERS)}")
        if self.ensemble is not None and self.ensemble.arithmetic == "integer" and self.coder != "int24" and not self.model_only:
            raise ValueError("the integer ensemble (preset v5) codes with the int24 coder only")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
        if self.engine == "exact" and self.attention not in (None, "off"):
            raise ValueError("the exact engine has one attention: --attention applies to --engine llama.cpp")
        return self

    @property
    def backend(self) -> str:
        """Where the model runs: "cpu" or "cuda" (llama.cpp), "any" for the exact engine,
        whose files decode on any machine."""
        if self.engine == "exact":
            return "any"
        return "cuda" if self.gpu else "cpu"

    @property
    def attention_mode(self) -> str:
        """The flash-attention mode recorded in the container and used by the engine ("off"
        for the exact engine, which has one attention of its own)."""
        if self.engine == "exact":
            return "off"
        return self.attention or default_attention(self.backend)

    @property
    def predictor(self) -> dict:
        """The predictor settings recorded in the container."""
        return predictor_settings(self.ensemble)

    @property
    def model_only(self) -> bool:
        """Whether the model's distribution is coded alone, as the container will record it
        (an ensemble with every part off is recorded as the model alone)."""
        return model_alone(self.predictor)

    @property
    def predictor_name(self) -> str:
        """A short description of the predictor, for reports."""
        if self.model_only:
            return "llm-only"
        config = self.ensemble
        return "llm+" + "+".join(config.parts) + (" (integer)" if config.arithmetic == "integer" else "" if config.mix == "geometric" else f" ({config.mix})")

    def describe(self) -> dict:
        """The settings as a JSON-ready dict."""
        values = {name: getattr(self, name) for name in ("level", "streams", "ctx", "slide", "block_size", "min_stream_tokens", "threads", "gpu", "engine")}
        return {**values, "attention": self.attention_mode, "predictor": self.predictor}

