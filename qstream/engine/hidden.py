"""Hidden states of every token of a job between layers: in CPU memory, or in a file when over a budget.

A row is one token's hidden state. Layers read a batch of rows, compute and write the result back over the
same rows, so one buffer serves every layer. The file is read and written with pread/pwrite, never mapped,
so a spilled store costs the batch in flight and no resident memory (the page cache may keep it, as it keeps
the checkpoint). In memory, the rows may live on the engine's GPU: then no host memory holds them and no batch
crosses the bus twice per layer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from qstream.io.safetensors_io import pread_parts

DEFAULT_BUDGET = 4 << 30  # bytes of hidden states held in memory before spilling to a file


class HiddenStore:
    """rows x width hidden states of `dtype`, in `device` memory; `spill_dir` holds the file when rows x width
    exceeds `budget` (a spilled store hands out CPU rows)."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, budget: int = DEFAULT_BUDGET,
                 spill_dir: Path | None = None, device: torch.device | str = "cpu") -> None:
        self.rows, self.width, self.dtype = rows, width, dtype
        self.row_bytes = width * torch.empty((), dtype=dtype).element_size()
        self._mem: torch.Tensor | None = None
        self._fd = -1
        self.path: Path | None = None
        if rows * self.row_bytes <= budget:
            self._mem = torch.empty(rows, width, dtype=dtype, device=device)
        else:
            fd, name = tempfile.mkstemp(prefix="qstream-hidden-", suffix=".bin", dir=spill_dir)
            self._fd, self.path = fd, Path(name)
            os.ftruncate(fd, rows * self.row_bytes)

    @property
    def spilled(self) -> bool:
        return self._mem is None

    def read(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) as a new tensor [r1 - r0, width] (on the store's device; CPU when spilled)."""
        if self._mem is not None:
            return self._mem[r0:r1].clone()
        out = torch.empty(r1 - r0, self.width, dtype=self.dtype)
        if not pread_parts(self._fd, out.view(torch.uint8).numpy().data.cast("B"), r0 * self.row_bytes):
            raise OSError(f"{self.path}: short read")
        return out

    def write(self, r0: int, rows: torch.Tensor) -> None:
        """Put `rows` [n, width] at rows [r0, r0 + n)."""
        if self._mem is not None:
            rows = rows.detach().to(self._mem.device, self.dtype).reshape(-1, self.width)
            self._mem[r0:r0 + rows.shape[0]] = rows
            return
        rows = rows.detach().to("cpu", self.dtype).reshape(-1, self.width)
        view = rows.contiguous().view(torch.uint8).numpy().data.cast("B")
        done, offset = 0, r0 * self.row_bytes
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def close(self) -> None:
        """Release the memory or delete the file."""
        self._mem = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self.path is not None:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> HiddenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
