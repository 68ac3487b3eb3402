"""Sequential GPTQ through the engine (`quantize --method gptq`): Hessians equal to the whole model's own inputs
(each layer's taken after the layers before it were quantized), routed and starved experts, the cases each module
is solved by, determinism across runs and thread counts, resume, verify, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from qstream.calib import sequential, solve
from qstream.calib.gptq import gptq_quantize
from qstream.calib.hessians import UP, Target
from qstream.calib.imatrix import quantize_weighted
from qstream.calib.solve import CASES, IMATRIX, MSE3, OWN, GptqSettings, solve_modules
from qstream.check.verify import verify
from qstream.cli import cli
from qstream.common import REPORT_NAME
from qstream.errors import Interrupted
from qstream.evals.models import load_model
from qstream.format.mxfp4 import E8M0_BIAS, Rule, dequantize, quantize
from qstream.io.staging import gptq_dir_for, temp_dir_for
from tests.fixtures import assert_same_files, load_tensors
from tests.test_bad_input import assert_refused, tree_hashes
from tests.test_evaluate import PROSE, byte_tokenizer

SMALL = ["--calib-samples", "3", "--calib-seq-len", "48"]


def _quantize(src: Path, dst: Path, *args: object) -> Result:
    return CliRunner().invoke(cli, ["quantize", str(src), str(dst), "--no-progress", "--device", "cpu",
                                    *map(str, args)])


def _source(fixture: Path, tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    shutil.copytree(fixture, src)
    byte_tokenizer(src)  # any text tokenizes
    prose = tmp_path / "prose.txt"
    prose.write_text(PROSE * 3)
    return src, prose


# ------------------------------------------------------------------------------------------------ solving


def test_solve_modules_cases() -> None:
    """Own tokens: GPTQ under the imatrix exponents; no tokens: mse3; a Hessian that cannot be factored: the
    imatrix choice alone; the all-token flag marks GPTQ on every token's statistics."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, 64, generator=g)
    x = torch.randn(4, 200, 64, generator=g) * torch.linspace(0.1, 3, 64)
    h = (x.transpose(1, 2) @ x).double()
    h[2] = -torch.eye(64, dtype=torch.float64)  # not positive definite
    tokens = torch.tensor([200, 0, 200, 200])
    own = torch.tensor([True, True, True, False])
    packed, scales, case = solve_modules(w, h, tokens, GptqSettings(), own)
    assert case.tolist() == [OWN, MSE3, IMATRIX, CASES.index("gptq-all-tokens")]
    q = quantize(w[1], Rule.MSE3)
    assert torch.equal(packed[1], q.packed) and torch.equal(scales[1], q.scales)
    a = torch.diagonal(h[2]) / 200
    q = quantize_weighted(w[2], a.clamp(min=0))
    assert torch.equal(packed[2], q.packed) and torch.equal(scales[2], q.scales)
    e = quantize_weighted(w[0], torch.diagonal(h[0]) / 200).scales.to(torch.int32) - E8M0_BIAS
    q = gptq_quantize(w[0], h[0], e, act_order=GptqSettings().act_order)
    assert torch.equal(packed[0], q.packed) and torch.equal(scales[0], q.scales)


# ------------------------------------------------------------------------------------------------ Hessians


def _captured_hessians(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str], torch.Tensor]:
    """Every Hessian the editor solves with, by (model parameter, kind of group)."""
    seen: dict[tuple[str, str], torch.Tensor] = {}
    solve_linear, solve_group = sequential.SequentialGptq._solve_linear, sequential.SequentialGptq._solve_group

    def linear(self, t: Target):  # noqa: ANN001, ANN202
        seen[(t.param, "linear")] = t.h.clone()  # type: ignore[union-attr]
        if t.cross:
            seen[(t.param, "linear-cross")] = t.c.clone()  # type: ignore[union-attr]
        return solve_linear(self, t)

    def group(self, t: Target, grp: list[int], starved: frozenset[int]):  # noqa: ANN001, ANN202
        seen[(t.param, f"group{grp[0]}")] = t.h.clone()  # type: ignore[union-attr]
        if t.cross:
            seen[(t.param, f"group{grp[0]}-cross")] = t.c.clone()  # type: ignore[union-attr]
        seen[(t.param, "routed")] = t.routed.clone()  # type: ignore[union-attr]
        if t.kind == UP:
            seen[(t.param, "all")] = t.h_all.clone()  # type: ignore[union-attr]
            if t.cross:
                seen[(t.param, "all-cross")] = t.c_all.clone()  # type: ignore[union-attr]
        return solve_group(self, t, grp, starved)

    monkeypatch.setattr(sequential.SequentialGptq, "_solve_linear", linear)
    monkeypatch.setattr(sequential.SequentialGptq, "_solve_group", group)
    return seen


def _reference_inputs(src: Path, dst: Path, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Inputs of decoder layer `layer`'s Linears and experts in the WHOLE model (transformers' own forward, float32),
    with the layers before it holding their quantized weights from `dst` (as the sequential engine runs them)."""
    model = load_model(src, torch.float32, torch.device("cpu"))
    quantized = load_model(dst, torch.float32, torch.device("cpu"))
    for i in range(layer):
        model.model.layers[i].load_state_dict(quantized.model.layers[i].state_dict())
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.model.layers[layer].named_modules(prefix=f"model.layers.{layer}"):
        if isinstance(module, torch.nn.Linear) or hasattr(module, "has_gate"):
            def hook(m, args, kwargs, name=name):  # noqa: ANN001, ANN202
                x = args[0] if args else kwargs["hidden_states"]
                got[name] = x.reshape(-1, x.shape[-1])
                if hasattr(m, "has_gate"):
                    got[name + ":index"] = args[1] if len(args) > 1 else kwargs["top_k_index"]
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return got


def test_hessians_are_the_quantized_prefix_inputs(tiny_llama: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 1's Hessians (float32 engine) equal x^T x of its inputs in the whole model whose layer 0 holds the
    GPTQ output: each layer is calibrated on what the quantized layers before it compute; gate/up's cross terms
    equal x_src^T x, x_src the inputs in the unquantized model (the reference stream, token for token); down, a
    later stage, gets none."""
    from qstream.calib.calibrate import calibration_ids
    from qstream.io.checkpoint import open_checkpoint
    from qstream.io.text_sources import from_file
    from qstream.planning.plan import make_plan
    from qstream.planning.selection import Selection
    from qstream.quantize import quantize_checkpoint

    src, prose = _source(tiny_llama, tmp_path)
    seen = _captured_hessians(monkeypatch)
    plan = make_plan(open_checkpoint(src), Selection("mlp"), Rule.MSE3, 10**9)
    s = GptqSettings(samples=2, seq_len=40, dtype="float32", device="cpu", asymmetric=True, fit_down=False)
    results = tmp_path / "results"
    sequential.solve_sequential(plan, results, from_file(prose), s, progress=False)
    dst = tmp_path / "dst"
    quantize_checkpoint(plan, dst, "cpu", progress=False, calibrated=sequential.GptqModules(results, plan))
    ids, _ = calibration_ids(src, from_file(prose), 2, 40)
    ref = _reference_inputs(src, dst, ids.reshape(2, 40), 1)
    unquantized = _reference_inputs(src, src, ids.reshape(2, 40), 1)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        x, x_src = ref[f"model.layers.1.mlp.{proj}"].double(), unquantized[f"model.layers.1.mlp.{proj}"].double()
        h = seen[(f"model.layers.1.mlp.{proj}.weight", "linear")]
        tol = 1e-4 * float(h.diagonal().mean())
        torch.testing.assert_close(h, x.T @ x, rtol=1e-4, atol=tol)
        if proj == "down_proj":
            assert (f"model.layers.1.mlp.{proj}.weight", "linear-cross") not in seen
            continue
        c = seen[(f"model.layers.1.mlp.{proj}.weight", "linear-cross")]
        torch.testing.assert_close(c, x_src.T @ x, rtol=1e-4, atol=tol)
        assert not torch.allclose(c, h, rtol=1e-3)
    # and layer 0's are not: the quantized layer 0 changed layer 1's inputs (the test can fail)
    unq = load_model(src, torch.float32, torch.device("cpu"))
    x0 = {}
    unq.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: x0.setdefault("x", a[0]))
    with torch.inference_mode():
        unq(input_ids=ids.reshape(2, 40), use_cache=False)
    x = x0["x"].reshape(-1, x0["x"].shape[-1]).double()
    assert not torch.allclose(seen[("model.layers.1.mlp.down_proj.weight", "linear")], x.T @ x, rtol=1e-4)


def test_expert_hessians_routed_and_starved(tiny_mixtral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each expert's gate/up Hessian is over the tokens routed to it, its down projection's over its own
    activations on them; with a token floor above every expert's count, all are starved: gate/up take the
    Hessian of every token and down its activations on every token."""
    from qstream.calib.calibrate import calibration_ids
    from qstream.calib.stats import down_input
    from qstream.io.checkpoint import open_checkpoint
    from qstream.io.text_sources import from_file
    from qstream.planning.plan import make_plan
    from qstream.planning.selection import Selection

    src, prose = _source(tiny_mixtral, tmp_path)
    plan = make_plan(open_checkpoint(src), Selection("experts"), Rule.MSE3, 10**9)
    ids, _ = calibration_ids(src, from_file(prose), 2, 40)
    model = load_model(src, torch.float32, torch.device("cpu"))
    experts = model.model.layers[0].mlp.experts
    ref = _reference_inputs(src, src, ids.reshape(2, 40), 0)
    x, index = ref["model.layers.0.mlp.experts"], ref["model.layers.0.mlp.experts:index"].reshape(80, -1)
    param = "model.layers.0.mlp.experts"
    for floor, label in ((1, "routed"), (10**6, "starved")):
        seen = _captured_hessians(monkeypatch)
        s = GptqSettings(samples=2, seq_len=40, dtype="float32", device="cpu", min_tokens=floor, fit_down=False)
        sequential.solve_sequential(plan, tmp_path / label, from_file(prose), s, progress=False)
        routed = seen[(f"{param}.gate_up_proj", "routed")]
        assert routed.tolist() == torch.bincount(index.reshape(-1), minlength=len(routed)).tolist()
        for e in range(len(routed)):
            xe = x if label == "starved" else x[(index == e).any(-1)]
            up = seen[(f"{param}.gate_up_proj", "group0")][e]
            down = seen[(f"{param}.down_proj", "group0")][e]
            with torch.no_grad():
                d = down_input(experts, e, xe).double()
            want_up = (x.double().T @ x.double()) if label == "starved" else xe.double().T @ xe.double()
            if label == "starved":
                torch.testing.assert_close(seen[(f"{param}.gate_up_proj", "all")], want_up, rtol=1e-4, atol=1e-3)
            else:
                torch.testing.assert_close(up, want_up, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(down, d.T @ d, rtol=1e-4, atol=1e-3)
        summary = json.loads((tmp_path / label / sequential.SUMMARY_NAME).read_text())
        all_tokens = summary["cases"]["gptq-all-tokens"]
        assert (all_tokens > 0) == (label == "starved") and summary["cases"]["mse3"] == 0


def test_expert_cross_terms_pair_source_and_quantized_inputs(tiny_mixtral: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 1's expert cross terms: for the tokens the quantized model routes to each expert, the source model's
    inputs against the quantized model's (gate/up; down, a later stage, gets none)."""
    from qstream.calib.calibrate import calibration_ids
    from qstream.io.checkpoint import open_checkpoint
    from qstream.io.text_sources import from_file
    from qstream.planning.plan import make_plan
    from qstream.planning.selection import Selection
    from qstream.quantize import quantize_checkpoint

    src, prose = _source(tiny_mixtral, tmp_path)
    plan = make_plan(open_checkpoint(src), Selection("experts"), Rule.MSE3, 10**9)
    seen = _captured_hessians(monkeypatch)
    s = GptqSettings(samples=2, seq_len=40, dtype="float32", device="cpu", min_tokens=1, asymmetric=True,
                     fit_down=False)
    sequential.solve_sequential(plan, tmp_path / "results", from_file(prose), s, progress=False)
    dst = tmp_path / "dst"
    quantize_checkpoint(plan, dst, "cpu", progress=False, calibrated=sequential.GptqModules(tmp_path / "results", plan))
    ids = calibration_ids(src, from_file(prose), 2, 40)[0].reshape(2, 40)
    param = "model.layers.1.mlp.experts"
    q, unq = _reference_inputs(src, dst, ids, 1), _reference_inputs(src, src, ids, 1)
    x, index, x_src = q[param], q[param + ":index"].reshape(80, -1), unq[param]
    assert not torch.allclose(x, x_src)
    routed = seen[(f"{param}.gate_up_proj", "routed")]
    assert (f"{param}.down_proj", "group0-cross") not in seen
    for e in range(len(routed)):
        rows = (index == e).any(-1)
        if routed[e] > 0:
            up = seen[(f"{param}.gate_up_proj", "group0-cross")][e]
            torch.testing.assert_close(up, x_src[rows].double().T @ x[rows].double(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(seen[(f"{param}.gate_up_proj", "all-cross")], x_src.double().T @ x.double(),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fixture,preset,floor", [("tiny_llama", "mlp", 0), ("tiny_mixtral", "experts", 1),
                                                  ("tiny_qwen35", "experts", 10**6)])
def test_fitted_down_pairs_quantized_and_source_activations(fixture: str, preset: str, floor: int, tmp_path: Path,
                                                           request: pytest.FixtureRequest,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """By default each down projection is fitted to its source MLP: layer 1's down projections are solved with
    H = a_q^T a_q, a_q what they receive from layer 1's quantized gate/up, and C = a_src^T a_q, a_src what the source
    gate/up give on the same tokens, both computed here in the whole model whose layer 0 and layer 1's gate/up hold
    the output's values: a dense MLP's, each expert's on its routed tokens (per-expert tensors), and with every
    expert starved, on every token (fused experts). C differs from H (the test can fail)."""
    from qstream.calib.calibrate import calibration_ids
    from qstream.calib.stats import down_input
    from qstream.io.checkpoint import open_checkpoint
    from qstream.io.text_sources import from_file
    from qstream.planning.plan import make_plan
    from qstream.planning.selection import Selection
    from qstream.quantize import quantize_checkpoint

    src, prose = _source(request.getfixturevalue(fixture), tmp_path)
    plan = make_plan(open_checkpoint(src), Selection(preset), Rule.MSE3, 10**9)
    seen = _captured_hessians(monkeypatch)
    s = GptqSettings(samples=2, seq_len=40, dtype="float32", device="cpu", min_tokens=floor)
    sequential.solve_sequential(plan, tmp_path / "results", from_file(prose), s, progress=False)
    dst = tmp_path / "dst"
    quantize_checkpoint(plan, dst, "cpu", progress=False, calibrated=sequential.GptqModules(tmp_path / "results", plan))
    ids = calibration_ids(src, from_file(prose), 2, 40)[0].reshape(2, 40)
    inputs = _reference_inputs(src, dst, ids, 1)  # layer 0 quantized, layer 1 as the source: its MLP's inputs
    mlp_src = load_model(src, torch.float32, torch.device("cpu")).model.layers[1].mlp
    mlp_q = load_model(dst, torch.float32, torch.device("cpu")).model.layers[1].mlp
    pairs = []
    with torch.no_grad():
        if preset == "mlp":
            param = "model.layers.1.mlp.down_proj.weight"
            x = inputs["model.layers.1.mlp.gate_proj"]
            a_q, a_src = (m.act_fn(m.gate_proj(x)) * m.up_proj(x) for m in (mlp_q, mlp_src))
            pairs.append((seen[(param, "linear")], seen[(param, "linear-cross")], a_q, a_src))
        else:
            name = next(n for n in inputs if n.endswith(".experts"))
            x, index = inputs[name], inputs[name + ":index"].reshape(80, -1)
            param = name.replace("language_model.", "") + ".down_proj"
            h, c = seen[(param, "group0")], seen[(param, "group0-cross")]
            for e in range(h.shape[0]):
                xe = x if floor > 80 else x[(index == e).any(-1)]
                a_q, a_src = (down_input(m.experts, e, xe) for m in (mlp_q, mlp_src))
                pairs.append((h[e], c[e], a_q, a_src))
    assert len(pairs) > 0
    for h, c, a_q, a_src in pairs:
        a_q, a_src = a_q.double(), a_src.double()
        torch.testing.assert_close(h, a_q.T @ a_q, rtol=1e-4, atol=1e-4 * float(h.diagonal().mean()))
        torch.testing.assert_close(c, a_src.T @ a_q, rtol=1e-4, atol=1e-4 * float(h.diagonal().mean()))
    assert not torch.allclose(pairs[0][0], pairs[0][1], rtol=1e-3)


# ------------------------------------------------------------------------------------------------ the command


@pytest.mark.parametrize("fixture,preset,objective", [("tiny_llama", "mlp", "layer"), ("tiny_mixtral", "experts", "layer"),
                                                      ("tiny_qwen35", "experts", "layer"),
                                                      ("tiny_llama", "mlp", "source")])
def test_gptq_writes_verified_deterministic_output(fixture: str, preset: str, objective: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`quantize --method gptq` on dense, per-expert and fused-expert layouts (and with the source objective):
    every planned module solved (cases counted in the report and the card), `verify --source` passes, the results
    directory is gone, and a second run with another thread count, reading the source weights a few rows at a
    time, writes the same bytes, card included."""
    src, prose = _source(request.getfixturevalue(fixture), tmp_path)
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"  # one name: the card's title is the directory's
    a.parent.mkdir()
    b.parent.mkdir()
    gptq = ("--preset", preset, "--method", "gptq", "--gptq-objective", objective, "--calib-text", prose, *SMALL)
    res = _quantize(src, a, *gptq)
    assert res.exit_code == 0, res.output
    report = json.loads((a / REPORT_NAME).read_text())
    assert report["rule"] == "gptq" and report["gptq"]["modules_fallback"] == 0
    assert report["gptq"]["cases"]["gptq"] > 0 and report["gptq"]["cases"]["mse3"] == 0
    assert "`gptq`" in (a / "README.md").read_text()
    assert not gptq_dir_for(a).exists() and not temp_dir_for(gptq_dir_for(a)).exists()
    assert verify(a, source=src, device="cpu").ok
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    monkeypatch.setattr(solve, "CHUNK_ELEMENTS", 256)
    try:
        res = _quantize(src, b, *gptq)
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert_same_files(a, b, skip=(REPORT_NAME,))


def test_gptq_output_differs_from_rtn_and_imatrix(tiny_llama: Path, tmp_path: Path) -> None:
    """GPTQ moves codes off their nearest values (what imatrix keeps), under exponents in the imatrix set;
    --gptq-damp reaches the solve and the report; --gptq-down own changes the first layer's down projection only
    (its gate/up are solved before any fit) and says so in the report and the card."""
    src, prose = _source(tiny_llama, tmp_path)
    for method in ("imatrix", "gptq"):
        res = _quantize(src, tmp_path / method, "--preset", "mlp", "--method", method, "--calib-text", prose, *SMALL)
        assert res.exit_code == 0, res.output
    res = _quantize(src, tmp_path / "damped", "--preset", "mlp", "--method", "gptq", "--gptq-damp", "0.5",
                    "--calib-text", prose, *SMALL)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "damped" / REPORT_NAME).read_text())["gptq"]["damp"] == 0.5
    a, b = load_tensors(tmp_path / "imatrix"), load_tensors(tmp_path / "gptq")
    name = "model.layers.0.mlp.down_proj.weight_packed"
    assert not torch.equal(a[name], b[name])
    assert not torch.equal(b[name], load_tensors(tmp_path / "damped")[name])  # --gptq-damp reaches the solve
    res = _quantize(src, tmp_path / "own", "--preset", "mlp", "--method", "gptq", "--gptq-down", "own",
                    "--calib-text", prose, *SMALL)
    assert res.exit_code == 0, res.output
    own = load_tensors(tmp_path / "own")
    assert not torch.equal(b[name], own[name])
    for proj in ("gate_proj", "up_proj"):
        key = f"model.layers.0.mlp.{proj}.weight_packed"
        assert torch.equal(b[key], own[key])
    assert json.loads((tmp_path / "own" / REPORT_NAME).read_text())["gptq"]["fit_down"] is False
    assert json.loads((tmp_path / "gptq" / REPORT_NAME).read_text())["gptq"]["fit_down"] is True
    assert "towards its source MLP's output" in (tmp_path / "gptq" / "README.md").read_text()
    assert "towards its source MLP's output" not in (tmp_path / "own" / "README.md").read_text()
    deq = dequantize(b[name], b[name.replace("packed", "scale")], torch.float32)
    assert torch.isfinite(deq).all()


@pytest.mark.parametrize("objective", ["layer", "source"])
def test_gptq_resumes_at_the_layer_it_was_on(objective: str, tiny_llama: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while solving layer 1 keeps layer 0's results; --resume finishes with the same bytes as an
    uninterrupted run, without solving layer 0 again (with the source objective, the reference stream still
    goes through layer 0)."""
    src, prose = _source(tiny_llama, tmp_path)
    args = ("--preset", "mlp", "--method", "gptq", "--gptq-objective", objective, "--calib-text", prose, *SMALL)
    whole, dst = tmp_path / "whole" / "dst", tmp_path / "resumed" / "dst"  # the card names the directory
    whole.parent.mkdir()
    dst.parent.mkdir()
    assert _quantize(src, whole, *args).exit_code == 0
    original = sequential.SequentialGptq._solve_layer
    solved: list[int] = []

    def killed_at_1(self, model, index, forward):  # noqa: ANN001, ANN202
        solved.append(index)
        if index == 1:
            raise KeyboardInterrupt
        return original(self, model, index, forward)

    monkeypatch.setattr(sequential.SequentialGptq, "_solve_layer", killed_at_1)
    res = _quantize(src, dst, *args)
    assert res.exit_code != 0 and isinstance(res.exception, (Interrupted, KeyboardInterrupt, SystemExit))
    assert not dst.exists()
    solved.clear()

    def counted(self, model, index, forward):  # noqa: ANN001, ANN202
        solved.append(index)
        return original(self, model, index, forward)

    monkeypatch.setattr(sequential.SequentialGptq, "_solve_layer", counted)
    res = _quantize(src, dst, *args, "--resume")
    assert res.exit_code == 0, res.output
    assert 0 not in solved and 1 in solved
    assert_same_files(whole, dst, skip=(REPORT_NAME,))


def test_gptq_refusals(tiny_llama: Path, tmp_path: Path) -> None:
    src, prose = _source(tiny_llama, tmp_path)
    before = tree_hashes(src)
    dst = tmp_path / "dst"
    res = _quantize(src, dst, "--preset", "mlp", "--method", "gptq", "--calib-text", prose, "--calib-samples", "1000")
    assert_refused(res, "prose.txt", src, before, dst)  # too little text for 1000 windows
    assert not gptq_dir_for(dst).exists() and not temp_dir_for(gptq_dir_for(dst)).exists()
    res = _quantize(src, dst, "--preset", "mlp", "--method", "gptq", "--rule", "even")
    assert_refused(res, "--rule even with --method gptq", src, before, dst)
    res = _quantize(src, dst, "--preset", "mlp", "--method", "gptq", "--calib", tmp_path)
    assert_refused(res, "--calib is used by --method imatrix only", src, before, dst)
    res = _quantize(src, dst, "--preset", "mlp", "--gptq-damp", "0.1")
    assert_refused(res, "--gptq-damp is used by --method gptq only", src, before, dst)
    res = _quantize(src, dst, "--preset", "mlp", "--method", "imatrix", "--gptq-down", "own")
    assert_refused(res, "--gptq-down is used by --method gptq only", src, before, dst)
    for bad in ("0", "-0.1", "2", "nan"):
        res = _quantize(src, dst, "--preset", "mlp", "--method", "gptq", "--calib-text", prose, "--gptq-damp", bad)
        assert_refused(res, f"--gptq-damp {float(bad)}: give a share", src, before, dst)
