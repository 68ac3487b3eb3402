"""The layer-streaming engine: its forward equals transformers' whole-model forward on every layout, and eval on
it gives the numbers of the in-memory eval it replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qstream.engine.hidden import HiddenStore
from qstream.engine.model import HEAD, StreamedModel
from qstream.engine.run import Job, run
from qstream.errors import QstreamError
from qstream.evals.models import load_model
from qstream.evals.scoring import Totals, score, windows
from qstream.format.rules import Rule
from tests.fixtures import build_qwen3_next
from tests.fp8_layouts import to_layout
from tests.test_dequantize import quantize
from tests.test_gpt_oss import build_gpt_oss

CPU = torch.device("cpu")
# Three independent sequences, one shorter: batches of equal lengths, a batch the reference does not form.
SPANS = ((0, 40), (40, 80), (80, 97))


def streamed(path: Path, ids: torch.Tensor, budget: int = 1 << 30, ahead: bool = False, batch_tokens: int = 80
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(final hidden states, logits) per sequence from the engine."""
    with StreamedModel(path, torch.float32, CPU) as model:
        job = Job(ids, SPANS)
        with HiddenStore(job.tokens, model.hidden_size, torch.float32, budget) as store:
            run(model, job, store, batch_tokens=batch_tokens, ahead=ahead)
            assert store.spilled == (budget == 0)
            with model.loaded(HEAD), torch.no_grad():
                seqs = [store.read(job.offsets[k], job.offsets[k + 1]) for k in range(len(SPANS))]
                hidden = [model.final_hidden(h[None])[0] for h in seqs]
                logits = [model.logits(h) for h in seqs]
    return hidden, logits


def whole(path: Path, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same from transformers' whole-model forward (models.load_model: as eval loaded models until now)."""
    model = load_model(path, torch.float32, CPU)
    with torch.no_grad():
        out = [model(input_ids=ids[None, b:e], output_hidden_states=True) for b, e in SPANS]
    return [o.hidden_states[-1][0] for o in out], [o.logits[0] for o in out]


def assert_same_forward(path: Path, **kw) -> None:
    ids = torch.randint(0, 128, (SPANS[-1][1],), generator=torch.Generator().manual_seed(0))
    (h, lg), (rh, rlg) = streamed(path, ids, **kw), whole(path, ids)
    for a, b in zip(h + lg, rh + rlg, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_mixtral", "tiny_qwen3_moe", "tiny_qwen3_moe_fused",
                                     "tiny_qwen35", "tiny_deepseek_v3"])
def test_streamed_forward_equals_whole_model(fixture: str, request) -> None:
    assert_same_forward(request.getfixturevalue(fixture))


def test_gpt_oss_and_qwen3_next(tmp_path: Path) -> None:
    """gpt-oss (MXFP4 experts decoded by qstream, sliding-window layers, sinks) against transformers' own MXFP4
    loading; Qwen3-Next (Gated DeltaNet, per-expert experts, shared expert gate)."""
    assert_same_forward(build_gpt_oss(tmp_path / "gpt-oss"))
    assert_same_forward(build_qwen3_next(tmp_path / "qwen3-next"))


def test_spilled_store_and_load_ahead(tiny_qwen35: Path) -> None:
    """Hidden states in a file instead of memory, and the next layer loaded beside the current one (as on CUDA)."""
    assert_same_forward(tiny_qwen35, budget=0, ahead=True, batch_tokens=1)


@pytest.fixture(scope="module")
def qwen35_mxfp4(tiny_qwen35: Path, tmp_path_factory) -> Path:
    """Every Linear of the tiny Qwen3.5-MoE in MXFP4 (floor rule: far enough from the source for a KL above
    float noise)."""
    return quantize(tiny_qwen35, tmp_path_factory.mktemp("q35") / "q", "all-linear", Rule.FLOOR)


def test_mxfp4_checkpoint(qwen35_mxfp4: Path, tiny_llama: Path, tmp_path: Path) -> None:
    """A qstream MXFP4 output runs on qstream's decoding, as models.load_model decodes it."""
    assert_same_forward(qwen35_mxfp4)
    assert_same_forward(quantize(tiny_llama, tmp_path / "q", "mlp"))


def test_fp8_source(tiny_qwen3_moe: Path, tmp_path: Path) -> None:
    src = tmp_path / "fp8"
    to_layout(tiny_qwen3_moe, src, "fp8-block")
    assert_same_forward(src)


def test_eval_equals_in_memory_eval(tiny_qwen35: Path, qwen35_mxfp4: Path) -> None:
    """qstream.evals.evaluate's scores (now on the engine) equal the loop it replaced: every model whole in memory,
    each window through each model, scored from full logits. One window per forward, as that loop ran them:
    other batches round differently, which moves a KL this small (5e-5 nats per token) by about 3e-4 of itself."""
    from qstream.evals.streamed import score_windows

    q = qwen35_mxfp4
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    wins = windows(ids.numel(), 64, 48, 5)  # overlapping windows, a short last one
    totals, _ = score_windows([tiny_qwen35, q], ids, wins, torch.float32, CPU, batch_tokens=64, hidden_budget=0)
    models = [load_model(p, torch.float32, CPU) for p in (tiny_qwen35, q)]
    ref = [Totals(), Totals()]
    with torch.no_grad():
        for w in wins:
            logits = [m(input_ids=ids[None, w.begin:w.end]).logits[0, w.logit_rows()] for m in models]
            ref[0].add(score(logits[0], ids[w.first_target:w.end]))
            ref[1].add(score(logits[1], ids[w.first_target:w.end], logits[0]))
    for got, want in zip(totals, ref, strict=True):
        assert got.tokens == want.tokens and got.agree == want.agree
        assert got.nll == pytest.approx(want.nll, rel=1e-6) and got.kl == pytest.approx(want.kl, rel=1e-6)
    assert totals[1].kl > 0


def test_missing_expert(tiny_qwen3_moe: Path, tmp_path: Path) -> None:
    """A layer short of one expert is found when the layer loads (its experts stack to the wrong shape)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen3_moe, broken)
    f = broken / "model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if ".layers.2.mlp.experts.3." not in k}, f,
              metadata={"format": "pt"})
    with StreamedModel(broken, torch.float32, CPU) as model:
        job = Job(torch.zeros(8, dtype=torch.long), ((0, 8),))
        wrong = r"layers\.2\.mlp\.experts\.down_proj has shape \[7, 64, 32\], the model wants \[8"
        with HiddenStore(job.tokens, model.hidden_size, torch.float32) as store, \
                pytest.raises(QstreamError, match=wrong):
            run(model, job, store)


def test_missing_layer_and_unknown_model(tiny_llama: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    f = broken / "model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if ".layers.1." not in k}, f, metadata={"format": "pt"})
    with pytest.raises(QstreamError, match=r"model\.layers\.1\..*decoder layer 1.*incomplete"):
        StreamedModel(broken, torch.float32, CPU)
    alien = tmp_path / "alien"
    shutil.copytree(tiny_llama, alien)
    cfg = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
    with pytest.raises(QstreamError, match="no causal LM for model_type 'vit'"):
        StreamedModel(alien, torch.float32, CPU)
