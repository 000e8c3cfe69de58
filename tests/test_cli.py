"""The command line: gzip/zstd conventions, one-line errors, no partial output."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

NACRITH = [sys.executable, "-m", "nacrith.cli"]
TEXT = (
    b"It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    b"foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    b"it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    b"everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    b"direct the other way--in short, the period was so far like the present period, that some of its "
    b"noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    b"of comparison only.\n"
)


def run(*args, stdin: bytes | None = None, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*NACRITH, *map(str, args)], input=stdin, capture_output=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    message = result.stderr.decode()
    assert "Traceback" not in message
    assert len(message.strip().splitlines()) == 1, message
    assert fragment in message, message


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "story.txt"
    path.write_bytes(TEXT)
    return path


@pytest.mark.slow
def test_compress_then_decompress_files(text_file: Path):
    result = run("compress", text_file)
    assert result.returncode == 0, result.stderr
    packed = text_file.with_name("story.txt.nc")
    assert packed.exists() and text_file.exists()  # the source is kept
    text_file.unlink()
    result = run("-d", packed)
    assert result.returncode == 0, result.stderr
    assert text_file.read_bytes() == TEXT


@pytest.mark.slow
def test_gzip_style_shorthand_and_rm(text_file: Path):
    assert run(text_file, "--rm").returncode == 0
    assert not text_file.exists()
    assert run("decompress", "--rm", str(text_file) + ".nc").returncode == 0
    assert text_file.read_bytes() == TEXT and not Path(str(text_file) + ".nc").exists()


@pytest.mark.slow
def test_stdin_to_stdout_pipeline():
    packed = run("compress", "-", stdin=TEXT)
    assert packed.returncode == 0, packed.stderr
    restored = run("decompress", "-c", "-", stdin=packed.stdout)
    assert restored.returncode == 0 and restored.stdout == TEXT
    restored = run("-d", "--any-gpu-model", "-c", "-", stdin=packed.stdout)  # accepted; no effect on a CPU file
    assert restored.returncode == 0 and restored.stdout == TEXT


@pytest.mark.slow
def test_output_option_and_stdout_flag(text_file: Path, tmp_path: Path):
    target = tmp_path / "custom.bin"
    assert run("compress", "-o", target, text_file).returncode == 0
    result = run("decompress", "-c", target)
    assert result.returncode == 0 and result.stdout == TEXT


@pytest.mark.slow
def test_existing_output_needs_force(text_file: Path):
    packed = Path(str(text_file) + ".nc")
    packed.write_bytes(b"precious")
    assert_one_line_error(run("compress", text_file), "already exists")
    assert packed.read_bytes() == b"precious"
    assert run("compress", "-f", text_file).returncode == 0
    assert packed.read_bytes() != b"precious"


def test_missing_input_and_directory(tmp_path: Path):
    assert_one_line_error(run("compress", tmp_path / "nope.txt"), "no such file")
    assert_one_line_error(run("compress", tmp_path), "is a directory")


@pytest.mark.slow
def test_test_command_decodes_and_writes_nothing(text_file: Path, tmp_path: Path):
    assert run("compress", text_file).returncode == 0
    packed = Path(str(text_file) + ".nc")
    broken = tmp_path / "broken.txt.nc"
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    text_file.unlink()
    before = sorted(tmp_path.iterdir())
    result = run("-t", "-v", packed)
    assert result.returncode == 0, result.stderr
    assert f"{packed}: OK ({len(TEXT)} bytes)" in result.stderr.decode()
    assert run("test", packed).stderr == b""  # silent without -v
    assert_one_line_error(run("test", broken), "broken.txt.nc: corrupt")
    both = run("test", "-v", packed, broken)  # every file is tried; one failure fails the run
    assert both.returncode == 1 and b"OK" in both.stderr and b"corrupt" in both.stderr
    assert sorted(tmp_path.iterdir()) == before
    # coded bytes damaged behind valid CRCs: only decoding finds it
    from nacrith import container as fmt

    blob = packed.read_bytes()
    _, header_end = fmt.read_header(blob)
    block, block_end = fmt.read_block(blob, header_end)
    assert block.kind == fmt.MODEL
    for position in (len(block.coded) // 2, 0):
        coded = bytearray(block.coded)
        coded[position] ^= 0x01
        forged = fmt.Block(**{**block.__dict__, "payload": bytes(block.binary_payload) + bytes(coded)})
        broken.write_bytes(blob[:header_end] + fmt.write_block(forged) + blob[block_end:])
        result = run("test", broken)
        if result.returncode == 0:  # an unused bit: then it must really decode to the original
            assert run("-d", "-c", broken).stdout == TEXT
            continue
        assert_one_line_error(result, "broken.txt.nc: ")
        break
    else:
        pytest.fail("no damaged bit was found by decoding")


@pytest.mark.slow
def test_compressed_input_is_left_unless_forced(text_file: Path):
    packed = Path(str(text_file) + ".nc")
    assert run("compress", text_file).returncode == 0
    assert_one_line_error(run(packed), "already has the .nc suffix")
    assert not Path(str(packed) + ".nc").exists()
    assert run("-f", packed).returncode == 0 and Path(str(packed) + ".nc").exists()


def test_recursive_codes_the_files_below_a_folder(tmp_path: Path):
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    files = {Path("a.bin"): os.urandom(2000), Path("sub/b.bin"): os.urandom(3000), Path("sub/deeper/c.bin"): os.urandom(100)}
    for relative, data in files.items():
        (tree / relative).write_bytes(data)
    (tree / "link.bin").symlink_to(tree / "a.bin")  # links are skipped, as gzip -r and zstd -r do
    (tree / "folder-link").symlink_to(tree / "sub")

    def regular_files() -> list[Path]:
        return sorted(path.relative_to(tree) for path in tree.rglob("*") if path.is_file() and not path.is_symlink())

    assert run("-r", "--rm", tree).returncode == 0
    assert regular_files() == sorted(Path(f"{relative}.nc") for relative in files)
    tested = run("-tvr", tree)
    assert tested.returncode == 0 and tested.stderr.count(b": OK (") == 3
    assert run("-r", tree).returncode == 0 and regular_files() == sorted(Path(f"{relative}.nc") for relative in files)  # .nc skipped
    assert run("-d", "-r", "--rm", tree).returncode == 0
    assert regular_files() == sorted(files) and all((tree / relative).read_bytes() == data for relative, data in files.items())
    assert (tree / "link.bin").is_symlink() and (tree / "folder-link").is_symlink()
    assert_one_line_error(run("-r", "-o", tmp_path / "one.nc", tree), "-o/--output takes one input file")
    assert_one_line_error(run(tree), "is a directory")  # no -r: refused as before


@pytest.mark.slow
def test_one_command_loads_the_model_once(monkeypatch, tmp_path: Path):
    """Several files in one command, and concatenated containers, share one loaded model
    (it was loaded again for each); every file is the same as when coded alone."""
    from click.testing import CliRunner

    from nacrith import cli, pipeline
    from nacrith import container as fmt
    from nacrith import session as sessions

    loads = []
    load = sessions.Session.__init__
    monkeypatch.setattr(sessions.Session, "__init__", lambda self, *args, **kwargs: loads.append(args) or load(self, *args, **kwargs))
    texts = [b"The quick brown fox jumps over the lazy dog, and the dog does not mind at all.\n" * 2,
             b"Alice was beginning to get very tired of sitting by her sister on the bank.\n" * 2, b"print('hello, world')\n" * 4]
    names = []
    for index, text in enumerate(texts):
        names.append(tmp_path / f"t{index}.txt")
        names[-1].write_bytes(text)
    result = CliRunner().invoke(cli.main_group, ["compress", "-q", *map(str, names)])
    assert result.exit_code == 0, result.output
    assert len(loads) == 1
    blobs = [Path(f"{name}.nc").read_bytes() for name in names]
    assert all(fmt.parse(blob).uses_model for blob in blobs)
    assert blobs == [pipeline.compress(text) for text in texts]  # each alone, in a fresh session
    loads.clear()
    assert pipeline.decompress(b"".join(blobs)) == b"".join(texts)
    assert len(loads) == 1
    loads.clear()
    result = CliRunner().invoke(cli.main_group, ["decompress", "-c", *(f"{name}.nc" for name in names)])
    assert result.exit_code == 0 and result.stdout_bytes == b"".join(texts)
    assert len(loads) == 1


def test_an_unreadable_folder_is_reported(tmp_path: Path, monkeypatch, capsys):
    from nacrith import cli

    def walk(top, onerror):  # what os.walk does with a folder it may not list (not as root)
        onerror(PermissionError(13, "Permission denied", str(tmp_path / "locked")))
        return iter(())

    monkeypatch.setattr(cli.os, "walk", walk)
    with pytest.raises(SystemExit) as exit:
        cli.run_each((str(tmp_path),), None, lambda name: None, recursive=True)
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip() == f"nacrith: {tmp_path / 'locked'}: cannot read the folder (Permission denied)"


def test_gzip_style_flag_clusters(packed_noise):
    """`nacrith -dc FILE.nc`, README's own example, was "no such option '-d'"."""
    packed, data = packed_noise
    assert run("-dc", packed).stdout == data
    assert run("-cd", packed).stdout == data
    tested = run("-tv", packed)
    assert tested.returncode == 0 and b"OK" in tested.stderr
    out = packed.with_name("out.bin")
    assert run("-dfo", out, packed).returncode == 0 and out.read_bytes() == data
    assert run(f"-dfo{out}", packed).returncode == 0 and out.read_bytes() == data


def test_an_unforeseen_os_error_names_its_file(capsys):
    from nacrith.cli import run_each

    def fails(error):
        def action(name):
            raise error
        return action

    for error, expected in ((OSError(13, "Permission denied", "/var/cache/x"), "nacrith: a.txt: /var/cache/x: Permission denied"),
                            (OSError(5, "Input/output error", "a.txt"), "nacrith: a.txt: Input/output error"),
                            (OSError(28, "No space left on device"), "nacrith: a.txt: No space left on device")):
        with pytest.raises(SystemExit):
            run_each(("a.txt",), None, fails(error))
        assert capsys.readouterr().err.strip() == expected


def test_mode_flags_are_found_where_they_are_flags():
    from nacrith.cli import normalise_argv

    assert normalise_argv(["-dc", "x.nc"]) == ["decompress", "-c", "x.nc"]
    assert normalise_argv(["-dt", "x.nc"]) == ["test", "x.nc"]  # -t wins, as in gzip
    assert normalise_argv(["-kdo", "out", "x.nc"]) == ["decompress", "-ko", "out", "x.nc"]
    assert normalise_argv(["-do-t", "x.nc"]) == ["decompress", "-o-t", "x.nc"]  # -o's attached value
    assert normalise_argv(["-o", "-d", "x"]) == ["compress", "-o", "-d", "x"]  # a value, not a flag
    assert normalise_argv(["--model", "-t", "-d", "x.nc"]) == ["decompress", "--model", "-t", "x.nc"]
    assert normalise_argv(["--", "-d"]) == ["compress", "--", "-d"]  # a file named -d
    assert normalise_argv(["-c", "-o"]) == ["compress", "-c", "-o"]  # click then says -o lacks its value
    assert normalise_argv(["info", "-d"]) == ["info", "-d"]
    for version in ("-V", "--version"):
        assert normalise_argv([version]) == [version]
        shown = run(version)
        assert shown.returncode == 0 and shown.stdout.startswith(b"nacrith, version ")
    assert normalise_argv(["-l", "--json", "x.nc"]) == normalise_argv(["-dl", "--json", "x.nc"]) == ["info", "--json", "x.nc"]


def test_level_flags_as_in_gzip(monkeypatch, text_file: Path):
    """-1 ... -9 (alone or in a cluster), --fast and --best: the last one wins; decompress
    and test drop them, as gzip -d does; a level out of range is a one-line usage error."""
    from click.testing import CliRunner

    from nacrith import cli
    from nacrith.cli import normalise_argv
    from nacrith.settings import LEVELS

    assert normalise_argv(["-9", "x"]) == ["compress", "--level", "9", "x"]
    assert normalise_argv(["-9c", "x"]) == normalise_argv(["-c9", "x"]) == ["compress", "--level", "9", "-c", "x"]
    assert normalise_argv(["--best", "-1", "x"]) == normalise_argv(["--fast", "x"]) == ["compress", "--level", "1", "x"]
    assert normalise_argv(["compress", "-3", "-", "--", "-4"]) == ["compress", "--level", "3", "-", "--", "-4"]  # a file named -4
    assert normalise_argv(["-o", "-9", "x"]) == ["compress", "-o", "-9", "x"]  # -o's value
    assert normalise_argv(["-9o", "out", "x"]) == ["compress", "--level", "9", "-o", "out", "x"]
    assert normalise_argv(["-oout9", "x"]) == ["compress", "-oout9", "x"]
    assert normalise_argv(["-d9c", "x.nc"]) == ["decompress", "-c", "x.nc"]
    assert normalise_argv(["test", "--best", "x.nc"]) == ["test", "x.nc"]
    assert normalise_argv(["-19", "x"]) == ["compress", "--level", "19", "x"]  # zstd's many digits: click refuses 19
    seen = []
    monkeypatch.setattr(cli, "compress_one", lambda name, settings, *rest: seen.append(settings))
    result = CliRunner().invoke(cli.main_group, normalise_argv(["-9", "--ctx", "512", str(text_file)]))
    assert result.exit_code == 0, result.output
    assert [(s.level, s.streams, s.ctx, s.slide) for s in seen] == [(9, LEVELS[9].streams, 512, 128)]  # --ctx overrides the level's
    refused = run("-0", text_file)
    assert refused.returncode == 2
    assert_one_line_error(refused, "'--level': 0 is not in the range 1<=x<=9")


def test_closed_reader_of_stdout_stops_quietly(tmp_path: Path):
    """`nacrith -dc FILE.nc | head`: SIGPIPE's status and no message, as gzip and zstd."""
    data = os.urandom(400_000)  # stored blocks: no model work
    source = tmp_path / "noise.bin"
    source.write_bytes(data)
    assert run("compress", "--block-size", "100000", source).returncode == 0
    reader = subprocess.Popen([*NACRITH, "-d", "-c", str(source) + ".nc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout.read(10) == data[:10]
    reader.stdout.close()
    assert reader.wait(timeout=120) == 141
    assert reader.stderr.read() == b""


def test_unwritable_output_names_the_output(text_file: Path, tmp_path: Path):
    target = tmp_path / "no-such-folder" / "out.nc"
    result = run("compress", "-o", target, text_file)
    assert_one_line_error(result, f"cannot write {target} (")
    assert not target.parent.exists()


@pytest.mark.slow
def test_output_modes(tmp_path: Path):
    """From standard input the output gets 0666 less the umask, as a shell's redirection would
    (it was 0600, a temporary file's); from a file, the file's own mode, as gzip keeps it."""
    mask = os.umask(0o022)
    try:
        out = tmp_path / "piped.nc"
        assert run("-o", out, "-", stdin=os.urandom(2000)).returncode == 0
        assert out.stat().st_mode & 0o777 == 0o644
        source = tmp_path / "noise.bin"
        source.write_bytes(os.urandom(2000))
        source.chmod(0o640)
        assert run(source).returncode == 0
        assert (tmp_path / "noise.bin.nc").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)


def test_output_that_is_the_input_is_refused_even_forced(text_file: Path):
    """zstd's rule: with --rm, writing over the input and then deleting it would lose both."""
    link = text_file.with_name("link.txt")
    os.link(text_file, link)  # the same file under another name
    for output in (text_file, link):
        assert_one_line_error(run("compress", "-f", "--rm", "-o", output, text_file), "the output would overwrite the input")
    assert text_file.read_bytes() == TEXT
    assert_one_line_error(run("-d", "-f", "-o", text_file, text_file), "the output would overwrite the input")
    assert text_file.read_bytes() == TEXT


@pytest.fixture
def packed_noise(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(50_000)  # a stored block: no model work
    (tmp_path / "noise.bin").write_bytes(data)
    assert run(tmp_path / "noise.bin").returncode == 0
    return tmp_path / "noise.bin.nc", data


def test_input_truncated_while_decoding_leaves_no_output(tmp_path: Path, monkeypatch):
    """The input used to be mmap'd: truncated by another process mid-decode, SIGBUS killed
    nacrith and its partial output stayed. Now a clean error, and the partial file goes."""
    from nacrith import cli, pipeline
    from nacrith.errors import InputChangedError

    source = tmp_path / "noise.bin"
    source.write_bytes(os.urandom(60_000))
    assert run("--block-size", "20000", "--rm", source).returncode == 0  # three stored blocks
    packed = tmp_path / "noise.bin.nc"
    decode_block = pipeline.decode_block

    def truncating_first(block, *args, **kwargs):
        os.truncate(packed, min(packed.stat().st_size, 30_000))
        return decode_block(block, *args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_block", truncating_first)
    with pytest.raises(InputChangedError, match="noise.bin.nc shrank while being read"):
        cli.decompress_one(str(packed), None, None, 1, None, None, False, False, True, False, False)
    assert [path.name for path in tmp_path.iterdir()] == ["noise.bin.nc"]


def test_device_input_is_refused_unless_forced(tmp_path: Path):
    """`nacrith /dev/zero` read for ever; zstd refuses a device input. A named pipe is read."""
    assert_one_line_error(run("-c", "/dev/zero"), "/dev/zero: is not a regular file; use -f to read it anyway")
    assert_one_line_error(run("-c", ""), ": no such file")  # was ": is a directory" (Path("") is ".")
    tested = run("-t", "/dev/null")
    assert_one_line_error(tested, "/dev/null: is not a regular file")
    assert b"-f" not in tested.stderr  # test has no -f to offer
    forced = run("-c", "-f", "/dev/null")  # -f reads it: empty input, an empty container
    assert forced.returncode == 0 and run("-d", "-", stdin=forced.stdout).stdout == b""
    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"printf 'piped text' > '{fifo}'"])
    try:
        result = run("-c", fifo)  # no -f needed for a pipe
        assert result.returncode == 0, result.stderr
        assert run("-d", "-", stdin=result.stdout).stdout == b"piped text"
    finally:
        writer.kill()


def test_named_pipe_output_is_written_in_place(tmp_path: Path, packed_noise):
    packed, data = packed_noise
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        result = run("-d", "-o", fifo, packed)  # no -f needed: a pipe holds nothing to overwrite
        assert result.returncode == 0, result.stderr
        assert reader.communicate(timeout=60)[0] == data
    finally:
        reader.kill()  # where nothing opened the pipe, cat still waits for a writer
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_device_output_is_never_replaced(tmp_path: Path, packed_noise):
    """As root, `-f -o /dev/null` used to rename a plain file over the device node."""
    packed, _ = packed_noise
    null = tmp_path / "null"  # a private null device, so that a failure cannot touch /dev/null
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        open(null, "wb").close()
    except OSError:
        pytest.skip("cannot make or open a device node here (needs root, and a filesystem without nodev)")
    for forced in ([], ["-f"]):
        result = run("-d", *forced, "--rm", "-o", null, packed)
        assert result.returncode == 0, result.stderr
        assert stat.S_ISCHR(null.stat().st_mode)
        assert packed.exists() and "kept" in result.stderr.decode()  # --rm keeps an input whose output is gone


def test_terminal_named_as_output_is_refused_as_with_c(tmp_path: Path):
    master, slave = os.openpty()
    try:
        source = tmp_path / "noise.bin"
        source.write_bytes(os.urandom(2000))
        assert_one_line_error(run("-o", os.ttyname(slave), source), "not written to a terminal")
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_names_the_output(tmp_path: Path):
    """A write that fails (ENOSPC) is reported against the output, not the input being read."""
    source = tmp_path / "noise.bin"
    source.write_bytes(os.urandom(100_000))  # a stored block: no model work
    with open("/dev/full", "wb") as full:
        result = subprocess.run([*NACRITH, "-c", str(source)], stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert_one_line_error(result, "cannot write standard output (No space left on device)")


def test_failed_write_leaves_no_partial_file(tmp_path: Path):
    from nacrith import files
    from nacrith.errors import OutputError

    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

    target = tmp_path / "out.nc"
    with pytest.raises(OutputError, match=f"cannot write {target} \\(No space left on device\\)"):
        with files.atomic_output(target, False) as out:
            out.write(b"written")
            out.handle = FullDisk()  # the disk fills up after the first write
            out.write(b"not written")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as raised:  # an input's read error stays the input's
        with files.atomic_output(target, False) as out:
            out.write(b"written")
            raise OSError(5, "Input/output error")
    assert not isinstance(raised.value, OutputError)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_found_when_closing_is_named(tmp_path: Path, monkeypatch):
    """Buffered writes may succeed and only the final flush fail; the second flush that
    closing tries must not replace that error with an unnamed one."""
    from nacrith import files
    from nacrith.errors import OutputError

    class BufferedOnFullDisk:
        closed = False

        def write(self, data):
            return len(data)

        def close(self):  # as io.BufferedWriter: closed even when its flush fails
            if not self.closed:
                self.closed = True
                raise OSError(28, "No space left on device")

    partial = tmp_path / ".out.nc.part"
    partial.write_bytes(b"")
    monkeypatch.setattr(files, "new_partial_file", lambda target: (BufferedOnFullDisk(), partial))
    target = tmp_path / "out.nc"
    with pytest.raises(OutputError, match="No space left on device"):
        with files.atomic_output(target, False) as out:
            out.write(b"buffered")
    assert list(tmp_path.iterdir()) == []


def test_unknown_suffix_on_decompress(text_file: Path):
    assert_one_line_error(run("-d", text_file), "unknown suffix")


@pytest.mark.slow
def test_corrupt_input_leaves_no_output(text_file: Path, tmp_path: Path):
    assert run("compress", text_file).returncode == 0
    packed = Path(str(text_file) + ".nc")
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken = tmp_path / "broken.txt.nc"
    broken.write_bytes(bytes(data))
    assert_one_line_error(run("-d", broken), "corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["story.txt", "story.txt.nc", "broken.txt.nc"])


@pytest.mark.slow
def test_truncated_and_foreign_input(text_file: Path, tmp_path: Path):
    assert run("compress", text_file).returncode == 0
    packed = Path(str(text_file) + ".nc").read_bytes()
    short = tmp_path / "short.nc"
    short.write_bytes(packed[:-5])
    assert_one_line_error(run("-d", short), "truncated")
    assert_one_line_error(run("-d", text_file, "-o", tmp_path / "x"), "not a nacrith file")


def test_empty_stdin(tmp_path: Path):
    assert_one_line_error(run("decompress", "-", stdin=b""), "empty input")
    packed = run("compress", "-", stdin=b"")
    assert packed.returncode == 0
    restored = run("decompress", "-", stdin=packed.stdout)
    assert restored.returncode == 0 and restored.stdout == b""


def test_missing_model_is_one_line(text_file: Path):
    assert_one_line_error(run("compress", "--model", "/no/such/model.gguf", text_file), "model file not found")


def test_bad_option_value(text_file: Path):
    result = run("compress", "--ctx", "64", "--slide", "64", text_file)
    assert_one_line_error(result, "slide must be between 1 and ctx - 2")
    assert result.returncode == 2
    for workers in ("0x2", "2x", "two"):
        result = run("compress", "--workers", workers, text_file)
        assert_one_line_error(result, "PROCESSESxLANES")
        assert result.returncode == 2


def test_bad_command_line_is_one_line_with_a_help_hint(text_file: Path):
    cases = [
        (["compress", "--streams", "x", text_file], "invalid value for '--streams'"),
        (["--bogus", text_file], "no such option '--bogus'"),
        (["info"], "missing argument 'FILES...'"),
        (["-o", "out.nc", text_file, text_file], "-o/--output takes one input file"),
    ]
    for args, fragment in cases:
        result = run(*args)
        assert_one_line_error(result, fragment)
        assert result.returncode == 2 and result.stderr.startswith(b"nacrith: ") and b"--help')" in result.stderr
    bare = run()  # no arguments at all: the help, as it was, not folded into one line
    assert bare.returncode == 2 and bare.stderr.startswith(b"Usage: nacrith") and b"\n  nacrith -d FILE.nc" in bare.stderr


@pytest.mark.slow
def test_info_text_and_json(text_file: Path):
    assert run("compress", text_file).returncode == 0
    packed = str(text_file) + ".nc"
    human = run("info", packed)
    assert human.returncode == 0 and b"original    %d bytes" % len(TEXT) in human.stdout
    facts = json.loads(run("info", "--json", packed).stdout)
    assert facts["original_size"] == len(TEXT) and (facts["member"], facts["members"]) == (1, 1)
    assert b"container 1 of" not in human.stdout
    assert run("-l", packed).stdout == human.stdout  # gzip's -l
    assert facts["compressed_size"] == os.path.getsize(packed)
    assert set(facts) >= {"format_version", "bits_per_byte", "blocks", "streams", "tokens", "model", "checksum"}
    if facts["model"] is not None:  # the default model, as the zoo names it (where the pinned version is installed)
        from nacrith.model import DEFAULT_MODEL, ZOO

        expected = DEFAULT_MODEL if facts["model"]["sha256"] == ZOO[DEFAULT_MODEL].sha256 else None
        assert facts["model"]["zoo_name"] == expected
        assert (f"(--model {DEFAULT_MODEL})".encode() in human.stdout) == (expected is not None)


@pytest.mark.slow
def test_several_files_to_standard_output_decode_as_one(tmp_path: Path):
    """`nacrith -c a b > ab.nc` exited 0 with a file nacrith could not decode (data after
    the first trailer); now it decodes to a then b, as gzip's and zstd's do."""
    first, second = tmp_path / "a.bin", tmp_path / "b.txt"
    first.write_bytes(os.urandom(3000))
    second.write_bytes(TEXT)
    packed = run("-c", first, second)
    assert packed.returncode == 0, packed.stderr
    both = tmp_path / "ab.nc"
    both.write_bytes(packed.stdout)
    expected = first.read_bytes() + TEXT
    assert run("-d", "-c", both).stdout == expected
    assert run("-d", "-", stdin=packed.stdout + packed.stdout).stdout == expected + expected  # `cat ab.nc ab.nc |`
    assert run("-t", both).returncode == 0
    with open(both, "rb") as redirected:  # standard input that is a regular file: read in place
        assert subprocess.run([*NACRITH, "-d"], stdin=redirected, capture_output=True, timeout=300).stdout == expected
    facts = [json.loads(line) for line in run("info", "--json", both).stdout.splitlines()]
    assert [(f["member"], f["members"], f["original_size"]) for f in facts] == [(1, 2, 3000), (2, 2, len(TEXT))]
    assert sum(f["compressed_size"] for f in facts) == len(packed.stdout)
    assert b"(container 2 of 2)" in run("info", both).stdout


def test_help_states_keep_semantics():
    result = run("compress", "--help")
    assert result.returncode == 0
    assert b"Keep the input file (the default" in result.stdout


@pytest.mark.slow
def test_ensemble_flags_are_recorded(text_file: Path, tmp_path: Path):
    llm = tmp_path / "llm.nc"
    partial = tmp_path / "partial.nc"
    assert run("compress", "--llm-only", "-o", llm, text_file).returncode == 0
    assert run("compress", "--no-ngram", "--no-skip", "-o", partial, text_file).returncode == 0
    cases = ((llm, None, ["llm"]), (partial, {"ngram": False, "skip": False}, ["llm", "match", "bias", "mixer"]))
    for path, expected, parts in cases:
        facts = json.loads(run("info", "--json", path).stdout)
        assert facts["model"] is not None  # prose: the model beats zstd
        assert facts["model"]["predictor"].get("set") == expected
        assert ("ensemble" in facts["model"]["predictor"]) == (expected is not None)
        assert facts["model"]["parts"] == parts
        assert b"parts       " + ", ".join(parts).encode() in run("info", path).stdout
        restored = run("decompress", "-c", path)  # no flags needed
        assert restored.returncode == 0 and restored.stdout == TEXT


def test_info_parts_of_unknown_settings():
    """A file from a newer nacrith (unknown preset) still gets an info line, not an error."""
    from nacrith.cli import predictor_parts

    assert predictor_parts({"llm": "exp2-q64", "ensemble": "v9"}) is None
    assert predictor_parts({"llm": "exp2-q64", "ensemble": "v2", "set": {"match": False}}) == ["llm", "ngram", "bias", "mixer", "skip"]


def start_long_compression(folder: Path) -> subprocess.Popen:
    """``nacrith long.txt`` in ``folder`` with two workers, each block about a minute of
    coding here; stderr is piped."""
    import signal

    source = folder / "long.txt"
    source.write_bytes(TEXT * 60)
    # as from a terminal: under nohup the tests inherit an ignored SIGHUP, which nacrith keeps
    default_hangup = (lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)) if hasattr(signal, "SIGHUP") else None
    return subprocess.Popen([*NACRITH, source, "--workers", "2", "--block-size", "24000"], stderr=subprocess.PIPE, preexec_fn=default_hangup)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_termination_removes_partial_output_and_stops_workers(tmp_path: Path, signame: str):
    """kill (SIGTERM) or a closed terminal (SIGHUP) mid-way: no partial file is left, the
    exit status is 128 + the signal, and the worker processes stop at once (the input
    would take minutes)."""
    import signal
    import time

    process = start_long_compression(tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not any(p.suffix == ".part" for p in tmp_path.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "no partial output appeared"
            time.sleep(0.2)
        time.sleep(3)  # the workers are coding by now
        process.send_signal(getattr(signal, signame))
        _, stderr = process.communicate(timeout=30)  # each block alone takes about a minute here
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + getattr(signal, signame)
    assert stderr.decode().strip() == "nacrith: terminated"
    assert [p.name for p in tmp_path.iterdir()] == ["long.txt"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker through /proc")
def test_killed_worker_is_a_one_line_error(tmp_path: Path):
    """A worker process killed mid-way (as the kernel's OOM killer would): a one-line error
    naming the cause, exit status 1, no partial output."""
    import signal
    import time

    process = start_long_compression(tmp_path)
    try:
        deadline, workers = time.monotonic() + 120, []
        while not workers:  # the parent's children that multiprocessing spawned (not its resource tracker)
            assert process.poll() is None and time.monotonic() < deadline, "no worker process appeared"
            time.sleep(0.2)
            for entry in Path("/proc").iterdir():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if entry.name.isdigit() and int(fields[1]) == process.pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                        workers.append(int(entry.name))
                except (OSError, IndexError, ValueError):
                    continue
        time.sleep(3)  # coding by now
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    message = stderr.decode()
    assert len(message.strip().splitlines()) == 1 and "worker process stopped unexpectedly" in message, message
    assert [p.name for p in tmp_path.iterdir()] == ["long.txt"]


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="POSIX signals")
def test_an_ignored_hangup_stays_ignored():
    """Under nohup (SIGHUP ignored) a closed terminal must not stop the run; SIGTERM still does."""
    import signal

    from nacrith.cli import _raise_terminated, catch_termination

    saved = signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        catch_termination()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is _raise_terminated
    finally:
        signal.signal(signal.SIGHUP, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
