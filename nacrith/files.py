"""The command line's files: inputs opened with clear errors, outputs written whole or not
at all.

An output file is written under a hidden temporary name beside it and renamed into place
only when complete, so that a failure, Ctrl-C or SIGTERM never leaves a partial file; a
character device or a named pipe (``/dev/null``, a FIFO) is written in place, never
replaced. Errors of the output's own operations name the output (:class:`OutputError`), not
the input being read. Inputs: a regular file or a named pipe; a device or a socket only
when forced (``nacrith /dev/zero`` would read for ever).
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, UsageError


class ReaderGone(Exception):
    """Standard output's reader went away (``nacrith -dc FILE.nc | head``): stop quietly
    with SIGPIPE's exit status, as gzip and zstd do (they die of the signal)."""


@contextmanager
def atomic_output(target: Path | None, force: bool, source: Path | None = None):
    """Yield a binary file to write; it becomes ``target`` only if the block completes.

    ``target`` None means standard output, and a character device or a named pipe is
    opened as it is (both written directly). Errors writing it (a full disk) are
    :class:`OutputError`, which names the output.
    """
    if target is None:
        try:
            yield NamedOutput(sys.stdout.buffer, "standard output")
            with naming_write_errors("standard output"):
                sys.stdout.buffer.flush()
        except BrokenPipeError:
            raise ReaderGone() from None
        return
    check_target(target, force)
    if writes_in_place(target):
        with naming_write_errors(target):
            handle = open(target, "wb")
        yield from _written(handle, target)
        return
    with naming_write_errors(target):  # not the temporary file's made-up name
        handle, partial = new_partial_file(target)
    try:
        yield from _written(handle, target)
        with naming_write_errors(target):
            if source is not None:
                shutil.copystat(source, partial)  # keep the source's mode and times, as gzip does
            os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def file_mode(target: Path | None) -> int | None:
    """``target``'s st_mode (following links), None for standard output or no such file."""
    try:
        return target.stat().st_mode if target is not None else None
    except OSError:
        return None  # missing (or not statable: opening it will say why)


def writes_in_place(target: Path | None) -> bool:
    """Whether ``target`` is a character device or a named pipe (/dev/null, a FIFO): written
    directly, never replaced by a renamed file (as root, that rename would put a plain file
    in the place of /dev/null)."""
    mode = file_mode(target)
    return mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode))


def is_terminal(target: Path) -> bool:
    """Whether ``target`` is a terminal (``-o /dev/tty``), as ``-c`` asks of standard output."""
    mode = file_mode(target)
    if mode is None or not stat.S_ISCHR(mode):
        return False  # (a FIFO is not opened here: that would wait for its reader)
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return False  # the write will say why
    try:
        return os.isatty(descriptor)
    finally:
        os.close(descriptor)


def check_target(target: Path | None, force: bool) -> None:
    """Refuse an output file that exists (unless ``force``), a directory, or another
    non-regular file (a block device, a socket); devices and pipes written in place pass."""
    mode = file_mode(target)
    if mode is None or writes_in_place(target):
        return
    if not force:
        raise UsageError(f"{target} already exists; use -f to overwrite")
    if stat.S_ISDIR(mode):
        raise UsageError(f"{target} is a directory")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{target} is not a regular file")


def _written(handle, target):
    """Yield ``handle`` as a :class:`NamedOutput`, then close it. An error raised while it
    is out (an input's read error) is not named as the output's, and the flush that closing
    it then tries does not replace that error."""
    try:
        yield NamedOutput(handle, target)
        with naming_write_errors(target):
            handle.close()  # flushes: a full disk may show only here
    finally:
        close_quietly(handle)


def close_quietly(handle) -> None:
    """Close ``handle`` if it is open, ignoring the error that flushing it may raise (a full
    disk again) so that it does not hide the error being handled."""
    try:
        handle.close()
    except OSError:
        pass


def new_partial_file(target: Path):
    """(an open binary file, its path): a new file beside ``target`` under a hidden random
    name, created with mode 0666 less the umask as the finished output should have (where
    ``tempfile`` would give 0600, which standard input's output kept)."""
    for _ in range(100):
        partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
        try:
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return os.fdopen(descriptor, "wb"), partial
    raise FileExistsError(errno.EEXIST, "no free name for a partial file", str(target.parent))


@contextmanager
def naming_write_errors(target):
    """Turn an OSError of the output's own operations into :class:`OutputError` (a broken
    pipe stays itself: it is no error of ours, see :class:`ReaderGone`)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(target, exc) from None


class NamedOutput:
    """An output file whose write errors name it: the pipeline writes it while reading the
    input, and an OSError from either would otherwise be reported against the input."""

    def __init__(self, handle, target):
        self.handle, self.target = handle, target

    def write(self, data) -> int:
        with naming_write_errors(self.target):
            return self.handle.write(data)


def open_input(name: str, force: bool | None = False):
    """A readable binary file for ``name`` ('-' is standard input, refused when it is a
    terminal), with clear errors.

    A regular file or a named pipe (``<(command)``) is read; a device or a socket is
    refused, as zstd does (``nacrith /dev/zero`` would read for ever), unless ``force``
    (-f; None where the command has no -f to offer).
    """
    if name == "-":
        if sys.stdin.isatty():
            raise UsageError("no input: name a file or pipe data to standard input")
        return sys.stdin.buffer
    mode = file_mode(Path(name)) if name else None  # (Path("") is the current folder)
    if mode is None:
        if not os.path.lexists(name):
            raise UsageError(f"{name}: no such file")
    elif stat.S_ISDIR(mode):
        raise UsageError(f"{name}: is a directory")
    elif not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or force):
        raise UsageError(f"{name}: is not a regular file" + ("; use -f to read it anyway" if force is not None else ""))
    try:
        return open(name, "rb")
    except OSError as exc:
        raise UsageError(f"{name}: cannot read ({exc.strerror})") from None
