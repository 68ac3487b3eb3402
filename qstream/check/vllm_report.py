"""What `verify --vllm` reports: per module, the scheme vLLM chose against what the checkpoint holds, and
every problem vLLM's loading showed."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from qstream.format.formats import BF16, FP8, MXFP4, MXFP8

QUANTIZED_FORMATS = {MXFP4, FP8, MXFP8}
SHOWN = 20  # problems listed in the summary; the report keeps them all


@dataclass(frozen=True)
class ModuleRow:
    """One vLLM module that may be quantized, and what the checkpoint wrote into it."""

    name: str  # vLLM's module name (after fusing and prefix renames)
    kind: str  # vLLM layer class: QKVParallelLinear, RoutedExperts, ParallelLMHead, ...
    scheme: str  # vLLM's scheme or quant method class
    kernel: str  # the kernel vLLM chose for it on this machine ("" if none applies)
    built: str  # the storage vLLM built parameters for: MXFP4, FP8, MXFP8 or BF16 (unquantized)
    holds: tuple[str, ...]  # formats of the checkpoint tensors written into it: "MXFP4", "FP8", "BF16", ...

    @property
    def quantized(self) -> bool:
        return self.built != BF16

    @property
    def agrees(self) -> bool:
        if self.quantized:
            return not self.holds or set(self.holds) == {self.built}
        return not QUANTIZED_FORMATS & set(self.holds)


@dataclass
class VllmReport:
    """vLLM's verdict on one checkpoint; `ok` only when every list of problems is empty."""

    dst: Path
    vllm_version: str
    platform: str
    models: list[str] = field(default_factory=list)
    modules: list[ModuleRow] = field(default_factory=list)
    tensors: int = 0  # checkpoint tensors offered to vLLM's loaders
    errors: list[str] = field(default_factory=list)  # vLLM raised
    mismatches: list[str] = field(default_factory=list)  # scheme vs checkpoint, casts, broadcasts
    unconsumed: list[str] = field(default_factory=list)  # checkpoint tensors no loader consumes
    unwritten: list[str] = field(default_factory=list)  # parameter regions nothing writes
    overwritten: list[str] = field(default_factory=list)  # regions written more than once
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the check itself, vLLM's import excluded
    peak_rss_bytes: int = 0  # of the whole process

    @property
    def problems(self) -> list[str]:
        return [
            *self.errors,
            *self.mismatches,
            *(f"{t}: no vLLM loader consumes this checkpoint tensor" for t in self.unconsumed),
            *(f"{u}: nothing writes it (vLLM would serve uninitialised memory)" for u in self.unwritten),
            *self.overwritten,
        ]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        problems = self.problems
        verdict = "OK: vLLM loads every tensor as the checkpoint means it"
        head = verdict if self.ok else f"FAILED: {len(problems)} problem(s)"
        lines = [
            f"vLLM {self.vllm_version} ({self.platform}) judged {self.dst}: {head}",
            f"  models: {', '.join(self.models) or 'none built'}; {self.tensors} checkpoint tensors offered, "
            f"{len(self.unconsumed)} unconsumed; {self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB",
            "  modules (vLLM scheme [kernel] <- what the checkpoint holds):",
            *(f"    {line}" for line in _module_groups(self.modules)),
            *(f"  note: {n}" for n in self.notes),
            *(f"  problem: {p}" for p in problems[:SHOWN]),
        ]
        if len(problems) > SHOWN:
            lines.append(f"  ... and {len(problems) - SHOWN} more problem(s)")
        return "\n".join(lines)


def _module_groups(rows: list[ModuleRow]) -> list[str]:
    """Rows that differ only in layer numbers, as one line each."""
    groups: dict[tuple, int] = defaultdict(int)
    for r in rows:
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", r.name)
        groups[(pattern, r.kind, r.scheme, r.kernel, "+".join(r.holds) or "nothing", r.agrees)] += 1
    return [
        f"{pattern}  {kind} x{n}  {scheme}{f' [{kernel}]' if kernel else ''} <- {holds}{'' if agrees else '  MISMATCH'}"
        for (pattern, kind, scheme, kernel, holds, agrees), n in groups.items()
    ]
