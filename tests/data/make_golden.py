"""Write the golden containers of tests/test_golden.py for the current container format.

Run it with the build that `make install` gives (the portable CPU build, which CI uses too):

    .venv/bin/python tests/data/make_golden.py [--engine llama.cpp|exact]

It writes tests/data/golden/mixed.bin, where missing (original.txt, a text of ours, with a
fixed run of binary bytes inside) and, into tests/data/golden/v<format version>-<default
model's zoo name>-<default CPU attention mode>/ (llama.cpp) or .../v<format version>-<default
model's zoo name>-exact-spec<spec version>/ (the exact engine), every container named in
CASES and manifest.json, which says how each was made (the model, engine and attention mode
among the options; manifests without an engine are llama.cpp's). When the format version,
the default model, the default attention mode or the exact engine's spec changes, run it
again: the folders of earlier ones stay, as the proof that their files still decode (v1 to
v5, made before folders named the model, hold files of smollm2-135m; they and
v5-smollm2-135m-q8, made before folders named the attention mode, hold files of "stable").
It never replaces a container that exists: those files must not change. Where the folder
exists, it writes only the cases its manifest lacks (cases added later, such as preset v5's).
"""
from __future__ import annotations

import io
import json
import sys
from contextlib import closing
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"

# container name -> (original file in GOLDEN, Settings options); options must be JSON values
CASES = {
    "default.nc": ("original.txt", {}),
    "llm-only.nc": ("original.txt", {"ensemble": None}),
    "small-window.nc": ("original.txt", {"ctx": 32, "slide": 8, "min_stream_tokens": 8}),
    "mixed.nc": ("mixed.bin", {}),
}
# the exact engine's folder also holds these ("ensemble": a preset's name)
EXACT_CASES = {
    "preset-v5.nc": ("original.txt", {"ensemble": "v5"}),
}


def settings_options(options: dict) -> dict:
    """A manifest's options as :class:`nacrith.pipeline.Settings` takes them: an ensemble
    named by its preset becomes that preset's config."""
    from nacrith.predictors.ensemble import PRESETS

    if isinstance(options.get("ensemble"), str):
        return {**options, "ensemble": PRESETS[options["ensemble"]]}
    return options


def binary_run() -> bytes:
    """160 bytes of which none is text (control bytes and UTF-8 continuation bytes with no
    lead), so segmentation cuts them out whole."""
    return bytes((i * 5) % 9 if i % 2 == 0 else 0x80 + (i * 37) % 64 for i in range(160))


def mixed_original(text: bytes) -> bytes:
    """The text with the binary run after its first paragraph."""
    cut = text.index(b"\n\n", 100) + 2
    return text[:cut] + binary_run() + text[cut:]


def golden_folder(engine: str) -> Path:
    """Where the golden containers of the current format, default model and ``engine`` lie."""
    from nacrith import container
    from nacrith.engine import default_attention
    from nacrith.exact.reference import SPEC_VERSION
    from nacrith.model import DEFAULT_MODEL

    if engine == "exact":
        return GOLDEN / f"v{container.VERSION}-{DEFAULT_MODEL}-exact-spec{SPEC_VERSION}"
    return GOLDEN / f"v{container.VERSION}-{DEFAULT_MODEL}-{default_attention('cpu')}"


def main() -> int:
    import argparse

    from nacrith import container, pipeline
    from nacrith.engine import default_attention
    from nacrith.model import DEFAULT_MODEL
    from nacrith.session import DEFAULT_ENGINE, ENGINES, Session

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE)
    engine = parser.parse_args().engine
    attention = "off" if engine == "exact" else default_attention("cpu")
    folder = golden_folder(engine)
    cases = {**CASES, **(EXACT_CASES if engine == "exact" else {})}
    manifest = json.loads((folder / "manifest.json").read_text()) if folder.exists() else {}
    cases = {name: case for name, case in cases.items() if name not in manifest}
    if not cases:
        print(f"{folder} holds every case; its containers are the record of format {container.VERSION} and are kept", file=sys.stderr)
        return 1
    if not (GOLDEN / "mixed.bin").exists():  # earlier versions' mixed.nc hold this very file
        (GOLDEN / "mixed.bin").write_bytes(mixed_original((GOLDEN / "original.txt").read_bytes()))
    folder.mkdir(exist_ok=True)
    with closing(Session(DEFAULT_MODEL, engine=engine)) as session:
        for name, (original, options) in cases.items():
            options = {"model": DEFAULT_MODEL, "engine": engine, **({} if engine == "exact" else {"attention": attention}), **options}
            out = io.BytesIO()
            pipeline.compress_stream(io.BytesIO((GOLDEN / original).read_bytes()), out, pipeline.Settings(**settings_options(options)), session=session)
            (folder / name).write_bytes(out.getvalue())
            manifest[name] = {"original": original, "options": options}  # the container's header names the build
            print(f"{folder.name}/{name}: {len(out.getvalue())} bytes")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
