"""Kill a real `qstream quantize` process with SIGKILL at many points; `--resume` must finish
the job byte-identically, and nothing half-written may ever look like a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qstream.common import REPORT_NAME
from qstream.errors import QstreamError
from qstream.io.checkpoint import open_checkpoint
from qstream.io.staging import temp_dir_for
from tests.fixtures import assert_same_files

ARGS = ["--max-shard-size", "48KiB", "--no-progress"]

# A child that counts every write qstream makes and SIGKILLs itself at the Nth one.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import qstream.convert.pipeline as pipeline
    import qstream.io.safetensors_io as io
    import qstream.io.staging as staging
    limit = int(os.environ["KILL_AT"])
    count = 0
    def counted(fn):
        def wrapper(*a, **k):
            global count
            count += 1
            if count >= limit:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapper
    io.ShardWriter.write = counted(io.ShardWriter.write)
    io.ShardWriter.copy_from = counted(io.ShardWriter.copy_from)
    pipeline.write_json = counted(pipeline.write_json)
    staging.write_json = counted(staging.write_json)
    staging.publish = counted(staging.publish)
    from qstream.cli import main
    sys.argv = ["qstream"] + sys.argv[1:]
    main()
    """
)


def qstream(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qstream", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_qwen3_moe) -> Path:
    dst = tmp_path_factory.mktemp("ref") / "q"
    r = qstream("quantize", str(tiny_qwen3_moe), str(dst), *ARGS)
    assert r.returncode == 0, r.stderr
    assert len(list(dst.glob("*.safetensors"))) > 3
    return dst


@pytest.mark.parametrize("kill_at", [1, 3, 40, 150, 400, 10_000])
def test_kill_then_resume_is_byte_identical(tmp_path, tiny_qwen3_moe, reference, kill_at) -> None:
    dst = tmp_path / "q"
    env = {**os.environ, "KILL_AT": str(kill_at)}
    killed = subprocess.run([sys.executable, "-c", KILLER, "quantize", str(tiny_qwen3_moe), str(dst), *ARGS],
                            env=env, capture_output=True, text=True)
    tmp = temp_dir_for(dst)
    if killed.returncode == -signal.SIGKILL:
        assert not dst.exists() or not tmp.exists(), "an unfinished output must not sit at DST"
        if tmp.exists():
            with pytest.raises(QstreamError, match="unfinished"):
                open_checkpoint(tmp)
            again = qstream("quantize", str(tiny_qwen3_moe), str(dst), *ARGS)
            assert again.returncode == 2 and "--resume" in again.stderr and not dst.exists()
    else:
        assert killed.returncode == 0, killed.stderr  # the kill point lies past the end of the run
    if not dst.exists():
        r = qstream("quantize", str(tiny_qwen3_moe), str(dst), *ARGS, "--resume")
        assert r.returncode == 0, r.stderr
    assert_same_files(dst, reference, skip=(REPORT_NAME,))  # the card included: it holds no times
    assert not tmp.exists()


def test_resume_refuses_other_settings(tmp_path, tiny_qwen3_moe) -> None:
    dst = tmp_path / "q"
    env = {**os.environ, "KILL_AT": "30"}
    killed = subprocess.run([sys.executable, "-c", KILLER, "quantize", str(tiny_qwen3_moe), str(dst), *ARGS],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    r = qstream("quantize", str(tiny_qwen3_moe), str(dst), *ARGS, "--rule", "floor", "--resume")
    assert r.returncode == 2 and "other settings" in r.stderr
    r = qstream("quantize", str(tiny_qwen3_moe), str(dst), *ARGS, "--rule", "floor", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not temp_dir_for(dst).exists()
