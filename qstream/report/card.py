"""DST/README.md, a model card in the shape of the reference card, from what DST itself holds.

Every number comes from files in DST: config.json, the shard headers, qstream_report.json
(what was quantized, how, at what weight error) and qstream_eval.json when `qstream eval
--card DST` measured it, plus the source card's licence and provenance. Nothing is typed in by hand.

The card is a reproducible output: the same inputs give the same bytes, whenever and wherever it is
written (a resumed run included). So it holds no times, memory figures, dates or absolute paths; those
stay in qstream_report.json and qstream_eval.json.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import defaultdict
from pathlib import Path

from qstream.calib.calibrate import FEW_TOKENS
from qstream.common import CARD_NAME, PROVENANCE, REPORT_NAME, human_bytes, read_report, read_saved, table
from qstream.errors import QstreamError
from qstream.format.formats import (
    INPUT_SCALE,
    KEPT_FP8_DTYPES,
    MIXED_PRECISION,
    MXFP4_FORMAT,
    PACKED,
    SCALE,
    kept_kind,
    scheme_format,
)
from qstream.format.mxfp4 import BLOCK
from qstream.format.rules import Method, Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.planning.selection import ROLES, Region, Role, region_of, role_of
from qstream.report.coverage import (
    PLOT_HOWTO,
    PLOT_NAME,
    ExpertsLayer,
    coverage_table,
    experts_layers,
    write_plot,
)

FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
# Numbers a card carries over from the source card's front matter, when present.
CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name")


def _read(readme: Path | None) -> str:
    return readme.read_text(errors="replace") if readme is not None and readme.is_file() else ""


def _provenance(readme: Path | None) -> str:
    """The body of the source card's `## Provenance` section, or "" when it has none."""
    lines = _read(readme).splitlines()
    if PROVENANCE not in lines:
        return ""
    body = lines[lines.index(PROVENANCE) + 1:]
    end = next((i for i, line in enumerate(body) if line.startswith("#")), len(body))
    return "\n".join(body[:end]).strip()


def _front_matter(readme: Path | None) -> dict[str, str]:
    """Top-level `key: value` lines of a model card's YAML front matter (no YAML dependency)."""
    m = FRONT_MATTER.match(_read(readme))
    if not m:
        return {}
    out = {}
    for line in m.group(1).splitlines():
        k, sep, v = line.partition(":")
        if sep and not line.startswith((" ", "-")) and v.strip():
            out[k.strip()] = v.strip()
    return out


SCALE_SUFFIXES = (SCALE, INPUT_SCALE)  # scales of MXFP4 and kept FP8 weights: not parameters


def _params(dst: Path) -> dict[str, int]:
    """Parameters by (region, role), read from the output's own headers (packed MXFP4: 2 per byte)."""
    ckpt = open_checkpoint(dst, unfinished_ok=True)
    counts: dict[str, int] = defaultdict(int)
    for name, t in ckpt.tensors.items():
        if name.endswith(SCALE_SUFFIXES):  # MXFP4 scales, and kept FP8 weights' scales: not parameters
            continue
        packed = name.endswith(PACKED)
        n = MXFP4_FORMAT.in_features(t.info.numel) if packed else t.info.numel
        logical = name.removesuffix(PACKED) + ".weight" if packed else name
        counts[f"{region_of(logical).value}/{role_of(logical).value}"] += n
    return dict(counts)


def kept_formats(dst: Path) -> dict[str, str]:
    """(region/role) -> FP8 or MXFP8, for components whose weights the output keeps in the source's FP8."""
    ckpt = open_checkpoint(dst, unfinished_ok=True)
    kept = {}
    for name, t in ckpt.tensors.items():
        if name.endswith(".weight") and t.info.dtype in KEPT_FP8_DTYPES:
            scale = ckpt.tensors.get(name.removesuffix(".weight") + SCALE)
            kept[f"{region_of(name).value}/{role_of(name).value}"] = kept_kind(
                scale.info.dtype if scale is not None else None)
    return kept


def model_facts(dst: Path) -> dict:
    """Architecture, sizes and expert counts from config.json and tensor shapes."""
    config = json.loads((dst / "config.json").read_text())
    text = config.get("text_config") or config
    params = _params(dst)
    total = sum(params.values())
    routed = sum(v for k, v in params.items() if k == f"{Region.LANGUAGE.value}/{Role.ROUTED_EXPERT.value}")
    language = sum(v for k, v in params.items() if k.startswith(Region.LANGUAGE.value))
    experts = text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts")
    top_k = text.get("num_experts_per_tok")
    active = language - routed + (routed * top_k // experts if experts and top_k else routed)
    shared = 1 if any(k.endswith(f"/{Role.SHARED_EXPERT.value}") for k in params) else text.get("n_shared_experts", 0)
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "params_total": total,
        "params_language": language,
        "params_active": active,
        "experts": experts,
        "experts_per_token": top_k,
        "shared_experts": shared,
        "layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "context_length": text.get("max_position_embeddings"),
        "vocab_size": text.get("vocab_size"),
        "by_component": params,
    }


def human_count(n: float) -> str:
    """A parameter count to 3 significant digits with the largest unit that keeps it under 1000: 69.1K, 135M."""
    for scale, unit in ((1, ""), (1e3, "K"), (1e6, "M"), (1e9, "B")):
        text = f"{n / scale:.3g}"
        if float(text) < 1000:
            return text + unit
    return f"{n / 1e12:.3g}T"


def _role_pattern(role: Role) -> str:
    pats = [p.pattern.replace("|", "\\|") for r, p in ROLES if r is role]  # a bare | would split the table cell
    return " or ".join(f"`{p}`" for p in pats) if pats else "(everything else)"


def _quantized_table(report: dict, facts: dict, kept: dict[str, str]) -> str:
    quantized = {(t["name"]) for t in report["tensors"]}
    rows: dict[tuple[str, str], list] = {}
    for key, n in sorted(facts["by_component"].items(), key=lambda kv: -kv[1]):
        region, role = key.split("/")
        is_q = any(region_of(q).value == region and role_of(q).value == role for q in quantized)
        precision = "MXFP4" if is_q else f"{kept[key]} (as the source)" if key in kept else "unchanged"
        rows[(region, role)] = [f"{region} {role.replace('_', ' ')}", precision,
                                human_count(n), _role_pattern(Role(role)) if region == "language" else f"{region}.*"]
    return table(["Component", "Precision", "Parameters", "Tensor name pattern"], list(rows.values()))


def _eval_command(source: Path, dst: Path, name: str) -> str:
    """The `qstream eval` command that measures this checkpoint, run from the directory that holds it.

    The source is given relative to that directory, so the card names no machine path and reads the
    same wherever the two directories sit side by side.
    """
    rel = os.path.relpath(source, dst.resolve().parent)
    src = shlex.quote(rel if rel.startswith("..") else f"./{rel}")
    here = shlex.quote(f"./{name}")
    return f"qstream eval {src} {here} --card {here}"


def _text_label(t: dict) -> str:
    """What text was scored, named by what identifies it (a file by name and digest, not by its path)."""
    if t["kind"] == "file":
        return f"`{Path(t['path']).name}` (sha256 {t['sha256'][:12]})"
    if t["kind"] == "hf-cache":
        return f"{t.get('dataset')}/{t.get('config')} {t.get('split')}"
    return f"Wikipedia lead sections ({t.get('package', 'offline corpus')})"


def _quality(eval_data: dict | None, command: str) -> str:
    """The measured table, or how to measure it. Only the numbers: eval's times and date stay in its json."""
    if not eval_data:
        return (f"Not measured yet. Run `{command}` in the directory that holds this checkpoint to add "
                "perplexity, KL divergence and top-1 agreement here.")
    p, s, m = eval_data["protocol"], eval_data["source"], eval_data["model"]
    rows = [
        ["source", s["label"], f"{s['mean_nll']:.4f}", f"{s['ppl']:.4f}", "", "", ""],
        ["this checkpoint", m["label"], f"{m['mean_nll']:.4f}", f"{m['ppl']:.4f}",
         f"{m['ppl'] - s['ppl']:+.4f} ({100 * (m['ppl'] / s['ppl'] - 1):+.2f}%)",
         f"{m['kl']:.5f}", f"{100 * m['top1_agree']:.2f}%"],
    ]
    return "\n".join([
        table(["", "Model", "Mean NLL", "Perplexity", "ΔPPL", "KL (nats)", "top-1 agree"], rows), "",
        f"Protocol: {_text_label(p['text'])}; {p['tokens_scored']:,} tokens scored in {p['windows']} window(s) of "
        f"{p['seq_len']} tokens, stride {p['stride']}; BOS {p['bos']}; {p['dtype']} on {p['device']}. "
        f"KL: {p['kl']}. Measured with qstream {eval_data.get('qstream_version')}.",
    ])


def render(dst: Path, source_readme: Path | None = None, name: str | None = None) -> str:
    """The card's markdown text; `name` is the published directory's name (dst may still be a temp dir)."""
    try:
        report = read_report(dst)
    except FileNotFoundError:
        raise QstreamError(f"{dst}: no qstream_report.json; "
                           "`qstream card` documents outputs of `qstream quantize`") from None
    eval_data = read_saved(dst)
    facts = model_facts(dst)
    kept = kept_formats(dst)
    groups = list(json.loads((dst / "config.json").read_text())["quantization_config"]["config_groups"].values())[1:]
    mxfp4 = f"`{MXFP4_FORMAT.ct_format}`"
    storage = (mxfp4 if not groups else f"`{MIXED_PRECISION}` ({mxfp4} beside the "
               + ", ".join(f"`{g['format']}`" for g in groups) + " weights kept from the source)")
    carried = _front_matter(source_readme)
    base = Path(report["source"]).name
    name = name or dst.resolve().name
    totals = report["totals"]
    front = {k: carried[k] for k in CARRIED_KEYS if k in carried}
    front.update({"base_model": carried.get("base_model", base), "tags": "[mxfp4, compressed-tensors, vllm, qstream]"})
    moe = (f"{facts['experts']} experts, {facts['experts_per_token']} routed per token"
           + (f" + {facts['shared_experts']} shared" if facts["shared_experts"] else "")
           ) if facts["experts"] else "dense"
    params = (f"{human_count(facts['params_total'])} total, {human_count(facts['params_active'])} active per token "
              "(language model; computed from tensor shapes and the router's top-k)" if facts["experts"] else
              f"{human_count(facts['params_total'])} total, {human_count(facts['params_active'])} active per token "
              "(language model, dense: no routing; computed from tensor shapes)")
    provenance = _provenance(source_readme)
    ctx = facts["context_length"]
    lines = [
        "---", *(f"{k}: {v}" for k, v in front.items()), "---", "",
        f"# {name}", "",
        f"{base} with its {'routed MoE experts' if report['preset'] == 'experts' else report['preset'] + ' weights'} "
        f"in MXFP4 (4-bit E2M1, one power-of-two scale per {BLOCK} weights), stored as compressed-tensors "
        f"{storage} for vLLM. {human_bytes(totals['bytes_in'])} -> {human_bytes(totals['bytes_out'])}.",
        "", "## Model details", "",
        table(["", ""], [
            ["Architecture", f"`{facts['architecture']}` ({facts['model_type']})"],
            ["Parameters", params],
            ["Experts", moe],
            ["Layers / hidden size", f"{facts['layers']} / {facts['hidden_size']}"],
            ["Context length", f"{ctx:,}" if isinstance(ctx, int) else str(ctx)],
            ["Vocabulary", f"{facts['vocab_size']:,}" if isinstance(facts["vocab_size"], int) else "?"],
            ["Base model", front["base_model"]],
            ["License", front.get("license", "see the base model")],
        ]),
        "", "## What's quantized", "", _quantized_table(report, facts, kept), "",
        "## Method", "",
        f"- Format: MXFP4 (OCP Microscaling): E2M1 elements, E8M0 scale per block of {BLOCK} along the input "
        f"dimension; compressed-tensors {mxfp4} (uint8 scales, even column in the low nibble).",
        _rule_line(report),
        f"- {totals['tensors_quantized']} tensors, {totals['params_quantized']:,} parameters quantized; "
        f"relative weight error sum((Wq-W)^2)/sum(W^2) = {totals['rel_error']:.3e}.",
        "- Kept as they were (the `ignore` list, as vLLM matches it):",
        *(f"  - `{e}`" for e in report["ignore"]),
        *(line for g in groups for line in (
            f"- Kept in the source's {scheme_format(g)} (a `{g['format']}` config group naming its modules):",
            *(f"  - `{e}`" for e in g["targets"]))),
        f"- Made with qstream {report['qstream_version']}.",
        *_calibration(dst, experts_layers(report), Method.GPTQ.value in report),
        *(["", PROVENANCE, "", "From the source's card (it holds for these weights too):", "", provenance]
          if provenance else []),
        "", "## Quality", "", _quality(eval_data, _eval_command(Path(report["source"]), dst, name)), "",
        "## Usage", "",
        "```bash",
        f"vllm serve ./{name} --served-model-name {name}"
        + (f" --max-model-len {min(ctx, 32768)}" if isinstance(ctx, int) else ""),
        "```", "",
        "```python",
        "from openai import OpenAI",
        'client = OpenAI(base_url="http://localhost:8000/v1", api_key="EMPTY")',
        f'reply = client.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "Hello!"}}])',
        "print(reply.choices[0].message.content)",
        "```", "",
        "Hopper and Ampere GPUs run these weights through vLLM's Marlin W4A16 kernels; Blackwell uses native MXFP4.",
        "",
    ]
    return "\n".join(lines)


def _calibration(dst: Path, layers: list[ExpertsLayer], gptq: bool) -> list[str]:
    """A calibrated run of an MoE model: what calibration saw of each experts layer, a table and the heatmap."""
    if not layers:
        return []
    none = sum(len(x.without_tokens) for x in layers)
    plot = (f"![Routed calibration tokens and weight error per expert]({PLOT_NAME})"
            if (dst / PLOT_NAME).is_file() else PLOT_HOWTO)
    return ["", "## Calibration coverage", "",
            f"Calibration tokens the router sent to each expert: {none} of {sum(len(x.routed) for x in layers)} "
            f"experts got none; few: under {FEW_TOKENS:.0%} of their layer's mean. "
            + ("(GPTQ solves an expert the router sent fewer tokens than its input width with every token's "
               "statistics.) " if gptq else "(`qstream calibrate` by default also runs every expert on every token "
               "for its statistics, so an expert the router skipped still gets weighted exponents.) ")
            + "Weight error: sum((Wq-W)^2)/sum(W^2) over each expert's quantized weights.",
            "",
            coverage_table(layers), "", plot]


def _rule_line(report: dict) -> str:
    """How the exponents were chosen: a data-free rule, or imatrix with what its statistics covered."""
    gq = report.get(Method.GPTQ.value)
    if gq is not None:
        c = gq["cases"]
        order = "by decreasing Hessian diagonal (act-order, static groups)" if gq["act_order"] else "in order"
        return (f"- Method: `{Method.GPTQ.value}`: sequential GPTQ (Frantar et al.) on the MXFP4 grid, layer by layer "
                f"through qstream's streaming engine, each layer calibrated on the outputs of the quantized layers "
                f"before it: per block the activation-weighted exponent of R-{gq['depth']}..R, then columns rounded "
                f"{order} with "
                f"the inverse-Hessian error update ({gq['damp']:g} dampening, lazy blocks of {gq['block']}), on "
                f"{gq['tokens']:,} calibration tokens ({gq['samples']} x {gq['seq_len']}). "
                + ("Each down projection is solved after its gate/up, on what the quantized gate/up give it, towards "
                   "its source MLP's output. " if gq.get("fit_down") else "")
                + f"Modules: {c['gptq']} solved on their own tokens, {c['gptq-all-tokens']} routed experts with too "
                f"few tokens on every token's statistics, {c['imatrix']} by the imatrix choice alone, {c['mse3']} "
                "by mse3 (no tokens).")
    im = report.get(Method.IMATRIX.value)
    if im is None:
        rule = Rule(report["rule"])
        return f"- Exponent rule: `{rule.value}`: {rule.doc}. Data-free: no calibration data."
    total = im["modules_calibrated"] + im["modules_fallback"]
    return (f"- Exponent rule: `{Method.IMATRIX.value}`: per block, of {im['candidates']} (R = rceil's), the "
            f"exponent of least activation-weighted squared error sum_j a_j (q_j - w_j)^2, a_j = {im['weights']} "
            f"from calibration statistics (`{Path(im['stats']).name}`, made by `qstream calibrate`); elements "
            f"rounded to nearest. {im['modules_fallback']} of {total} modules had no statistics and used "
            f"`{im['fallback_rule']}`.")


def write_card(dst: Path, source_readme: Path | None = None, name: str | None = None) -> Path:
    """Write DST/README.md (atomically), and for an imatrix run of an MoE model the heatmap beside it (with
    matplotlib; without it, a stale one is removed and the card says how to draw it)."""
    dst = Path(dst)
    layers = experts_layers(read_report(dst)) if (dst / REPORT_NAME).is_file() else []
    if not (layers and write_plot(dst / PLOT_NAME, layers)):
        (dst / PLOT_NAME).unlink(missing_ok=True)
    text = render(dst, source_readme, name)
    tmp = dst / f".{CARD_NAME}.partial"
    tmp.write_text(text)
    tmp.replace(dst / CARD_NAME)
    return dst / CARD_NAME
