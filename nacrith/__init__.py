"""nacrith: lossless compression with a language model's next-token predictions.

The Python API::

    import nacrith
    blob = nacrith.compress(data)            # bytes -> bytes
    assert nacrith.decompress(blob) == data

Options of :func:`compress` are the fields of :class:`nacrith.settings.Settings`; every
error raised on purpose derives from :class:`nacrith.errors.NacrithError`.
"""
from .errors import NacrithError
from .pipeline import compress, decompress
from .settings import Settings

__all__ = ["compress", "decompress", "Settings", "NacrithError"]
__version__ = "0.1.0"
