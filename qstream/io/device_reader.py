"""Reading stored tensors (or row ranges of them) straight onto a device, for the engine and the conversion.

A fresh host tensor per read costs page faults, and a copy from pageable memory to a GPU is staged by the driver
and blocks the calling thread: at page-cache speed both show. So each reading thread keeps a few host buffers
(pinned for CUDA) that it fills in turn, and copies each piece to the device on a copy stream of its own: the
copy of one piece runs while the next is read into the next buffer, and a buffer is refilled only once its
copy has finished. A read returns once its copies are queued, having made the device's default stream wait for
them: work the consumer queues there after the read runs on the complete tensor, and the reading thread goes on
to the next read without waiting for the copy (a consumer on another stream would have to wait for the default
one). The tensor is recorded as used by the default stream, so its memory is not handed back to the copy stream
while kernels there still read it. Each piece is read in parts at once (`safetensors_io.pread_parts`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qstream.errors import QstreamError
from qstream.io.checkpoint import SourceTensor
from qstream.io.safetensors_io import pread_parts

READ_CHUNK = 16 << 20  # bytes per read: warming the page cache, reading onto a device
STAGING_BUFFERS = 2  # host buffers per reading thread: one being read into while the other is copied


@dataclass
class Staging:
    """One thread's host buffers, used in turn; on CUDA each with the event of the copy that last read it."""

    buffers: list[torch.Tensor]
    stream: torch.cuda.Stream | None = None
    events: list[torch.cuda.Event | None] = field(default_factory=list)
    turn: int = 0

    def __post_init__(self) -> None:
        self.events = [None] * len(self.buffers)

    def next(self) -> int:
        """The index of the buffer to fill next, once the copy that last read it has finished."""
        i = self.turn
        self.turn = (i + 1) % len(self.buffers)
        event = self.events[i]
        if event is not None:
            event.synchronize()
            self.events[i] = None
        return i

    def copied(self, i: int) -> None:
        """Buffer i's copy is queued on the stream: it may be refilled once that copy is done."""
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
            self.events[i] = event


class DeviceReader:
    """Reads stored bytes onto `device` through host buffers reused per thread (see the module's docstring)."""

    def __init__(self, device: torch.device, chunk: int = READ_CHUNK, buffers: int = STAGING_BUFFERS) -> None:
        self.device, self.chunk, self.buffers = torch.device(device), chunk, buffers
        self._local = threading.local()

    def _staging(self) -> Staging:
        if not hasattr(self._local, "staging"):
            cuda = self.device.type == "cuda"
            self._local.staging = Staging(
                [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(self.buffers)],
                torch.cuda.Stream(self.device) if cuda else None)
        return self._local.staging

    def read(self, file: Path, start: int, nbytes: int, name: str) -> torch.Tensor:
        """Bytes [start, start + nbytes) of `file` as a uint8 tensor on the device (`name` for messages)."""
        st = self._staging()
        fd = os.open(file, os.O_RDONLY)
        try:
            with torch.cuda.stream(st.stream) if st.stream is not None else contextlib.nullcontext():
                out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                for b in range(0, nbytes, self.chunk):
                    n = min(self.chunk, nbytes - b)
                    i = st.next()
                    if not pread_parts(fd, st.buffers[i].numpy().data.cast("B")[:n], start + b):
                        raise QstreamError(f"{file}: tensor {name!r} ends early; the file is truncated")
                    out[b:b + n].copy_(st.buffers[i][:n], non_blocking=st.stream is not None)
                    st.copied(i)
            if st.stream is not None:
                default = torch.cuda.default_stream(self.device)
                default.wait_stream(st.stream)
                out.record_stream(default)
        finally:
            os.close(fd)
        return out

    def __call__(self, t: SourceTensor) -> torch.Tensor:
        """The whole tensor, in its dtype and shape."""
        return self.read(t.file, t.info.start, t.info.nbytes, t.name).view(t.info.torch_dtype).reshape(t.info.shape)

    def rows(self, t: SourceTensor, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the tensor seen as [-1, last_dim], as `SourceTensor.read_rows` gives them."""
        cols = t.info.row_shape[1]
        row_bytes = t.info.nbytes // max(1, t.info.row_shape[0])
        data = self.read(t.file, t.info.start + r0 * row_bytes, (r1 - r0) * row_bytes, t.name)
        return data.view(t.info.torch_dtype).reshape(r1 - r0, cols)
