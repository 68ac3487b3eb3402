"""Human-readable tables of a plan and of a finished run (text only, no decisions)."""

from __future__ import annotations

from collections import defaultdict

from qstream.common import human_bytes, table
from qstream.format.formats import scheme_format
from qstream.io.source_formats import DecodedTensor
from qstream.planning.plan import Plan, QuantJob, estimate_bits_per_weight, nothing_selected, source_nbytes
from qstream.planning.selection import region_of, role_of


def plan_rows(plan: Plan) -> list[dict]:
    """Per (region, role, action): tensor count, parameters, bytes in and out."""
    owner = {s.name: name for name, t in plan.source.tensors.items() for s in t.stored}
    out_bytes: dict[str, int] = defaultdict(int)
    for shard in plan.shards:
        for job in shard.jobs:
            src = job.source.name
            out_bytes[owner.get(src, src)] += sum(e.nbytes for e in job.entries)
    groups: dict[tuple[str, str, str], dict] = {}
    for name, t in plan.source.tensors.items():
        d = plan.decisions[name]
        key = (region_of(name).value, role_of(name).value, "MXFP4" if d.quantize else _kept_precision(plan, t))
        g = groups.setdefault(key, {"region": key[0], "role": key[1], "precision": key[2], "tensors": 0,
                                    "params": 0, "bytes_in": 0, "bytes_out": 0})
        g["tensors"] += 1
        g["params"] += t.info.numel
        g["bytes_in"] += source_nbytes(t)
        g["bytes_out"] += out_bytes[name]
    return sorted(groups.values(), key=lambda g: (g["precision"] != "MXFP4", -g["bytes_in"]))


def _kept_precision(plan: Plan, t) -> str:
    """An unquantized tensor's output precision: its dtype, or for a decoded FP8 source weight what it became."""
    if isinstance(t, DecodedTensor):
        return f"{t.weight.info.dtype} (source)" if plan.keep_dtype == "source" else "BF16 (decoded)"
    return t.info.dtype


def plan_text(plan: Plan) -> str:
    rows = plan_rows(plan)
    body = table(
        ["region", "role", "precision", "tensors", "params", "bytes in", "bytes out"],
        [[g["region"], g["role"], g["precision"], g["tensors"], f"{g['params']:,}", human_bytes(g["bytes_in"]),
          human_bytes(g["bytes_out"])] for g in rows],
    )
    n_modules = sum(1 for s in plan.shards for j in s.jobs if isinstance(j, QuantJob))
    bits = f" ({estimate_bits_per_weight(plan):.2f} bits/weight)" if n_modules else ""
    lines = [
        f"source: {plan.source.root}",
        f"rule: {plan.rule.value} ({plan.rule.doc}); preset: {plan.selection.preset}",
        body,
        f"total: {human_bytes(plan.bytes_in)} -> {human_bytes(plan.bytes_out)} in {len(plan.shards)} shard(s); "
        f"{len(plan.quantized_sources)} source tensors -> {n_modules} MXFP4 modules{bits}",
        *([] if n_modules else [nothing_selected(plan.source, plan.selection)]),
        "ignore (compressed-tensors, as vLLM matches it):",
        *(f"  {e}" for e in plan.ignore),
    ]
    groups = plan.quantization_config()["config_groups"]
    for g, scheme in groups.items() if len(groups) > 1 else ():
        lines.append(f"{g}: {scheme['format']} ({scheme_format(scheme)}), targets:")
        lines += [f"  {e}" for e in scheme["targets"]]
    return "\n".join(lines)


def run_text(report: dict, dst: str) -> str:
    t = report["totals"]
    gbps = t["bytes_in"] / t["seconds"] / 1e9 if t["seconds"] else float("nan")
    return (
        f"wrote {dst}: {human_bytes(t['bytes_in'])} -> {human_bytes(t['bytes_out'])} in {t['shards']} shard(s), "
        f"{t['tensors_quantized']} tensors ({t['params_quantized']:,} params) as MXFP4 [{report['rule']}], "
        f"relative error {t['rel_error']:.3e}; {t['seconds']:.1f} s ({gbps:.2f} GB/s in), "
        f"peak RSS {human_bytes(t['peak_rss_bytes'])}"
    )
