"""What a container records about how it was made (model, engine, backend, llama.cpp CPU
build) and whether this machine can decode it exactly.

llama.cpp's logits, and so the coded bits, depend on the model file, the backend (CPU or
CUDA, and the GPU model), the CPU build's arithmetic features and the predictor settings:
:func:`check_decodable` refuses, before any output, a file whose records differ here.
"""
from __future__ import annotations

from . import container as fmt
from .coder import CODERS
from .attention import ATTENTION_MODES
from .errors import BackendMismatchError, CorruptError, ModelMismatchError, ModelNotFoundError, UnsupportedVersionError
from .predictors import make_predictor
from .settings import Settings


def model_section(settings: Settings, gpu_model: str | None = None) -> fmt.ModelSection:
    """The header's model section for containers made with ``settings`` (no model loading),
    on GPUs named ``gpu_model`` (as ggml describes them) when ``settings.gpu``."""
    from . import model as model_files

    info = model_files.locate(settings.model)
    return fmt.ModelSection(
        sha256=info.sha256,
        name=info.name,
        engine=engine_name(settings.engine),
        backend=recorded_backend(settings, gpu_model),
        ctx=settings.ctx,
        slide=settings.slide,
        predictor=settings.predictor,
        attention=settings.attention_mode,
        coder=settings.coder,
    )


def recorded_backend(settings: Settings, gpu_model: str | None = None) -> str:
    """What a container made with ``settings`` records as its backend: "cpu:" and this
    llama.cpp build's CPU arithmetic (:func:`nacrith.engine.cpu_build`), or "cuda:" and the
    GPUs' name; "any" for the exact engine, whose files decode on any machine."""
    if settings.engine == "exact":
        return "any"
    if settings.gpu:
        return f"cuda:{gpu_model}" if gpu_model else settings.backend
    return cpu_backend()


def cpu_backend() -> str:
    """The backend a CPU file made by this llama.cpp build records: "cpu:" and the build's
    compact form (:func:`nacrith.container.cpu_build_field`, the same for the same features)."""
    from .llama import cpu_build

    return f"cpu:{fmt.cpu_build_field(cpu_build())}"


# Features of a llama.cpp CPU build that choose how the work is shared among threads, not
# the arithmetic: a clang build without OpenMP gave logits bit-identical to the gcc build
# with it, and each decoded the other's file exactly (docs/compatibility.md).
THREADING_FEATURES = frozenset({"OPENMP"})


def arithmetic_of(build: str) -> tuple[str, frozenset]:
    """(architecture, features) of a CPU build as :func:`nacrith.engine.cpu_build` gives it,
    without :data:`THREADING_FEATURES`: builds whose logits may differ differ here."""
    arch, *features = build.split()
    return arch, frozenset(features) - THREADING_FEATURES


def cpu_build_mismatch(recorded: str, here: str) -> str:
    """Why a file made by the llama.cpp CPU build ``recorded`` is refused by the build
    ``here`` (both as :func:`nacrith.engine.cpu_build` gives them), in one line."""
    (made_on, *made), (this_on, *this) = recorded.split(), here.split()
    made, this = [f for f in made if f not in THREADING_FEATURES], [f for f in this if f not in THREADING_FEATURES]
    if made_on != this_on:
        return f"this file was made by llama.cpp on {made_on} CPUs; this is {this_on}, whose logits differ"
    lacking, extra = [f for f in made if f not in this], [f for f in this if f not in made]
    differences = "; ".join(part for part in (f"this one lacks {' '.join(lacking)}" if lacking else "",
                                              f"it lacked {' '.join(extra)}" if extra else "") if part)
    return (f"this file was made by a llama.cpp CPU build with other features ({differences}), whose logits differ;"
            " decode it with a build like the one that made it (docs/compatibility.md), or try --any-cpu-build")


def check_decodable(parsed: fmt.Container, model: str | None = None, any_cpu_build: bool = False):
    """Refuse up front what cannot be decoded exactly; returns the model file to use (or None).

    Checks the model's SHA-256, the engine, the predictor settings and the backend: a CPU
    file that records its llama.cpp CPU build is refused by a build of other features
    (:data:`THREADING_FEATURES` aside) unless ``any_cpu_build`` (then the checksum tells
    whether the logits were the same). A file of the exact engine needs only a nacrith that
    implements its spec version: it names no backend ("any").
    """
    section = parsed.header.model
    if not parsed.uses_model:
        return None
    from .exact.engine import SPEC_VERSION, spec_of

    model_path = _decoding_model(section, model)
    spec = spec_of(section.engine)
    if spec is not None:
        if spec != SPEC_VERSION:
            raise UnsupportedVersionError(f"this file was made with the exact engine's spec {spec}; this nacrith implements spec {SPEC_VERSION}")
        if section.backend != "any":
            raise CorruptError(f"corrupt container: an exact-engine file with backend {section.backend!r}")
        _check_predictor_and_coder(section)
        return model_path
    from .engine import gpu_available, gpu_missing

    if section.engine != engine_name():
        raise BackendMismatchError(f"this file was made with {section.engine}; this is {engine_name()}, whose logits may differ")
    _check_predictor_and_coder(section)
    if section.backend_kind not in ("cpu", "cuda"):
        raise BackendMismatchError(f"this file was made on an unknown backend {section.backend!r}")
    if section.attention not in ATTENTION_MODES:
        raise UnsupportedVersionError(f"this file uses an attention mode this nacrith does not know ({section.attention!r})")
    if section.backend_kind == "cuda" and not gpu_available():
        raise BackendMismatchError(f"this file was made on a CUDA GPU; {gpu_missing()}, and CPU logits differ")
    if section.cpu_build is not None and not any_cpu_build:
        from .llama import cpu_build

        if arithmetic_of(section.cpu_build) != arithmetic_of(cpu_build()):
            raise BackendMismatchError(cpu_build_mismatch(section.cpu_build, cpu_build()))
    return model_path


def _check_predictor_and_coder(section: fmt.ModelSection) -> None:
    """Refuse predictor settings or a range coder this nacrith does not know."""
    try:
        make_predictor(section.predictor, 16, 1)
    except (ValueError, TypeError) as exc:
        raise UnsupportedVersionError(f"this file uses predictor settings this nacrith does not know ({exc})") from None
    if section.coder not in CODERS:
        raise UnsupportedVersionError(f"this file uses a range coder this nacrith does not know ({section.coder!r})")


def _decoding_model(section: fmt.ModelSection, model: str | None):
    """The model file whose SHA-256 the file records: ``model`` (--model) when given, else
    the usual choice ($NACRITH_MODEL, the default) or, failing that, the zoo model of that
    SHA-256 (:data:`nacrith.model.ZOO`), so that a file made with ``--model gemma3-270m``
    decodes without options where that model is installed."""
    from . import model as model_files

    try:
        info, missing = model_files.locate(model), None
    except ModelNotFoundError as exc:
        if model is not None:
            raise
        info, missing = None, exc
    if info is not None and info.sha256 == section.sha256:
        return info.path
    known = model_files.zoo_model_of(section.sha256)
    if known is not None and model is None:
        found = model_files.zoo_path(known)
        if found is None:
            raise ModelNotFoundError(f"this file was made with {section.name}, nacrith's {known.name} model, which is not installed;"
                                     f" install it with {known.install_hint}")
        if model_files.fingerprint(found) == section.sha256:
            return found
    if info is None:
        raise missing
    hint = f"--model {known.name}" if known is not None else "--model"
    raise ModelMismatchError(
        f"this file was made with model {section.name} (sha256 {section.sha256.hex()[:16]}…), "
        f"not {info.name} (sha256 {info.sha256.hex()[:16]}…); pass the right one with {hint}"
    )


def engine_of(recorded: str) -> str:
    """Which of :data:`nacrith.settings.ENGINES` made a file whose header records the engine string ``recorded``."""
    from .exact.engine import spec_of

    return "exact" if spec_of(recorded) is not None else "llama.cpp"


def engine_name(engine: str = "llama.cpp") -> str:
    """The engine string recorded in containers made with ``engine`` (one of
    :data:`nacrith.settings.ENGINES`); llama.cpp is imported only for its own name."""
    if engine == "exact":
        from .exact.engine import engine_name as exact_name

        return exact_name()
    from .llama import llama_cpp_version

    return f"llama.cpp (llama-cpp-python {llama_cpp_version()})"
