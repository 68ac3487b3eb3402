"""A small calibration collector for tests and benches, independent of qstream's engine.

Forward hooks on a whole in-memory transformers model (fine for SmolLM2-135M and the tiny fixtures) sum
x_j^2 over tokens at the input of every Linear the checkpoint stores, and of every expert of a fused experts
module, and write STATS in the calibration contract's format (notes/LAYOUT.md): `calibration.safetensors`
with `N:x2_sum` (float64 [in] or [E, in]), `N:tokens` (int64 [] or [E]), `N:routed` (routed experts), keyed
by the source checkpoint's tensor names (fused `experts.gate_up_proj`, or per expert `experts.{e}.w1.weight`),
plus a `calibration.json` summary.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from qstream.evals.models import load_model
from qstream.io.checkpoint import open_checkpoint
from qstream.planning.plan import DEFAULT_EXPERT_PROJ_NAMES, EXPERT_PROJ_NAMES

FUSED = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\..*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\..*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
LAYER = re.compile(r"\.layers\.(\d+)\.")


class _Sums:
    """x^2 sums and token counts of one input (a Linear's, or one projection kind of every expert): over
    the tokens it computed on, and for experts also over the tokens the router sent it."""

    def __init__(self, shape: tuple[int, ...], experts: int | None = None) -> None:
        lead = () if experts is None else (experts,)
        self.x2 = torch.zeros(*lead, shape[-1], dtype=torch.float64)
        self.tokens = torch.zeros(lead, dtype=torch.int64)
        self.routed_x2 = torch.zeros(*lead, shape[-1], dtype=torch.float64)
        self.routed = torch.zeros(lead, dtype=torch.int64)


def _experts_hook(sums: dict[str, _Sums], key: str):
    """Pre-hook of a fused experts module (hidden [T, H], top_k_index [T, k], top_k_weights): per expert, the
    gate/up input is the hidden state and the down input act(gate) * up, computed on every token and summed
    over all of them and over the routed ones; the module's own output keeps the true routing."""

    def hook(mod: torch.nn.Module, args: tuple) -> None:
        hidden, top_k_index = args[0], args[1]
        gu, down = sums[key + ":gate_up"], sums[key + ":down"]
        for e in range(mod.gate_up_proj.shape[0]):
            routed = (top_k_index == e).any(-1)
            gate, up = torch.nn.functional.linear(hidden, mod.gate_up_proj[e]).chunk(2, dim=-1)
            h = mod.act_fn(gate) * up
            for s, inp in ((gu, hidden), (down, h)):
                x2 = inp.double().pow(2)
                s.x2[e] += x2.sum(0)
                s.tokens[e] += inp.shape[0]
                s.routed_x2[e] += x2[routed].sum(0)
                s.routed[e] += int(routed.sum())

    return hook


def collect_stats(model_dir: Path, windows: torch.Tensor, out: Path, all_experts: bool = True,
                  routed_out: Path | None = None) -> Path:
    """Run windows [n, L] of token ids through the model at model_dir (float32, CPU) and write STATS to out:
    experts' statistics over every token (all_experts, as `qstream calibrate` by default) or only over those
    routed to them; `routed_out` also writes the routed-only statistics there, from the same pass."""
    ckpt = open_checkpoint(Path(model_dir))
    shapes = {n: t.info.shape for n, t in ckpt.tensors.items()}
    model = load_model(Path(model_dir), torch.float32, torch.device("cpu"))
    sums: dict[str, _Sums] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in shapes:
            s = sums[f"{name}.weight"] = _Sums(shapes[f"{name}.weight"])

            def linear_hook(mod: torch.nn.Module, args: tuple, s: _Sums = s) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])
                s.x2 += x.double().pow(2).sum(0)
                s.tokens += x.shape[0]

            hooks.append(mod.register_forward_pre_hook(linear_hook))
        elif getattr(getattr(mod, "gate_up_proj", None), "dim", lambda: 0)() == 3:
            experts = mod.gate_up_proj.shape[0]
            sums[name + ":gate_up"] = _Sums(tuple(mod.gate_up_proj.shape), experts)
            sums[name + ":down"] = _Sums(tuple(mod.down_proj.shape), experts)
            hooks.append(mod.register_forward_pre_hook(_experts_hook(sums, name)))
    with torch.inference_mode():
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    for h in hooks:
        h.remove()
    model_type = ckpt.text_config.get("model_type", "")
    for where, routed_only in ((out, not all_experts), (routed_out, True)):
        if where is None:
            continue
        tensors = _by_source_name(model_type, shapes, sums, routed_only)
        Path(where).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(where) / "calibration.safetensors"))
        summary = {"model": str(model_dir), "windows": list(windows.shape), "all_experts": not routed_only,
                   "tensors": sorted({k.rsplit(":", 1)[0] for k in tensors})}
        (Path(where) / "calibration.json").write_text(json.dumps(summary, indent=1) + "\n")
    return Path(out)


def _by_source_name(model_type: str, shapes: dict, sums: dict[str, _Sums], routed_only: bool) -> dict[str, torch.Tensor]:
    """Sums under the checkpoint's own tensor names: Linears as they are, an experts module's sums (over all
    tokens, or routed ones only) under its layer's fused or per-expert names."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, x2: torch.Tensor, tokens: torch.Tensor, routed: torch.Tensor | None) -> None:
        out[f"{name}:x2_sum"], out[f"{name}:tokens"] = x2.clone(), tokens.clone()
        if routed is not None:
            out[f"{name}:routed"] = routed.clone()

    experts_of_layer: dict[str, str] = {}
    for key in sums:
        if key.endswith(":gate_up"):
            m = LAYER.search(key)
            experts_of_layer[m[1] if m else ""] = key.removesuffix(":gate_up")
    gate, up, down = EXPERT_PROJ_NAMES.get(model_type, DEFAULT_EXPERT_PROJ_NAMES)
    by_proj = defaultdict(lambda: ":gate_up", {down: ":down"})
    for name in shapes:
        if name in sums:
            s = sums[name]
            put(name, s.x2, s.tokens, None)
        elif m := FUSED.match(name):
            s = sums[experts_of_layer[m["layer"]] + (":down" if m["kind"] == "down_proj" else ":gate_up")]
            put(name, s.routed_x2 if routed_only else s.x2, s.routed if routed_only else s.tokens, s.routed)
        elif (m := PER_EXPERT.match(name)) and m["proj"] in (gate, up, down):
            s = sums[experts_of_layer[m["layer"]] + by_proj[m["proj"]]]
            e = int(m["e"])
            put(name, (s.routed_x2 if routed_only else s.x2)[e], (s.routed if routed_only else s.tokens)[e],
                s.routed[e])
    return out
