"""qstream.io.staging: outputs appear at DST only when complete; unfinished ones are kept only to be resumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from qstream.errors import QstreamError
from qstream.io.checkpoint import IN_PROGRESS_MARKER
from qstream.io.staging import PLAN_NAME, check_destination, copy_side_files, staging, temp_dir_for


@pytest.fixture
def src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("config.json", "model.safetensors.index.json", "a.safetensors", "tokenizer.json", "sub/chat.jinja",
                 ".hidden"):
        (src / name).write_text(name)
    return src


def test_destinations_that_would_destroy_something_are_refused(src: Path, tmp_path: Path) -> None:
    with pytest.raises(QstreamError, match="must not be the source or inside it"):
        check_destination(src, src / "out", overwrite=True)
    with pytest.raises(QstreamError, match="must not contain the source"):
        check_destination(src, tmp_path, overwrite=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(QstreamError, match="already exists; pass --overwrite"):
        check_destination(src, tmp_path / "taken", overwrite=False)
    with pytest.raises(QstreamError, match="does not exist; create it first"):
        check_destination(src, tmp_path / "no" / "out", overwrite=False)


def test_success_publishes_and_failure_leaves_nothing(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(ValueError):
        with staging(src, dst, overwrite=False, writer="test") as tmp:
            assert (tmp / IN_PROGRESS_MARKER).exists() and not dst.exists()
            (tmp / "w.safetensors").write_text("half")
            raise ValueError("bad input")
    assert not dst.exists() and not temp_dir_for(dst).exists()
    with staging(src, dst, overwrite=False, writer="test") as tmp:
        (tmp / "w.safetensors").write_text("whole")
    assert (dst / "w.safetensors").read_text() == "whole"
    assert not (dst / IN_PROGRESS_MARKER).exists() and not temp_dir_for(dst).exists()


def test_an_os_error_keeps_finished_files_for_resume_only_with_the_same_fingerprint(src: Path, tmp_path: Path) -> None:
    dst, fp = tmp_path / "out", {"source": "x", "rule": "mse3"}
    with pytest.raises(QstreamError, match="finished shards are kept: rerun with --resume"):
        with staging(src, dst, False, "test", fingerprint=fp, bookkeeping=("*.stats",)) as tmp:
            (tmp / "1.safetensors").write_text("done")
            (tmp / "1.stats").write_text("{}")
            (tmp / "2.safetensors.partial").write_text("half")
            raise OSError(28, "No space left on device")
    tmp = temp_dir_for(dst)
    assert (tmp / "1.safetensors").exists() and not (tmp / "2.safetensors.partial").exists()
    with pytest.raises(QstreamError, match="did not finish; pass --resume"):
        with staging(src, dst, False, "test", fingerprint=fp):
            pass
    with pytest.raises(QstreamError, match="started from another source or with other settings"):
        with staging(src, dst, False, "test", fingerprint={**fp, "rule": "even"}, resume=True):
            pass
    with staging(src, dst, False, "test", fingerprint=fp, resume=True, bookkeeping=("*.stats",)) as tmp:
        assert (tmp / "1.safetensors").read_text() == "done"
    assert sorted(p.name for p in dst.iterdir()) == ["1.safetensors"]  # no marker, fingerprint or bookkeeping
    assert not (dst / PLAN_NAME).exists()


def test_side_files_are_every_non_weight_file(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert copy_side_files(src, out, frozenset({"tokenizer.json"})) == ["sub/chat.jinja"]
    assert (out / "sub" / "chat.jinja").read_text() == "sub/chat.jinja"
    assert copy_side_files(src, out) == ["sub/chat.jinja", "tokenizer.json"]
