"""Every error nacrith raises on purpose, one class per cause.

All of them derive from :class:`NacrithError`, so a caller can catch the whole family;
the CLI prints ``str(error)`` as its one-line message.
"""


class NacrithError(Exception):
    """Base class of every error nacrith raises deliberately."""


class ModelNotFoundError(NacrithError):
    """No GGUF model file where one was expected."""


class ModelMismatchError(NacrithError):
    """A container was made with another model than the one given for decoding."""


class BackendMismatchError(NacrithError):
    """A container was made on a compute backend whose logits this one cannot reproduce."""


class ContainerError(NacrithError):
    """The container cannot be decoded: not a nacrith file, corrupt or truncated."""


class NotNacrithError(ContainerError):
    """The data does not start with the nacrith magic bytes."""


class UnsupportedVersionError(ContainerError):
    """The container's format version is not one this nacrith can read."""


class TruncatedError(ContainerError):
    """The container ends before its structure says it should."""


class CorruptError(ContainerError):
    """A checksum or a structural check of the container failed."""


class InputChangedError(ContainerError):
    """The compressed input file shrank or changed while it was being decoded."""


class SpoolError(NacrithError):
    """A temporary file could not be written (a full temporary folder): compressed input
    from a pipe, or compressed blocks waiting for the header to be written."""


class EngineError(NacrithError):
    """llama.cpp refused an operation (context creation, decode)."""


class WorkerError(NacrithError):
    """A worker process stopped without finishing its blocks (killed, or out of memory)."""


class UsageError(NacrithError):
    """A command line that cannot be carried out as given (an output that exists without
    -f, an input that is a directory, ...)."""


class OutputError(UsageError):
    """The output cannot be written (no such folder, no permission, a full disk); the
    message names the output, not the input being read."""

    def __init__(self, target, exc: OSError):
        super().__init__(f"cannot write {target} ({exc.strerror or exc})")


class UnsupportedModelError(NacrithError):
    """The model file is one the chosen engine cannot run (another architecture, a tensor
    type it does not read); the message says why in one line."""


class ModelFileError(NacrithError):
    """The model file cannot be read as a GGUF file (damaged or truncated); the message names it."""


class ClusterError(NacrithError):
    """A Ray cluster cannot run the job: Ray is not installed, the address cannot be reached,
    the cluster lacks what the job needs, or its actors keep dying."""
