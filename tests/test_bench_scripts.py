"""Every benchmark script with a command line still imports and parses it: bench/ is outside the package and its
tests, so a moved module would otherwise break it silently (two did after the rooms refactor)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
PEER = "peer_"  # run inside a peer's own virtualenv, not ours
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "argparse" in p.read_text() and not p.name.startswith(PEER))


def test_the_list_is_not_empty() -> None:
    assert {"bench_gptq.py", "bench_engine.py", "bench_verify.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    res = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout.lower()
