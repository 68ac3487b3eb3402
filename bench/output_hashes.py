"""sha256 of every output file qstream writes for the test fixtures: proof that a refactor changed no byte.

Builds each tiny checkpoint of the test suite (every on-disk layout, the FP8 input layouts, gpt-oss) under
WORKDIR, then drives the CLI in this process, as a user would: `plan` (its text), `quantize` with every
exponent rule and preset (and --keep-dtype source|bf16 for FP8 inputs, --skip-indivisible, globs, small
shards), `dequantize` of each output, and `verify --source --json` for one run per fixture. It prints one
line per output, `<case>/<file> <sha256>`, plus each command's exit code and error message, so a changed
message or exit code shows too.

Left out: qstream_report.json (it records seconds and peak RSS); the model card holds no times, so it is
hashed whole. Paths under WORKDIR are written as `WORKDIR` in the text outputs, so the hashes do not depend
on where they are made.

    python bench/output_hashes.py --save before.json          # before the change
    python bench/output_hashes.py --check before.json         # after: exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qstream.cli import cli  # noqa: E402
from tests import fixtures  # noqa: E402
from tests.fp8_layouts import LAYOUTS, to_layout  # noqa: E402
from tests.test_gpt_oss import build_gpt_oss  # noqa: E402

RULES = ("floor", "even", "rceil", "mse3")
PRESETS = ("experts", "mlp", "all-linear")
NOT_HASHED = {"qstream_report.json"}


def _fp8(base: str, layout: str) -> Callable[[Path], Path]:
    def build(out: Path) -> Path:
        to_layout(out.parent / base, out, layout)
        return out
    return build


# name -> builder(out_dir); FP8 layouts are made from an earlier fixture, so order matters
FIXTURES: dict[str, Callable[[Path], Path]] = {
    "qwen35_moe": fixtures.build_qwen35_moe,
    "qwen3_moe": fixtures.build_qwen3_moe,
    "qwen3_moe_fused": fixtures.build_qwen3_moe_fused,
    "mixtral": fixtures.build_mixtral,
    "llama": fixtures.build_llama,
    "llama_indivisible": lambda out: fixtures.build_llama(out, indivisible=True),
    "llama_tied": lambda out: fixtures.build_llama(out, tie_word_embeddings=True),
    "deepseek_v3": fixtures.build_deepseek_v3,
    "gpt_oss": build_gpt_oss,
    **{f"qwen3_moe_{layout}": _fp8("qwen3_moe", layout) for layout in LAYOUTS},
    "deepseek_v3_fp8-block": _fp8("deepseek_v3", "fp8-block"),
}


def cases(name: str) -> list[list[str]]:
    """The quantize option sets run on one fixture."""
    fp8 = "fp8" in name
    keep = [["--keep-dtype", "source"], ["--keep-dtype", "bf16"]] if fp8 else [[]]
    out = [["--rule", r, "--preset", p, *k] for r in RULES for p in PRESETS for k in keep]
    out.append(["--max-shard-size", "100KB"])  # several shards
    out.append(["--preset", "mlp", "--exclude", "*layers.0.*", "--include", "*self_attn.o_proj*"])
    if name == "llama_indivisible":
        out.append(["--preset", "mlp", "--skip-indivisible"])
    return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text(s: str, work: Path) -> str:
    return s.replace(str(work.resolve()), "WORKDIR").replace(str(work), "WORKDIR")


def _file_hashes(out: Path, label: str) -> dict[str, str]:
    hashes = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_dir() or rel in NOT_HASHED:
            continue
        hashes[f"{label}/{rel}"] = _digest(p.read_bytes())
    return hashes


def _invoke(runner: CliRunner, args: list[str]):
    result = runner.invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def run_all(work: Path, only: set[str] | None) -> dict[str, str]:
    runner = CliRunner()
    hashes: dict[str, str] = {}
    src_root, out_root = work / "src", work / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    for name, build in FIXTURES.items():
        src = src_root / name
        if not src.exists():
            src.parent.mkdir(parents=True, exist_ok=True)
            build(src)
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        for i, opts in enumerate(cases(name)):
            label = f"{name}/{'_'.join(o.lstrip('-').replace('*', 'x').replace('/', '') for o in opts) or 'default'}"
            code, stdout, stderr = _invoke(runner, ["plan", str(src), *opts])
            hashes[f"{label}/plan"] = f"exit {code} " + _digest(_text(stdout + stderr, work).encode())
            dst = out_root / label.replace("/", "__")
            shutil.rmtree(dst, ignore_errors=True)
            args = ["quantize", str(src), str(dst), "--no-progress", "--device", "cpu", *opts]
            code, _, stderr = _invoke(runner, args)
            hashes[f"{label}/quantize"] = f"exit {code} " + (_text(stderr, work).strip() if code else "")
            if code:
                continue
            hashes.update(_file_hashes(dst, label))
            if i == 0:
                args = ["verify", str(dst), "--source", str(src), "--json", "--device", "cpu"]
                code, stdout, _ = _invoke(runner, args)
                hashes[f"{label}/verify"] = f"exit {code} " + _digest(_text(stdout, work).encode())
            deq = Path(f"{dst}-bf16")
            shutil.rmtree(deq, ignore_errors=True)
            code, _, stderr = _invoke(runner, ["dequantize", str(dst), str(deq), "--no-progress"])
            hashes[f"{label}/dequantize"] = f"exit {code} " + (_text(stderr, work).strip() if code else "")
            if not code:
                hashes.update(_file_hashes(deq, f"{label}/dequantized"))
            shutil.rmtree(dst, ignore_errors=True)
            shutil.rmtree(deq, ignore_errors=True)
        print(f"{name}: {len(cases(name))} cases, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return hashes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qstream-output-hashes"),
                    help="where fixtures are built (kept and reused) and outputs written")
    ap.add_argument("--save", type=Path, help="write the hashes as JSON here")
    ap.add_argument("--check", type=Path, help="compare with hashes saved earlier; exit 1 on any difference")
    ap.add_argument("--only", help="comma-separated fixture names")
    args = ap.parse_args()
    hashes = run_all(args.workdir, set(args.only.split(",")) if args.only else None)
    for k, v in hashes.items():
        print(f"{k} {v}")
    if args.save:
        args.save.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    if args.check:
        before = json.loads(args.check.read_text())
        if args.only:
            before = {k: v for k, v in before.items() if k.split("/")[0] in args.only.split(",")}
        diff = sorted(k for k in before.keys() | hashes.keys() if before.get(k) != hashes.get(k))
        for k in diff:
            print(f"DIFFERS {k}: {before.get(k)} -> {hashes.get(k)}", file=sys.stderr)
        print(f"{len(hashes)} hashes, {len(diff)} differ from {args.check}", file=sys.stderr)
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
