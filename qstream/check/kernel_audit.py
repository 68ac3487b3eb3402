"""The fast kernels held to the torch path on a seeded sample of blocks: what keeps `verify --source` independent
of the kernels that wrote the output while it re-quantizes at their speed.

The fast comparison (check.error_bound.compare_fast) takes the C or Triton kernel's bytes as the rule's bytes for
every block. This audit re-quantizes a sample of the blocks of every quantized source tensor with the torch path
(`qstream.format.mxfp4.quantize`, held bit for bit to the reference by the tests) and requires the kernel's bytes
for them to be the same, for every rule the kernel ran on them; any difference fails the check.

Detection: each tensor's sample is n = max(MIN_DRAWS, blocks / SHARE) blocks drawn uniformly and independently
(with replacement) from all its blocks; a tensor of at most MIN_DRAWS blocks is audited whole. A kernel bug that
writes wrong bytes for a fraction p of a tensor's blocks escapes its audit with probability (1 - p)^n < e^(-pn):
for a routed-expert tensor of Qwen3.5-35B-A3B (256 x 1024 x 2048, 16.8 M blocks, n = 16384) that is below 1e-7
for p = 1e-3 and below 1e-71 for p = 1e-2. A systematic bug (a wrong branch, index or rounding path taken for some
pattern of values or positions) hits every tensor alike, so it escapes the whole audit with probability
(1 - p)^N for the N blocks drawn in all: N is about one block in a thousand, 1 M blocks for the 35B model's
80 expert tensors, so even p = 1e-4 escapes with e^-100. Drawing is the seed's (`--seed`, default 0) and the
tensor name's: reproducible, and different for each tensor. The torch path on 0.1% of the blocks costs a few
percent of the kernel's time; `verify --full` re-quantizes every block through it instead.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import torch

from qstream.check.error_bound import blocks_equal
from qstream.format.mxfp4 import BLOCK, Quantized, quantize
from qstream.format.rules import Rule

MIN_DRAWS = 256  # blocks drawn from every tensor, however small (all of a tensor this small)
SHARE = 1024  # and one draw per SHARE blocks of a larger one
FLUSH_BLOCKS = 64 * 1024  # sampled blocks gathered before the torch path runs on them (one call, many tensors)


@dataclass(frozen=True)
class Sampling:
    """Which blocks of each tensor the audit re-quantizes with the torch path."""

    seed: int = 0
    min_draws: int = MIN_DRAWS
    share: int = SHARE

    def draws(self, blocks: int) -> int:
        return max(self.min_draws, blocks // self.share)

    def blocks(self, name: str, blocks: int) -> torch.Tensor | None:
        """Sorted distinct flat block indices of tensor `name` (seen as [-1, 32] blocks); None for all of them."""
        n = self.draws(blocks)
        if blocks <= n:
            return None
        key = hashlib.sha256(f"{self.seed}\0{name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        return torch.randint(blocks, (n,), generator=g).unique()


DEFAULT_SAMPLING = Sampling()


class _Pending:
    """Sampled blocks gathered for one rule: source blocks (float32, exact for every input dtype) and the kernel's
    bytes for them, in buffers allocated once: many small long-lived tensors among the chunks' large ones would
    keep the allocator from returning freed memory (glibc held 1 GiB that way)."""

    def __init__(self, device: torch.device) -> None:
        self.w = torch.empty(FLUSH_BLOCKS, BLOCK, device=device)
        self.packed = torch.empty(FLUSH_BLOCKS, BLOCK // 2, dtype=torch.uint8, device=device)
        self.scales = torch.empty(FLUSH_BLOCKS, 1, dtype=torch.uint8, device=device)
        self.spans: list[tuple[str, int]] = []  # (tensor, blocks) in buffer order
        self.used = 0


class KernelAudit:
    """Gathers the sampled blocks of each chunk as the fast comparison sees them and re-quantizes them with the
    torch path in batches; `failures` names every tensor where the kernel's bytes differ."""

    def __init__(self, sampling: Sampling, backend: str) -> None:
        self.sampling, self.backend = sampling, backend
        self._pending: dict[Rule, _Pending] = {}
        self.drawn: dict[str, int] = defaultdict(int)  # distinct blocks audited per tensor
        self.wrong: dict[tuple[str, Rule], int] = defaultdict(int)
        self.audited: dict[tuple[str, Rule], int] = defaultdict(int)

    def add(self, name: str, local: torch.Tensor | None, w: torch.Tensor, ran: dict[Rule, Quantized]) -> None:
        """The blocks `local` (flat indices into the chunk; None: all) of chunk w and the kernel's bytes for them."""
        idx = torch.arange(w.numel() // BLOCK) if local is None else local
        self.drawn[name] += idx.numel()
        for part in idx.to(w.device).split(FLUSH_BLOCKS):
            for rule, q in ran.items():
                p = self._pending.get(rule) or self._pending.setdefault(rule, _Pending(w.device))
                if p.used + part.numel() > FLUSH_BLOCKS:
                    self._check(rule, p)
                k, end = part.numel(), p.used + part.numel()
                p.w[p.used:end] = w.reshape(-1, BLOCK)[part]
                p.packed[p.used:end] = q.packed.reshape(-1, BLOCK // 2)[part]
                p.scales[p.used:end] = q.scales.reshape(-1, 1)[part]
                p.spans.append((name, k))
                p.used = end

    def _check(self, rule: Rule, p: _Pending) -> None:
        """Re-quantize what `p` holds with the torch path and count the blocks where the kernel's bytes differ."""
        if p.used:
            q = quantize(p.w[:p.used], rule)
            same = blocks_equal(q, p.packed[:p.used], p.scales[:p.used]).reshape(-1)
            for (name, k), part in zip(p.spans, same.split([k for _, k in p.spans])):
                self.audited[name, rule] += k
                self.wrong[name, rule] += int((~part).sum())
        p.spans.clear()
        p.used = 0

    def failures(self) -> list[str]:
        for rule, p in self._pending.items():
            self._check(rule, p)
        return [f"{name}: the {self.backend} kernel's {rule.value} bytes differ from the torch path's on {bad} of "
                f"{self.audited[name, rule]} sampled blocks; the fast check cannot vouch for this output: rerun "
                "with --full (and report this qstream bug)"
                for (name, rule), bad in self.wrong.items() if bad]

    def detail(self) -> str:
        return (f"kernel {self.backend} held to the torch path on {sum(self.drawn.values())} sampled blocks of "
                f"{len(self.drawn)} tensors (seed {self.sampling.seed})")
