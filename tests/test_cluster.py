"""Ray: blocks coded on actors give the local container byte for byte, survive killed actors,
and refuse what a cluster cannot do in one line, leaving no output."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nacrith import cluster, pipeline
from nacrith.errors import ClusterError, ModelMismatchError, ModelNotFoundError

from .conftest import SMALL

ray = pytest.importorskip("ray", reason="Ray is not installed (make install-ray)")

pytestmark = pytest.mark.model

TEXT = (b"The quick brown fox jumps over the lazy dog; the dog, being lazy, does not jump at all. "
        b"Pack my box with five dozen liquor jugs, said the sphinx of black quartz to the judge. ") * 6
OPTIONS = dict(fallback=False, block_size=len(TEXT) // 4, streams=2, **SMALL)  # four blocks


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs, used by every pipeline call of this module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_blob():
    return pipeline.compress(TEXT, **OPTIONS)


def test_blocks_on_ray_make_the_local_container(local_ray, local_blob):
    progress = []
    assert pipeline.compress(TEXT, progress=progress.append, ray="local", workers=2, **OPTIONS) == local_blob
    assert sum(progress) == len(TEXT)  # a progress step per block, over the whole input
    assert pipeline.decompress(local_blob) == TEXT
    assert pipeline.decompress(local_blob, ray="local") == TEXT
    assert cluster.LAST_REPORT and cluster.LAST_REPORT[0].startswith("ray: ")


def test_actor_count_follows_workers_and_the_cluster(local_ray):
    assert cluster.actor_count(local_ray, "auto", False, 1, None) == 2  # one per CPU of the cluster
    assert cluster.actor_count(local_ray, "auto", False, 2, None) == 1  # of two threads each
    assert cluster.actor_count(local_ray, "auto", False, 1, 1) == 1  # no more than the blocks
    assert cluster.actor_count(local_ray, 1, False, 1, None) == 1
    assert cluster.actor_count(local_ray, 3, False, 1, None) == 3
    with pytest.raises(ClusterError, match="PxL"):
        cluster.actor_count(local_ray, "2x2", False, 1, None)
    with pytest.raises(ClusterError, match="no GPU"):
        cluster.actor_count(local_ray, "auto", True, 1, None)


@pytest.mark.slow
@pytest.mark.parametrize("restart", [True, False], ids=["ray-restarts-it", "a-fresh-actor"])
def test_a_killed_actor_loses_nothing(local_ray, local_blob, monkeypatch, restart):
    """An actor killed while its block runs: Ray restarts it and retries the block, or (no
    restart left) nacrith gives the block to a fresh actor; the container is the same."""
    submit, killed = cluster.RayPool._submit, []

    def submit_then_kill(self, index, method, item, extra):
        reference = submit(self, index, method, item, extra)
        if not killed:
            actor = self.actors[index]
            if restart:
                os.kill(local_ray.get(actor.pid.remote()), signal.SIGKILL)  # pid answered before the block: actor tasks run in order
            else:
                local_ray.kill(actor, no_restart=True)
            killed.append(index)
        return reference

    monkeypatch.setattr(cluster.RayPool, "_submit", submit_then_kill)
    assert pipeline.compress(TEXT, ray="local", workers=2, **OPTIONS) == local_blob
    assert killed


def test_a_model_missing_on_the_nodes_is_one_error(local_ray, monkeypatch, tmp_path):
    """The job's model (here a small random one, not of the zoo, which a node could find by
    its SHA-256) is not where the nodes look for it."""
    from nacrith.exact import tiny

    monkeypatch.setenv("NACRITH_MODEL", str(tiny.write_tiny_llama(tmp_path / "job.gguf", seed=5)))
    monkeypatch.setitem(cluster.ACTOR_OPTIONS, "runtime_env", {"env_vars": {"NACRITH_MODEL": "/nonexistent/model.gguf"}})
    with pytest.raises(ModelNotFoundError, match="on Ray node .*/nonexistent/model.gguf"):
        pipeline.compress(TEXT, ray="local", workers=2, **OPTIONS)


def test_another_model_file_on_the_nodes_is_refused(local_ray, monkeypatch, tmp_path):
    from nacrith.exact import tiny

    monkeypatch.setenv("NACRITH_MODEL", str(tiny.write_tiny_llama(tmp_path / "job.gguf", seed=5)))
    other = tiny.write_tiny_llama(tmp_path / "other.gguf", seed=6)
    monkeypatch.setitem(cluster.ACTOR_OPTIONS, "runtime_env", {"env_vars": {"NACRITH_MODEL": str(other)}})
    with pytest.raises(ModelMismatchError, match="is another file"):
        pipeline.compress(TEXT, ray="local", workers=2, **OPTIONS)


def _nacrith(*args, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom nacrith.cli import main\nsys.argv[0] = 'nacrith'\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)


def _one_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    message = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in message, message
    assert len(message.strip().splitlines()) == 1 and fragment in message, message


def test_without_ray_the_option_says_how_to_install_it(tmp_path: Path):
    source = tmp_path / "story.txt"
    source.write_bytes(TEXT)
    result = _nacrith("compress", "--ray", "local", source, prelude="import sys; sys.modules['ray'] = None")
    _one_line(result, "make install-ray")
    assert not (tmp_path / "story.txt.nc").exists()


def test_an_unreachable_cluster_is_one_line(tmp_path: Path):
    source = tmp_path / "story.txt"
    source.write_bytes(TEXT)
    result = _nacrith("compress", "--ray", "127.0.0.1:9", source)
    _one_line(result, "cannot reach the Ray cluster at 127.0.0.1:9")
    assert not (tmp_path / "story.txt.nc").exists()
    packed = tmp_path / "packed.nc"
    packed.write_bytes(pipeline.compress(TEXT[:300]))
    _one_line(_nacrith("decompress", "--ray", "127.0.0.1:9", "-o", tmp_path / "out", packed), "cannot reach the Ray cluster")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_cli_codes_on_ray_and_the_file_decodes_without_it(tmp_path: Path):
    """A whole `nacrith --ray local` process: its own Ray instance, the same container, -v's node line."""
    source = tmp_path / "story.txt"
    source.write_bytes(TEXT)
    result = _nacrith("compress", "-v", "--ray", "local", "--workers", "2", "--block-size", OPTIONS["block_size"], "--streams", 2, "--ctx", 32,
                      "--slide", 8, source)
    assert result.returncode == 0, result.stderr.decode()
    assert b"ray: " in result.stderr
    out = io.BytesIO()
    pipeline.decompress_to((tmp_path / "story.txt.nc").read_bytes(), out)
    assert out.getvalue() == TEXT
