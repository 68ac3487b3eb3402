"""Writing a checkpoint's weights: shard files that appear under their names only when complete, and the index.

Shared by `quantize` and `dequantize`. A shard is written as `<name>.partial` through a ShardWriter and
renamed once every tensor is complete and synced, so a directory never holds a shard file that is short
(and a resumed run can trust every shard it finds). The index lists each tensor's shard.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from qstream.io.checkpoint import INDEX_NAME
from qstream.io.safetensors_io import OutEntry, ShardWriter
from qstream.io.staging import write_json

PARTIAL = ".partial"  # suffix of a shard still being written
METADATA = {"format": "pt"}  # what transformers expects in a safetensors header


@contextlib.contextmanager
def shard_file(directory: Path, file_name: str, entries: Sequence[OutEntry],
               partial_suffix: str = PARTIAL) -> Iterator[ShardWriter]:
    """A ShardWriter on directory/<file_name><partial_suffix> (ending in .partial), renamed to file_name when
    the block succeeds. Writers that may overlap on one shard (a retried task) each take their own suffix."""
    partial = directory / f"{file_name}{partial_suffix}"
    with ShardWriter(partial, list(entries), metadata=METADATA) as writer:
        yield writer
    os.replace(partial, directory / file_name)


def write_index(directory: Path, shards: Iterable[tuple[str, Sequence[OutEntry]]]) -> None:
    """model.safetensors.index.json for (file name, entries) shards: total tensor bytes, each tensor's file."""
    shards = list(shards)
    write_json(directory / INDEX_NAME, {
        "metadata": {"total_size": sum(e.nbytes for _, entries in shards for e in entries)},
        "weight_map": {e.name: file_name for file_name, entries in shards for e in entries},
    })
