"""qstream calibrate: statistics against an independent whole-model computation, determinism, resume, bad input."""

from __future__ import annotations

import inspect
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from qstream.calib import stats as stats_mod
from qstream.calib.calibrate import (
    STATS_NAME,
    SUMMARY_NAME,
    Settings,
    calibrate,
    calibration_ids,
    expert_coverage,
    wanted_tensors,
)
from qstream.calib.stats import (
    Collector,
    down_input,
    down_input_sums,
    experts_dims,
    experts_inputs,
    layer_file,
    routed_sums,
    square_sums,
)
from qstream.cli import cli
from qstream.engine.hidden import HiddenStore
from qstream.engine.model import StreamedModel
from qstream.engine.run import Job, run
from qstream.evals.models import load_model
from qstream.io.checkpoint import open_checkpoint
from qstream.io.text_sources import Text
from qstream.io.tokens import tokenize
from tests.fixtures import build_qwen3_next
from tests.test_evaluate import PROSE, byte_tokenizer
from tests.test_gpt_oss import build_gpt_oss

CPU = torch.device("cpu")
SPANS = ((0, 48), (48, 96), (96, 144))


def engine_stats(path: Path, ids: torch.Tensor, mode: str, tmp: Path) -> dict[str, torch.Tensor]:
    """What the collector writes, layer files merged (float32, one sequence of the job per forward)."""
    with StreamedModel(path, torch.float32, CPU) as model:
        job = Job(ids, SPANS)
        with HiddenStore(job.tokens, model.hidden_size, torch.float32) as store:
            run(model, job, store, Collector(wanted_tensors(open_checkpoint(path)), mode, tmp), batch_tokens=48)
        return {k: v for i in range(model.n_layers) for k, v in load_file(tmp / layer_file(i)).items()}


class _DownInputs(TorchFunctionMode):
    """Records the left operand of every product whose right operand is one expert's slice of `down`."""

    def __init__(self, down: torch.Tensor) -> None:
        super().__init__()
        self.expert = {down[e].data_ptr(): e for e in range(down.shape[0])}
        self.shape = down.shape[1:]
        self.seen: dict[int, list[torch.Tensor]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul) and len(args) > 1:
            w = args[1]
            if isinstance(w, torch.Tensor) and w.shape == self.shape and w.data_ptr() in self.expert:
                self.seen[self.expert[w.data_ptr()]].append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


def oracle_stats(path: Path, ids: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """The same sums from transformers' whole model: hooks on its Linears, and each experts module's own eager
    forward replayed on the captured routing (`routed`) or with every token sent to every expert (`all`),
    its down projections' inputs caught as they are multiplied. Keys: model parameter names."""
    model = load_model(path, torch.float32, CPU)
    out: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
    count: dict[str, int] = defaultdict(int)

    def linear_hook(name):
        def hook(module, args):
            x = args[0].reshape(-1, module.in_features).double()
            out[name] = out[name] + x.square().sum(0)
            count[name] += x.shape[0]
        return hook

    def experts_hook(name):
        def hook(module, args, kwargs):
            x, index = [*args, *kwargs.values()][:2]
            x = x.reshape(-1, x.shape[-1])
            index = index.reshape(x.shape[0], -1)
            n_exp = module.down_proj.shape[0]
            up = "gate_up_proj" if module.has_gate else "up_proj"
            if mode == "all":
                index = torch.arange(n_exp).expand(x.shape[0], n_exp)
            eager = inspect.unwrap(type(module).forward)
            with _DownInputs(module.down_proj) as cap:
                eager(module, x, index, torch.ones(index.shape))
            for e in range(n_exp):
                routed = (index == e).any(-1)
                out[f"{name}.{up}:{e}"] = out[f"{name}.{up}:{e}"] + x[routed].double().square().sum(0)
                count[f"{name}.{up}:{e}"] += int(routed.sum())
                seen = torch.cat(cap.seen[e]) if cap.seen[e] else torch.zeros(0, module.down_proj.shape[-1])
                out[f"{name}.down_proj:{e}"] = out[f"{name}.down_proj:{e}"] + seen.double().square().sum(0)
                count[f"{name}.down_proj:{e}"] += seen.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_pre_hook(linear_hook(f"{name}.weight"))
        elif stats_mod._is_experts(module):
            module.register_forward_pre_hook(experts_hook(name), with_kwargs=True)
    with torch.no_grad():
        for b, e in SPANS:
            model(input_ids=ids[None, b:e])
    return {**out, **{f"{k}#tokens": torch.tensor(v) for k, v in count.items()}}


def model_name(source: str) -> tuple[str, int | None]:
    """Independently of the engine's mapping: a source weight's parameter in the causal LM (and expert index)."""
    name = source.replace("model.language_model.", "model.").replace(".block_sparse_moe.", ".mlp.")  # Mixtral
    parts = name.split(".")
    if "experts" in parts and parts[parts.index("experts") + 1].isdigit():  # per-expert on disk
        i = parts.index("experts")
        e, proj = int(parts[i + 1]), parts[i + 2]
        fused = "down_proj" if proj in ("down_proj", "w2") else "gate_up_proj"
        return ".".join(parts[:i + 1]) + f".{fused}", e
    return name, None


@pytest.mark.parametrize("mode", ["all", "routed"])
@pytest.mark.parametrize("fixture", ["tiny_qwen3_moe", "tiny_mixtral", "tiny_qwen35", "qwen3_next", "gpt_oss",
                                     "tiny_deepseek_v3"])
def test_statistics_match_the_whole_model(fixture: str, mode: str, request, tmp_path: Path) -> None:
    """Every quantizable weight's x^2 sums and token counts, and every expert's routed count, equal what the whole
    model's own modules see (fused and per-expert experts, gpt-oss's transposed biased experts, MLA, DeltaNet)."""
    builders = {"gpt_oss": build_gpt_oss, "qwen3_next": build_qwen3_next}
    path = builders[fixture](tmp_path / fixture) if fixture in builders else request.getfixturevalue(fixture)
    ids = torch.randint(0, 128, (SPANS[-1][1],), generator=torch.Generator().manual_seed(0))
    got = engine_stats(path, ids, mode, tmp_path)
    want = oracle_stats(path, ids, mode)
    wanted = wanted_tensors(open_checkpoint(path))
    assert {k.rpartition(":")[0] for k in got} == set(wanted)
    routed_seen = 0
    for source, shape in wanted.items():
        param, expert = model_name(source)
        x2, tokens = got[f"{source}:x2_sum"], got[f"{source}:tokens"]
        assert x2.dtype == torch.float64 and tokens.dtype == torch.int64 and x2.shape[-1] == shape[-1]
        if ".experts." not in source:
            torch.testing.assert_close(x2, want[param], rtol=1e-5, atol=1e-9)
            assert int(tokens) == int(want[f"{param}#tokens"]) == SPANS[-1][1]
            continue
        routed = got[f"{source}:routed"]
        experts = [expert] if expert is not None else list(range(shape[0]))
        for k, e in enumerate(experts):
            sel = (lambda t: t) if expert is not None else (lambda t, k=k: t[k])
            torch.testing.assert_close(sel(x2), want[f"{param}:{e}"], rtol=1e-5, atol=1e-9)
            assert int(sel(tokens)) == int(want[f"{param}:{e}#tokens"])
            if mode == "all":
                assert int(sel(tokens)) == SPANS[-1][1]
            routed_seen += int(sel(routed))
    assert routed_seen > 0


def experts_module(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    """A real transformers experts module of each layout the experts interface has, random weights: gated
    [E, 2I, H] (Mixtral, as Qwen3-MoE, Qwen3.5, DeepSeek-V3), transposed with biases and its own clamped gating
    (gpt-oss), ungated (Nemotron-H), transposed without biases (Aria)."""
    from transformers.models.aria.configuration_aria import AriaTextConfig
    from transformers.models.aria.modeling_aria import AriaExperts
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    make = {"mixtral": lambda: MixtralExperts(MixtralConfig(hidden_size=32, intermediate_size=24,
                                                              num_local_experts=7)),
            "gpt_oss": lambda: GptOssExperts(GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=7)),
            "nemotron_h": lambda: NemotronHExperts(NemotronHConfig(hidden_size=32, moe_intermediate_size=24,
                                                                   n_routed_experts=7)),
            "aria": lambda: AriaExperts(AriaTextConfig(hidden_size=32, intermediate_size=24, moe_num_experts=7))}
    module = make[kind]().to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "nemotron_h", "aria"])
def test_batched_experts_equal_one_at_a_time(kind: str, dtype: torch.dtype) -> None:
    """The batched sums equal the one-expert `down_input` reference summed in float64, whatever the group size
    (one expert, an uneven split, all at once), and routed mode's grouped product and 0/1 sums equal per-expert
    masks. Not bit for bit: the batched sums are float32, and a product of another shape may accumulate in
    another order, which in bfloat16 can round the projection one step (2^-8) apart."""
    experts = experts_module(kind, dtype)
    n_exp, tol = experts.down_proj.shape[0], {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.inference_mode():
        ref = [down_input(experts, e, x).double().square().sum(0) for e in range(n_exp)]
        w = experts.gate_up_proj if experts.has_gate else experts.up_proj
        width = w.shape[2 if experts.is_transposed else 1]
        for budget in (1, 3 * 40 * width * 4, 1 << 30):
            got = down_input_sums(experts, x, budget)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), torch.stack(ref), rtol=tol, atol=0)
        index = torch.rand(40, n_exp, generator=torch.Generator().manual_seed(3)).topk(2).indices
        index[0, 1] = n_exp  # a padding slot (Nemotron-H's one_hot has E + 1 classes) routes nowhere
        up, down = routed_sums(experts, x, index, True, True)
        assert up.dtype == down.dtype == torch.float32
        for e in range(n_exp):
            xe = x[(index == e).any(-1)]
            torch.testing.assert_close(up[e].double(), xe.double().square().sum(0), rtol=1e-6, atol=0)
            torch.testing.assert_close(down[e].double(), down_input(experts, e, xe).double().square().sum(0),
                                       rtol=tol, atol=0)
        assert routed_sums(experts, x, index, False, True)[0] is None
        unrouted = torch.full_like(index, n_exp)  # every slot padding: no expert computes
        assert not routed_sums(experts, x, unrouted, True, True)[1].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_square_sums_on_cuda_equal_the_plain_sum() -> None:
    """CUDA's one-pass reduction (a norm, squared) agrees with the float32 copy squared and summed."""
    a = (torch.randn(4096, 3, 520, generator=torch.Generator().manual_seed(4)) * 3).to(torch.bfloat16)
    for dim in (0, 1):
        got = square_sums(a.cuda(), dim).cpu()
        torch.testing.assert_close(got.double(), a.double().square().sum(dim), rtol=1e-6, atol=0)
        torch.testing.assert_close(got, square_sums(a, dim), rtol=1e-6, atol=0)


@pytest.mark.parametrize("passed", [3, 1, 0])
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "nemotron_h", "aria"])
def test_experts_inputs_however_the_model_passes_them(kind: str, passed: int) -> None:
    """A forward pre-hook finds an experts module's tokens and routing whether its caller passes them by position
    or by the forward's own names (gpt-oss: `router_indices`), and its widths whichever way it stores them."""
    experts = experts_module(kind, torch.float32)
    up_name, n_exp, hidden, inner = experts_dims(experts)
    assert (up_name, n_exp, hidden, inner) == ("up_proj" if kind == "nemotron_h" else "gate_up_proj", 7, 32, 24)
    gen = torch.Generator().manual_seed(4)
    values = (torch.randn(10, hidden, generator=gen), torch.rand(10, n_exp, generator=gen).topk(2).indices,
              torch.full((10, 2), 0.5))
    names = list(inspect.signature(type(experts).forward).parameters)[1:4]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    experts.register_forward_pre_hook(lambda m, a, k: seen.append(experts_inputs(m, a, k)), with_kwargs=True)
    with torch.no_grad():
        experts(*values[:passed], **dict(zip(names[passed:], values[passed:])))
    ((x, index),) = seen
    assert torch.equal(x, values[0]) and torch.equal(index, values[1])


@pytest.fixture
def src(tiny_qwen35: Path, tmp_path: Path) -> Path:
    """The tiny Qwen3.5-MoE with a byte-level tokenizer (any text tokenizes)."""
    out = tmp_path / "src"
    shutil.copytree(tiny_qwen35, out)
    byte_tokenizer(out)
    return out


def text(s: str = PROSE) -> Text:
    return Text(s, {"kind": "file", "path": "prose.txt"})


SMALL = Settings(samples=6, seq_len=64, batch_tokens=128, dtype="float32", device="cpu")


def test_same_bytes_across_runs_threads_and_spilling(src: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = calibrate(src, tmp_path / "a", text(), SMALL, progress=False)
        torch.set_num_threads(1)
        calibrate(src, tmp_path / "b", text(), Settings(**{**SMALL.__dict__, "hidden_budget": 0}), progress=False)
    finally:
        torch.set_num_threads(threads)
    for name in (STATS_NAME, SUMMARY_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert {p.name for p in (tmp_path / "a").iterdir()} == {STATS_NAME, SUMMARY_NAME, "qstream_report.json"}
    summary = json.loads((tmp_path / "a" / SUMMARY_NAME).read_text())
    assert summary["tokens"] == 6 * 64 and summary["text"]["taken"].startswith("first 384 tokens")
    assert summary["without_statistics"] == [] and len(summary["expert_coverage"]) == 4
    assert a["report"]["peak_rss_bytes"] > 0
    with safe_open(tmp_path / "a" / STATS_NAME, "pt") as f:
        fused = "model.language_model.layers.0.mlp.experts.down_proj"
        assert f.get_tensor(f"{fused}:x2_sum").shape == (8, 32)
        assert f.get_tensor(f"{fused}:tokens").tolist() == [384] * 8
        assert int(f.get_tensor(f"{fused}:routed").sum()) == 384 * 2  # top-2


def test_resume_from_the_first_unfinished_layer(src: Path, tmp_path: Path, monkeypatch) -> None:
    calibrate(src, tmp_path / "whole", text(), SMALL, progress=False)
    real_end, begun = Collector.layer_end, []

    def dies_at_layer_2(self, model, index):
        if index == 2:
            raise KeyboardInterrupt
        real_end(self, model, index)

    monkeypatch.setattr(Collector, "layer_end", dies_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        calibrate(src, tmp_path / "out", text(), SMALL, progress=False)
    assert not (tmp_path / "out").exists()
    partial = tmp_path / ".out.qstream-partial"
    assert sorted(p.name for p in partial.glob("layer-*")) == [layer_file(0), layer_file(1)]
    monkeypatch.setattr(Collector, "layer_end", real_end)
    real_begin = Collector.layer_begin
    monkeypatch.setattr(Collector, "layer_begin", lambda self, m, i: begun.append(i) or real_begin(self, m, i))
    summary = calibrate(src, tmp_path / "out", text(), SMALL, resume=True, progress=False)
    assert begun == [2, 3] and summary["report"]["resumed_from_layer"] == 2
    for name in (STATS_NAME, SUMMARY_NAME):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not partial.exists()


def test_default_corpus_is_taken_from_its_end(src: Path) -> None:
    """Eval's default windows start at the corpus' beginning; calibration takes its end (a given text: its start)."""
    full, _ = tokenize(src, text())
    assert full.numel() == len(PROSE.encode())
    ids, info = calibration_ids(src, Text(PROSE, {"kind": "wikipedia", "package": "p"}), 2, 100)
    assert torch.equal(ids, full[-200:]) and info["taken"].startswith("last 200 tokens of the last ")
    ids, info = calibration_ids(src, text(), 2, 100)
    assert torch.equal(ids, full[:200]) and info["taken"].startswith("first 200 tokens of the first ")


def test_expert_coverage(tmp_path: Path) -> None:
    m = "model.layers.0.mlp.experts"
    save_file({f"{m}.gate_up_proj:routed": torch.tensor([0, 4, 100, 96]),
               f"{m}.down_proj:routed": torch.tensor([0, 4, 100, 96]),
               "model.layers.1.mlp.experts.0.w1.weight:routed": torch.tensor(7),
               "model.layers.1.mlp.experts.1.w1.weight:routed": torch.tensor(0)}, tmp_path / "s.safetensors")
    cov = {c["module"]: c for c in expert_coverage(tmp_path / "s.safetensors")}
    assert cov[m]["without_tokens"] == [0] and cov[m]["few_tokens"] == [1] and cov[m]["routed_max"] == 100
    assert cov["model.layers.1.mlp.experts"]["without_tokens"] == [1]


def one_line_error(args: list[str], *expected: str) -> None:
    res = CliRunner().invoke(cli, ["calibrate", *args, "--no-progress"])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and all(e in res.output for e in expected), res.output


def test_bad_input(src: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text(PROSE[:300])
    out = tmp_path / "stats"
    one_line_error([str(src), str(out), "--text-file", str(short), "--samples", "4", "--seq-len", "128"],
                   str(short), "300 tokens", "need 512")
    alien = tmp_path / "alien"
    shutil.copytree(src, alien)
    cfg = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**cfg, "model_type": "not-a-model"}))
    one_line_error([str(alien), str(out), "--text-file", str(short)], "config.json", "not-a-model")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    for f in sorted({v for k, v in index["weight_map"].items() if ".layers.2." in k}):
        tensors = {k: v for k, v in load_file(broken / f).items() if ".layers.2." not in k}
        save_file(tensors, broken / f, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".layers.2." not in k}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error([str(broken), str(out), "--text-file", str(short), "--samples", "1", "--seq-len", "64"],
                   "decoder layer 2", "incomplete")
    assert not out.exists() and not list(tmp_path.glob(".stats*"))


# command -> its words before the sizes, and its flags for the window count, window length and text file
SIZE_FLAGS = {"calibrate": ((), "--samples", "--seq-len", "--text-file"),
              "imatrix": (("--method", "imatrix"), "--calib-samples", "--calib-seq-len", "--calib-text"),
              "gptq": (("--method", "gptq"), "--calib-samples", "--calib-seq-len", "--calib-text")}


@pytest.mark.parametrize("command", list(SIZE_FLAGS))
def test_size_errors_name_the_flags_typed(command: str, src: Path, tmp_path: Path) -> None:
    """Too little text for the windows asked for, or windows too small: the one-line error names the flags of the
    command that was run (calibrate's --samples, quantize's --calib-samples), never the other command's."""
    words, samples, seq_len, text_flag = SIZE_FLAGS[command]
    other = "--calib-samples" if samples == "--samples" else "--samples"
    short = tmp_path / "short.txt"
    short.write_text(PROSE[:300])
    name = "calibrate" if command == "calibrate" else "quantize"
    for n, length, expected in (("4", "128", "need 512; give more text or lower"), ("0", "128", "at least 1 sample"),
                                ("1", "1", "at least 1 sample")):
        res = CliRunner().invoke(cli, [name, str(src), str(tmp_path / "out"), *words, text_flag, str(short),
                                       samples, n, seq_len, length, "--device", "cpu", "--no-progress"])
        assert res.exit_code == 2, res.output
        assert res.output.count("\n") == 1 and expected in res.output, res.output
        assert f"{samples} {n}" in res.output and f"{seq_len} {length}" in res.output, res.output
        assert other not in res.output, res.output
    assert not list(tmp_path.glob("*out*"))
