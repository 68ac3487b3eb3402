"""Where outputs are written until they are complete: a temp dir beside DST, renamed at the end.

An output is never visible at DST before every file is written; a directory that is still being
written carries IN_PROGRESS_MARKER, which every reader refuses. With a fingerprint (what must match
for a later run to continue this one) an interrupted run keeps its finished files for `--resume`.
Knows files and directories only, nothing about tensors or quantization.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from qstream.errors import Interrupted, QstreamError
from qstream.io.checkpoint import CONFIG_NAME, IN_PROGRESS_MARKER, INDEX_NAME

PLAN_NAME = ".qstream-plan.json"  # the fingerprint a resumed run must match


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse destinations that would destroy the source or an existing checkpoint."""
    src, dst = src.resolve(), dst.resolve()
    if dst == src or src in dst.parents:
        raise QstreamError(f"{dst}: the output must not be the source or inside it; choose a directory elsewhere")
    if dst in src.parents:
        raise QstreamError(f"{dst}: the output must not contain the source; choose a directory elsewhere")
    if dst.exists() and not dst.is_dir():
        raise QstreamError(f"{dst}: is a file, not a checkpoint directory; choose another output directory "
                           "(--overwrite replaces directories only)")
    if dst.exists() and not overwrite:
        raise QstreamError(f"{dst}: already exists; pass --overwrite to replace it or choose another directory")
    if not dst.parent.is_dir():
        raise QstreamError(f"{dst.parent}: does not exist; create it first")
    if not os.access(dst.parent, os.W_OK):
        raise QstreamError(f"{dst.parent}: not writable; choose a directory you can write to")


def temp_dir_for(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.qstream-partial"


def calib_dir_for(dst: Path) -> Path:
    """Where `quantize --method imatrix` without --calib writes the statistics it calibrates first."""
    return dst.parent / f".{dst.name}.qstream-calib"


def gptq_dir_for(dst: Path) -> Path:
    """Where `quantize --method gptq` writes the modules it solves before the conversion writes DST."""
    return dst.parent / f".{dst.name}.qstream-gptq"


def copy_side_files(src: Path, tmp: Path, also_skip: frozenset[str] = frozenset()) -> list[str]:
    """Tokenizer, templates, licences, ...: every non-weight file, unchanged (but those in `also_skip`)."""
    skip = {CONFIG_NAME, INDEX_NAME, *also_skip}
    copied = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or path.suffix == ".safetensors" or str(rel) in skip or rel.parts[0].startswith("."):
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, tmp / rel)
        copied.append(str(rel))
    return copied


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def publish(tmp: Path, dst: Path) -> None:
    (tmp / IN_PROGRESS_MARKER).unlink()
    if dst.exists():
        trash = dst.parent / f".{dst.name}.qstream-old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
        os.replace(tmp, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(exc: OSError, tmp: Path) -> QstreamError:
    if exc.errno == errno.ENOSPC:
        return QstreamError(f"{tmp}: disk full ({exc.filename or 'while writing'}); free space and run again")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return QstreamError(f"{exc.filename or tmp}: not writable ({exc.strerror}); choose a writable output")
    return QstreamError(f"{exc.filename or tmp}: {exc.strerror}")


def _open_staging(tmp: Path, writer: str, overwrite: bool, fp: dict | None, resume: bool) -> None:
    """Create the temp dir, or with `resume` reuse an earlier one whose fingerprint matches."""
    if tmp.exists():
        if resume and fp is not None:
            try:
                recorded = json.loads((tmp / PLAN_NAME).read_text())
            except (OSError, json.JSONDecodeError):
                recorded = None
            if recorded is not None and recorded != fp:
                raise QstreamError(
                    f"{tmp}: the unfinished output was started from another source or with other settings; "
                    "run the same command as before, or pass --overwrite to start over"
                )
            if recorded is not None:
                for partial in tmp.glob("*.partial"):
                    partial.unlink()
                return
            shutil.rmtree(tmp)  # killed before its fingerprint was written: nothing was done yet
        elif not overwrite:
            how = "pass --resume to finish it or --overwrite" if fp is not None else "pass --overwrite"
            raise QstreamError(f"{tmp}: an earlier run of this output did not finish; {how} to start over")
        else:
            shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / IN_PROGRESS_MARKER).write_text(f"{writer} is writing this directory\n")
    if fp is not None:
        write_json(tmp / PLAN_NAME, fp)


@contextlib.contextmanager
def staging(src: Path, dst: Path, overwrite: bool, writer: str, fingerprint: dict | None = None,
            resume: bool = False, bookkeeping: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temp dir beside dst, marked unfinished, published as dst when the block succeeds.

    Without a `fingerprint` any failure removes the temp dir. With one, an interrupt (raised as
    `Interrupted`, naming the temp dir) or an OS error (disk full) keeps the finished shards, so a
    later call with `resume` can continue;
    an error in the input still removes everything. dst is never touched before the end. Files
    matching the `bookkeeping` globs (kept for resuming) are removed before publishing.
    """
    dst = Path(dst)
    check_destination(src, dst, overwrite)
    tmp = temp_dir_for(dst)
    try:
        _open_staging(tmp, writer, overwrite, fingerprint, resume)
    except OSError as exc:
        raise _os_error(exc, tmp) from exc
    keep = False
    try:
        yield tmp
        (tmp / PLAN_NAME).unlink(missing_ok=True)
        for pattern in bookkeeping:
            for path in tmp.glob(pattern):
                path.unlink()
        publish(tmp, dst)
    except OSError as exc:
        keep = fingerprint is not None and tmp.exists()
        err = _os_error(exc, tmp)
        if keep:
            err = QstreamError(f"{err}; finished shards are kept: rerun with --resume to continue")
        raise err from exc
    except KeyboardInterrupt as exc:
        keep = fingerprint is not None and tmp.exists()
        if keep:
            raise Interrupted(tmp) from exc
        raise
    finally:
        if not keep and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        elif keep:
            for partial in tmp.glob("*.partial"):
                partial.unlink(missing_ok=True)


