"""GPTQ on the MXFP4 grid against MSE3 round-to-nearest, on SmolLM2-135M (dense) and its top-2-of-8 MoE.

Question: how much of MXFP4's KL does GPTQ remove when each block's exponent is MSE3's (so the format is
unchanged), and at what cost in time and memory?

Sequential GPTQ, in memory (the model is small): calibration sequences go through the model layer by
layer; for each decoder layer, the MLP inputs are captured (pass A, stopping at the MLP), gate/up (or
each expert's fused gate_up) are solved with that Hessian, the down projection's inputs are captured
through the *quantized* gate/up (pass B) and down is solved, then the layer's outputs through the
quantized layer (pass C) feed the next layer. Experts get the Hessian of the tokens the router sent them;
an expert with fewer routed tokens than its input width, or a singular Hessian, takes the all-token one.

The GPTQ values are written into a copy of the source (bf16 holds every MXFP4 value exactly) and that
copy is quantized by qstream's own pipeline with MSE3, which reproduces a block's values exactly (a
zero-error exponent exists and MSE3 finds it), so the output is a real qstream checkpoint; the bench
checks relative error 0 against the GPTQ values and runs `qstream verify` on it.

Calibration: the last N x L tokens of the offline Wikipedia corpus; evaluation: the first W windows of
L tokens of the same token stream (checked disjoint), scored with qstream.scoring for every model on
the same tokens, with per-window KL for paired z. SmolLM2's "bf16" weights are a dequantized Q4_1 model:
compare methods with each other, not with published absolute numbers.

    python bench/bench_gptq.py dense --methods rtn,gptq,gptq-act
    python bench/bench_gptq.py moe
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qstream import assets
from qstream.calib.gptq import SingularHessianError, gptq_quantize, hessian_add, hessian_add_routed
from qstream.io.checkpoint import open_checkpoint
from qstream.io.tokens import tokenize
from qstream.evals.models import load_model
from qstream.format.mxfp4 import Rule, dequantize
from qstream.convert.pipeline import peak_rss_bytes, run
from qstream.planning.plan import make_plan
from qstream.evals.scoring import Totals, score, windows
from qstream.planning.selection import Selection
from qstream.summary import table
from qstream.text_sources import wikipedia
from qstream.verify import verify

SHARD_BYTES = 5 * 10**9
BATCH = 8  # calibration sequences per forward call


@dataclass(frozen=True)
class Model:
    """A benchmark model: how to build it and which qstream preset quantizes its MLP weights."""

    name: str
    preset: str
    build: Callable[[Path], Path]


MODELS = {
    "dense": Model("smollm2-135m", "mlp", lambda root: assets.build_smollm2_dense(root / "smollm2-135m")),
    "moe": Model("smollm2-135m-moe8-top2-r0", "experts", lambda root: assets.build_smollm2_moe(
        assets.build_smollm2_dense(root / "smollm2-135m"), root / "smollm2-135m-moe8-top2-r0",
        num_experts=8, top_k=2, router_seed=0)),
}
METHODS = {"rtn": None, "gptq": False, "gptq-act": True}  # method -> act_order (None: no GPTQ)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@contextlib.contextmanager
def stop_before(module: torch.nn.Module, take: Callable[..., None]) -> Iterator[None]:
    """While active, calling `module` hands its inputs to `take` and aborts the forward pass."""
    def hook(_m, args, kwargs):
        take(*args, **kwargs)
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def run_to_stop(fn: Callable[..., object], *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except _Stop:
        return
    raise RuntimeError("the forward pass never reached the capture point")


@dataclass
class GptqRun:
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # source tensor name -> GPTQ values
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # source tensor name -> GPTQ's scale bytes
    seconds: dict[str, float] = field(default_factory=lambda: {"forward+hessian": 0.0, "solve": 0.0})
    experts: dict[str, int] = field(default_factory=lambda: {"routed": 0, "all-token (few tokens)": 0,
                                                             "all-token (singular)": 0})
    routed_tokens: list[list[int]] = field(default_factory=list)  # per layer, tokens per expert


def _timed(run_: GptqRun, what: str):
    @contextlib.contextmanager
    def clock():
        t0 = time.perf_counter()
        yield
        run_.seconds[what] += time.perf_counter() - t0
    return clock()


def _solve(run_: GptqRun, w: torch.Tensor, h: torch.Tensor, act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ values (float32) and scale bytes of w under MSE3 exponents."""
    with _timed(run_, "solve"):
        q = gptq_quantize(w, h, act_order=act_order)
    return dequantize(q.packed, q.scales, torch.float32), q.scales


def _first_layer_inputs(model, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Embedding outputs per calibration batch and the keyword arguments the decoder layers get with it."""
    hidden: list[torch.Tensor] = []
    kws: list[dict] = []

    def take(*args, **kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kws.append(kwargs)

    with stop_before(model.model.layers[0], take):
        for batch in calib.split(BATCH):
            run_to_stop(model.model, input_ids=batch, use_cache=False)
    return hidden, kws


def _layer_out(layer, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def _dense_layer(run_: GptqRun, i: int, layer, hidden: list[torch.Tensor], kws: list[dict], act_order: bool) -> None:
    mlp = layer.mlp
    n, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    h_in = torch.zeros(n, n, dtype=torch.float64)
    saved: list[torch.Tensor] = []

    def take_mlp(x):
        hessian_add(h_in, x)
        saved.append(x)

    with _timed(run_, "forward+hessian"), stop_before(mlp, take_mlp):
        for h, kw in zip(hidden, kws, strict=True):
            run_to_stop(layer, h, **kw)
    w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # rows are independent: one solve for both
    q, s = _solve(run_, w, h_in, act_order)
    for part, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None))):
        getattr(mlp, part).weight.copy_(q[rows])
        run_.values[f"model.layers.{i}.mlp.{part}.weight"] = q[rows]
        run_.scales[f"model.layers.{i}.mlp.{part}.weight"] = s[rows]
    h_down = torch.zeros(inter, inter, dtype=torch.float64)

    def take_down(x):
        hessian_add(h_down, x)

    with _timed(run_, "forward+hessian"), stop_before(mlp.down_proj, take_down):
        for x in saved:
            run_to_stop(mlp, x)
    q, s = _solve(run_, mlp.down_proj.weight, h_down, act_order)
    mlp.down_proj.weight.copy_(q)
    run_.values[f"model.layers.{i}.mlp.down_proj.weight"] = q
    run_.scales[f"model.layers.{i}.mlp.down_proj.weight"] = s


def _expert_hessians(run_: GptqRun, routed: torch.Tensor, counts: torch.Tensor, all_tokens: Callable[[int], torch.Tensor]):
    """Per-expert Hessians, the all-token one for experts with fewer routed tokens than input channels."""
    n = routed.shape[-1]
    few = [e for e in range(routed.shape[0]) if int(counts[e]) < n]
    for e in few:
        routed[e] = all_tokens(e)
    run_.experts["all-token (few tokens)"] += len(few)
    run_.experts["routed"] += routed.shape[0] - len(few)
    return routed


def _solve_experts(run_: GptqRun, w: torch.Tensor, h: torch.Tensor, all_tokens: Callable[[int], torch.Tensor],
                   act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched solve for every expert; experts whose Hessian is singular retry with the all-token one."""
    while True:
        try:
            return _solve(run_, w, h, act_order)
        except SingularHessianError as exc:
            for e in exc.bad:
                h[e] = all_tokens(e)
            run_.experts["all-token (singular)"] += len(exc.bad)
            run_.experts["routed"] -= len(exc.bad)


def _moe_layer(run_: GptqRun, i: int, layer, hidden: list[torch.Tensor], kws: list[dict], act_order: bool) -> None:
    experts = layer.mlp.experts
    ne, two_inter, n = experts.gate_up_proj.shape
    inter = two_inter // 2
    h_in = torch.zeros(ne, n, n, dtype=torch.float64)
    h_all = torch.zeros(n, n, dtype=torch.float64)
    counts = torch.zeros(ne, dtype=torch.int64)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take_experts(x, top_k_index, _top_k_weights):
        counts.add_(hessian_add_routed(h_in, x, top_k_index))
        hessian_add(h_all, x)
        saved.append((x, top_k_index))

    with _timed(run_, "forward+hessian"), stop_before(experts, take_experts):
        for h, kw in zip(hidden, kws, strict=True):
            run_to_stop(layer, h, **kw)
    run_.routed_tokens.append(counts.tolist())
    h_in = _expert_hessians(run_, h_in, counts, lambda e: h_all)
    q, s = _solve_experts(run_, experts.gate_up_proj.detach(), h_in, lambda e: h_all, act_order)
    experts.gate_up_proj.copy_(q)
    base = f"model.layers.{i}.block_sparse_moe.experts"
    for e in range(ne):
        for proj, rows in (("w1", slice(0, inter)), ("w3", slice(inter, None))):
            run_.values[f"{base}.{e}.{proj}.weight"] = q[e, rows]
            run_.scales[f"{base}.{e}.{proj}.weight"] = s[e, rows]

    def intermediate(e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)  # as MixtralExperts computes it
        return experts.act_fn(gate) * up

    h_down = torch.zeros(ne, inter, inter, dtype=torch.float64)
    with _timed(run_, "forward+hessian"):
        for x, idx in saved:
            for e in range(ne):
                hessian_add(h_down[e], intermediate(e, x[(idx == e).any(-1)]))

    def all_down(e: int) -> torch.Tensor:
        h = torch.zeros(inter, inter, dtype=torch.float64)
        for x, _ in saved:
            hessian_add(h, intermediate(e, x))
        return h

    h_down = _expert_hessians(run_, h_down, counts, all_down)
    q, s = _solve_experts(run_, experts.down_proj.detach(), h_down, all_down, act_order)
    experts.down_proj.copy_(q)
    for e in range(ne):
        run_.values[f"{base}.{e}.w2.weight"] = q[e]
        run_.scales[f"{base}.{e}.w2.weight"] = s[e]


@torch.no_grad()
def sequential_gptq(src: Path, calib: torch.Tensor, act_order: bool, moe: bool) -> GptqRun:
    """Quantize the MLP (or expert) weights of src layer by layer on calibration tokens [N, L] (module doc)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    run_ = GptqRun()
    with _timed(run_, "forward+hessian"):
        hidden, kws = _first_layer_inputs(model, calib)
    for i, layer in enumerate(model.model.layers):
        (_moe_layer if moe else _dense_layer)(run_, i, layer, hidden, kws, act_order)
        with _timed(run_, "forward+hessian"):
            hidden = [_layer_out(layer, h, kw) for h, kw in zip(hidden, kws, strict=True)]
        print(f"  layer {i}: " + ", ".join(f"{k} {v:.0f} s" for k, v in run_.seconds.items()), flush=True)
    return run_


def write_values(src: Path, dst: Path, values: dict[str, torch.Tensor]) -> Path:
    """A copy of the single-file checkpoint src with `values` in place of its tensors, as bf16 (exact)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", assets.COMPLETE_MARKER))
    state = load_file(src / "model.safetensors")
    for name, v in values.items():
        if state[name].shape != v.shape:
            raise ValueError(f"{name}: GPTQ gave {tuple(v.shape)}, the source has {tuple(state[name].shape)}")
        bf = v.to(torch.bfloat16)
        if not torch.equal(bf.float(), v):
            raise ValueError(f"{name}: an MXFP4 value is not exact in bf16")
        state[name] = bf
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def quantize_checkpoint(src: Path, dst: Path, preset: str) -> dict:
    return run(make_plan(open_checkpoint(src), Selection(preset), Rule.MSE3, SHARD_BYTES), dst, device="cpu",
               overwrite=True, progress=False)


def scale_bytes_moved(dst: Path, scales: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(blocks whose written exponent differs from GPTQ's own, blocks): values are equal either way."""
    out = {}
    for f in sorted(dst.glob("*.safetensors")):
        out.update(load_file(f))
    moved = total = 0
    for name, s in scales.items():
        written = out[name.removesuffix(".weight") + ".weight_scale"]
        moved += int((written != s).sum())
        total += s.numel()
    return moved, total


@torch.no_grad()
def score_windows(src: Path, ckpts: dict[str, Path], ids: torch.Tensor, n_windows: int, seq_len: int):
    """Per-window Totals of the source and every checkpoint on the same windows of ids."""
    models = {"source": load_model(src, torch.float32, torch.device("cpu"))}
    models.update({k: load_model(p, torch.float32, torch.device("cpu")) for k, p in ckpts.items()})
    per: dict[str, list[Totals]] = {k: [] for k in models}
    wins = windows(ids.numel(), seq_len, seq_len, n_windows)
    for w in wins:
        targets = ids[w.first_target:w.end]
        ref = None
        for k, m in models.items():
            logits = m(input_ids=ids[None, w.begin:w.end], use_cache=False).logits[0, w.logit_rows()]
            per[k].append(score(logits, targets, ref))
            ref = logits if ref is None else ref
    return per, wins


def paired_z(a: list[float], b: list[float]) -> float:
    """Mean of a - b over windows in units of its standard error (positive: b is lower)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean() / (d.std() / math.sqrt(d.numel())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--methods", default="rtn,gptq", help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--work", type=Path, default=assets.cache_dir() / "bench-gptq")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512, help="calibration and eval window length")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    methods = args.methods.split(",")
    src = spec.build(assets.cache_dir())
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} threads; source {src}")

    ids = tokenize(src, wikipedia())
    calib_start = ids.numel() - args.calib_samples * args.seq_len
    eval_end = args.eval_windows * args.seq_len
    if calib_start < eval_end:
        raise SystemExit(f"calibration tokens [{calib_start}, ...) overlap eval tokens [0, {eval_end})")
    calib = ids[calib_start:].reshape(args.calib_samples, args.seq_len)
    print(f"{ids.numel():,} tokens; eval [0, {eval_end:,}), calibration [{calib_start:,}, {ids.numel():,}): disjoint")

    results: dict[str, dict] = {}
    ckpts: dict[str, Path] = {}
    for method in methods:
        act_order = METHODS[method]
        dst = work / f"{spec.name}-{method}"
        t0 = time.perf_counter()
        row: dict = {}
        if act_order is None:
            report = quantize_checkpoint(src, dst, spec.preset)
            row["quantize_s"] = report["totals"]["seconds"]
        else:
            g = sequential_gptq(src, calib, act_order, args.model == "moe")
            row.update(gptq_s={k: round(v, 1) for k, v in g.seconds.items()}, experts=g.experts,
                       routed_tokens=g.routed_tokens)
            values_dir = write_values(src, work / f"{spec.name}-{method}-values-bf16", g.values)
            report = quantize_checkpoint(values_dir, dst, spec.preset)
            rel = report["totals"]["rel_error"]
            if rel != 0.0:
                raise SystemExit(f"{dst}: qstream's MSE3 did not reproduce the GPTQ values (rel. error {rel})")
            moved, blocks = scale_bytes_moved(dst, g.scales)
            row.update(scale_bytes_moved=moved, blocks=blocks)
            row["verify_against_values"] = verify(dst, values_dir).ok
            row["verify_against_source_failures"] = len(verify(dst, src).failures)  # RTN's bound: expected
        row["verify"] = verify(dst).ok
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["peak_rss_mib_so_far"] = peak_rss_bytes() // 2**20
        print(method, json.dumps({k: v for k, v in row.items() if k != "routed_tokens"}), flush=True)
        results[method] = row
        ckpts[method] = dst

    t0 = time.perf_counter()
    per, wins = score_windows(src, ckpts, ids[:eval_end], args.eval_windows, args.seq_len)
    eval_s = time.perf_counter() - t0
    kl = {k: [t.kl / t.tokens for t in v] for k, v in per.items()}
    rows = []
    for k, v in per.items():
        tot = Totals()
        for t in v:
            tot.add(t)
        nll = tot.nll / tot.tokens
        r = {"ppl": math.exp(nll), "kl": tot.kl / tot.tokens, "top1": tot.agree / tot.tokens, "tokens": tot.tokens}
        if k != "source":
            results[k].update(r)
        rows.append([k, f"{r['ppl']:.3f}", "" if k == "source" else f"{r['kl']:.4f}",
                     "" if k == "source" else f"{100 * r['top1']:.2f}%",
                     "" if k in ("source", methods[0]) else f"{paired_z(kl[methods[0]], kl[k]):+.1f}"])
    print(f"eval: {len(wins)} windows x {args.seq_len} tokens from the start of the corpus, "
          f"{per['source'][0].tokens * len(wins):,} tokens scored, {eval_s:.0f} s")
    print(table(["model", "PPL", f"KL(source||model)", "top-1 agree", f"paired z of KL vs {methods[0]}"], rows))
    out = work / f"results-{'-'.join(methods)}.json"
    out.write_text(json.dumps({"model": args.model, "args": {k: str(v) for k, v in vars(args).items()},
                               "tokens": ids.numel(), "calib_start": calib_start, "eval_end": eval_end,
                               "eval_s": eval_s, "peak_rss_mib": peak_rss_bytes() // 2**20,
                               "per_window_kl": kl, "results": results}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
