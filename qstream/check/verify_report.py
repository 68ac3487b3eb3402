"""What `qstream verify` reports: one `Check` per property, each failure one line naming the tensor or file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LISTED = 20  # failures printed per check; --json lists all


@dataclass
class Check:
    """One property of the checkpoint: what was looked at and every way it fails."""

    name: str
    detail: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class VerifyReport:
    dst: Path
    source: Path | None
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f for c in self.checks for f in c.failures]

    def summary(self) -> str:
        """A line per check, then the failures (at most LISTED per check)."""
        n = len(self.failures)
        lines = [f"verify {self.dst}" + (f" against {self.source}" if self.source else "")
                 + (": OK" if self.ok else f": FAILED ({n} failure{'s' * (n != 1)})")]
        lines += [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        for c in self.checks:
            lines += [f"  - {f}" for f in c.failures[:LISTED]]
            if len(c.failures) > LISTED:
                lines.append(f"  - ... and {len(c.failures) - LISTED} more {c.name} failures (see --json)")
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"dst": str(self.dst), "source": str(self.source) if self.source else None, "ok": self.ok,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "failures": c.failures}
                           for c in self.checks]}
