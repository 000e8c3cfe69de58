"""nacrith: lossless compression with a language model's next-token predictions.

The Python API::

    import nacrith
    blob = nacrith.compress(data)            # bytes -> bytes
    assert nacrith.decompress(blob) == data

Options of :func:`compress` are the fields of :class:`nacrith.settings.Settings`; every
error raised on purpose derives from :class:`nacrith.errors.NacrithError`. The pipeline
(and llama.cpp with it) is imported on first use of these names, so that ``import nacrith``
and the exact engine's modules load without it.
"""
from .errors import NacrithError

__all__ = ["compress", "decompress", "Settings", "NacrithError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("compress", "decompress"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(f"module 'nacrith' has no attribute {name!r}")
