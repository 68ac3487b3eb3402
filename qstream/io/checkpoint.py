"""A Hugging Face checkpoint directory seen as a set of named tensors, read from headers alone."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import torch

from qstream.errors import QstreamError
from qstream.io.safetensors_io import TensorInfo, read_header, read_rows

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
IN_PROGRESS_MARKER = ".qstream-in-progress"  # present while an output is unfinished


class CheckpointTensor(Protocol):
    """What every tensor of a checkpoint offers, whatever holds it: a plain tensor in a file (SourceTensor), an
    FP8/MXFP8 weight decoded on read, gpt-oss's packed MXFP4 experts, or a slice of a fused vector (the last
    three in qstream.io.source_formats). `info` is the logical tensor (name, dtype, shape); a tensor kept in
    its source precision names in `stored` the source tensors that hold it as it is."""

    @property
    def info(self) -> TensorInfo: ...

    @property
    def name(self) -> str: ...

    @property
    def file(self) -> Path: ...  # the file it is read from, for fingerprints and messages

    @property
    def copyable(self) -> bool: ...  # its bytes go to the output unchanged when it is not quantized

    @property
    def stored(self) -> tuple[SourceTensor, ...]: ...  # () unless a kept-precision weight

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of its values, the tensor seen as [-1, last_dim]."""
        ...


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a checkpoint as a file holds it: which file, and where in it."""

    file: Path
    info: TensorInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def copyable(self) -> bool:
        return True

    @property
    def stored(self) -> tuple[SourceTensor, ...]:
        return ()

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the tensor seen as [-1, last_dim]."""
        return read_rows(self.file, self.info, r0, r1)


T = TypeVar("T", bound=CheckpointTensor, covariant=True)


@dataclass(frozen=True)
class Checkpoint(Generic[T]):
    """Config plus every tensor of a checkpoint, in a stable order (file, then offset). As opened, every
    tensor is a SourceTensor; `source_formats.decode_checkpoint` gives the tensors the files encode."""

    root: Path
    config: dict
    tensors: Mapping[str, T]
    weight_files: tuple[Path, ...]

    @property
    def text_config(self) -> dict:
        """The language model's settings (nested under text_config for multimodal models)."""
        return self.config.get("text_config") or self.config


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise QstreamError(f"{path}: missing; {what}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QstreamError(f"{path}: not readable JSON ({exc}); fix or re-download it") from exc
    if not isinstance(data, dict):
        raise QstreamError(f"{path}: expected a JSON object; fix or re-download it")
    return data


def _weight_files(root: Path) -> tuple[Path, ...]:
    index = root / INDEX_NAME
    if index.exists():
        weight_map = _load_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise QstreamError(f"{index}: has no weight_map; re-download the checkpoint's index")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (root / name).is_file():
                raise QstreamError(f"{index}: names shard {name!r}, which is missing from {root}; download it")
        return tuple(root / f for f in files)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise QstreamError(f"{root}: no *.safetensors files and no {INDEX_NAME}; is this a Hugging Face checkpoint?")
    return tuple(files)


def require_dir(root: Path) -> Path:
    """A checkpoint argument must be an existing local directory; say which of the two it is not."""
    if not root.exists():
        raise QstreamError(f"{root}: does not exist; give a local checkpoint directory")
    if not root.is_dir():
        raise QstreamError(f"{root}: not a directory; give a local checkpoint directory")
    return root


def open_checkpoint(root: Path, *, unfinished_ok: bool = False) -> Checkpoint[SourceTensor]:
    """Read config.json and every shard header; check the index agrees with the shards.

    `unfinished_ok` lets the writer check its own output before marking it complete.
    """
    root = require_dir(Path(root))
    if not unfinished_ok and (root / IN_PROGRESS_MARKER).exists():
        raise QstreamError(f"{root}: an unfinished qstream output; finish it with `qstream quantize --resume`")
    config = _load_json(root / CONFIG_NAME, "a checkpoint directory needs the model's config.json")
    files = _weight_files(root)
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        header = read_header(path)
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
            if name in tensors:
                raise QstreamError(f"{root}: tensor {name!r} is in both {tensors[name].file.name} and {path.name}")
            tensors[name] = SourceTensor(path, info)
    index = root / INDEX_NAME
    if index.exists():
        weight_map = _load_json(index, "")["weight_map"]
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file.name != fname:
                raise QstreamError(f"{index}: says {name!r} is in {fname}, but it is not there; the index is stale")
        for name, t in tensors.items():
            if name not in weight_map:
                raise QstreamError(f"{index}: does not list {name!r} (in {t.file.name}); the index is stale")
    return Checkpoint(root=root, config=config, tensors=tensors, weight_files=files)
