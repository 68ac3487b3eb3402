"""DST/README.md, a model card in the shape of the reference card, from what DST itself holds.

Every number comes from files in DST: config.json, the shard headers, qstream_report.json
(what was quantized, how, at what weight error) and qstream_eval.json when `qstream eval
--save-into DST` measured it. Nothing is typed in by hand.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from qstream.common import human_bytes, read_report, read_saved, table
from qstream.format.formats import INPUT_SCALE, KEPT_FP8_DTYPES, MIXED_PRECISION, MXFP4_FORMAT, PACKED, SCALE, kept_kind, scheme_format
from qstream.io.checkpoint import open_checkpoint
from qstream.errors import QstreamError
from qstream.format.mxfp4 import BLOCK
from qstream.format.rules import Rule
from qstream.planning.selection import ROLES, Region, Role, region_of, role_of

CARD_NAME = "README.md"
FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
# Numbers a card carries over from the source card's front matter, when present.
CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name")


def _front_matter(readme: Path) -> dict[str, str]:
    """Top-level `key: value` lines of a model card's YAML front matter (no YAML dependency)."""
    if not readme.is_file():
        return {}
    m = FRONT_MATTER.match(readme.read_text(errors="replace"))
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


def _billions(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


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
                                _billions(n), _role_pattern(Role(role)) if region == "language" else f"{region}.*"]
    return table(["Component", "Precision", "Parameters", "Tensor name pattern"], list(rows.values()))


def _quality(eval_data: dict | None, name: str) -> str:
    if not eval_data:
        return ("Not measured yet. Run `qstream eval SOURCE " + name + " --save-into " + name +
                "` to add perplexity and KL divergence here.")
    p, s, m = eval_data["protocol"], eval_data["source"], eval_data["model"]
    rows = [
        [f"{s['label']} (source)", f"{s['mean_nll']:.4f}", f"{s['ppl']:.4f}", "", "", ""],
        [f"{m['label']} (this)", f"{m['mean_nll']:.4f}", f"{m['ppl']:.4f}",
         f"{m['ppl'] - s['ppl']:+.4f} ({100 * (m['ppl'] / s['ppl'] - 1):+.2f}%)",
         f"{m['kl']:.5f}", f"{100 * m['top1_agree']:.2f}%"],
    ]
    t = p["text"]
    where = t.get("path") or (f"{t.get('dataset')}/{t.get('config')} {t.get('split')}" if t["kind"] == "hf-cache"
                              else f"Wikipedia lead sections ({t.get('package', 'offline corpus')})")
    return "\n".join([
        table(["Model", "Mean NLL", "Perplexity", "ΔPPL", "KL (nats)", "top-1 agree"], rows), "",
        f"Protocol: {where}; {p['tokens_scored']:,} tokens scored in {p['windows']} window(s) of {p['seq_len']} "
        f"tokens, stride {p['stride']}; BOS {p['bos']}; {p['dtype']} on {p['device']}. "
        f"KL: {p['kl']}. Measured {eval_data.get('created', '')} with qstream {eval_data.get('qstream_version')}.",
    ])


def render(dst: Path, source_readme: Path | None = None, name: str | None = None) -> str:
    """The card's markdown text; `name` is the published directory's name (dst may still be a temp dir)."""
    try:
        report = read_report(dst)
    except FileNotFoundError:
        raise QstreamError(f"{dst}: no qstream_report.json; `qstream card` documents outputs of `qstream quantize`") from None
    eval_data = read_saved(dst)
    facts = model_facts(dst)
    kept = kept_formats(dst)
    groups = list(json.loads((dst / "config.json").read_text())["quantization_config"]["config_groups"].values())[1:]
    mxfp4 = f"`{MXFP4_FORMAT.ct_format}`"
    storage = (mxfp4 if not groups else f"`{MIXED_PRECISION}` ({mxfp4} beside the "
               + ", ".join(f"`{g['format']}`" for g in groups) + " weights kept from the source)")
    carried = _front_matter(source_readme) if source_readme else {}
    base = Path(report["source"]).name
    name = name or dst.name
    totals = report["totals"]
    rule = Rule(report["rule"])
    front = {k: carried[k] for k in CARRIED_KEYS if k in carried}
    front.update({"base_model": carried.get("base_model", base), "tags": "[mxfp4, compressed-tensors, vllm, qstream]"})
    moe = (f"{facts['experts']} experts, {facts['experts_per_token']} routed per token"
           + (f" + {facts['shared_experts']} shared" if facts["shared_experts"] else "")) if facts["experts"] else "dense"
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
            ["Parameters", f"{_billions(facts['params_total'])} total, {_billions(facts['params_active'])} active per token "
                           "(language model; computed from tensor shapes and the router's top-k)"],
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
        f"- Exponent rule: `{rule.value}`: {rule.doc}. Data-free: no calibration data.",
        f"- {totals['tensors_quantized']} tensors, {totals['params_quantized']:,} parameters quantized; "
        f"relative weight error sum((Wq-W)^2)/sum(W^2) = {totals['rel_error']:.3e}.",
        "- Kept as they were (the `ignore` list, as vLLM matches it):",
        *(f"  - `{e}`" for e in report["ignore"]),
        *(line for g in groups for line in (
            f"- Kept in the source's {scheme_format(g)} (a `{g['format']}` config group naming its modules):",
            *(f"  - `{e}`" for e in g["targets"]))),
        f"- Made with qstream {report['qstream_version']} in {totals['seconds']:.0f} s "
        f"(peak RSS {human_bytes(totals['peak_rss_bytes'])}).",
        "", "## Quality", "", _quality(eval_data, name), "",
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


def write_card(dst: Path, source_readme: Path | None = None, name: str | None = None) -> Path:
    """Write DST/README.md (atomically)."""
    dst = Path(dst)
    text = render(dst, source_readme, name)
    tmp = dst / f".{CARD_NAME}.partial"
    tmp.write_text(text)
    tmp.replace(dst / CARD_NAME)
    return dst / CARD_NAME
