"""Tiny, real Hugging Face checkpoints for tests.

Every builder instantiates a REAL transformers model class from a tiny config (random init under a fixed
seed), casts it to bf16 and writes a checkpoint directory that looks like the real thing on disk:
``config.json`` (from ``save_pretrained``), ``generation_config.json`` (fixed content, see
``GENERATION_CONFIG``), a ``LICENSE`` side file (``LICENSE_TEXT``) and the safetensors weights.

Builders (all ``(out_dir: Path, seed: int = 0, ...) -> Path``, returning ``out_dir``):

- ``build_qwen35_moe``: Qwen3_5MoeForConditionalGeneration, layout of Qwen/Qwen3.5-35B-A3B (FORMAT.md s.3):
  fused routed experts without ``.weight`` (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj
  [E, H, I]``), hand-added ``mtp.*`` with per-expert experts, 2 shards + ``model.safetensors.index.json``.
- ``build_qwen3_moe``: Qwen3MoeForCausalLM, per-expert ``mlp.experts.{e}.gate_proj.weight``, one
  ``model.safetensors``.
- ``build_qwen3_moe_fused``: same model as ``build_qwen3_moe`` (same seed -> same weights) saved with fused
  experts (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``, no ``.weight``).
- ``build_mixtral``: MixtralForCausalLM, ``block_sparse_moe.experts.{e}.w1|w2|w3.weight``.
- ``build_llama``: LlamaForCausalLM (dense); ``indivisible=True`` makes ``intermediate_size`` 80, so
  ``mlp.down_proj.weight`` is ``[64, 80]`` (input dim not a multiple of 32).

Constant tensors left by the models' own init (RMSNorm weights of zeros/ones, zero biases, ``dt_bias`` of
ones) get a small deterministic random perturbation, so "copied as-is" checks compare non-trivial bytes.
Everything else (Linear weights, experts, routers) keeps the model's own init.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "GENERATION_CONFIG",
    "LICENSE_TEXT",
    "SIDE_FILES",
    "assert_same_bytes",
    "assert_same_files",
    "build_llama",
    "build_mixtral",
    "build_qwen35_moe",
    "build_qwen3_moe",
    "build_qwen3_moe_fused",
    "first_difference",
    "load_tensors",
    "read_index",
    "tensor_names",
    "tensor_shapes",
]

LICENSE_TEXT = "Tiny test fixture for qstream.\nApache License 2.0 (stand-in text; only its bytes matter).\n"

# Written verbatim (not produced by transformers) so tests can check the file is copied byte for byte.
GENERATION_CONFIG = {
    "bos_token_id": 1,
    "do_sample": True,
    "eos_token_id": [2, 3],
    "pad_token_id": 0,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "5.24.0",
}

#: Non-weight files every builder writes besides config.json and the safetensors files.
SIDE_FILES = ("generation_config.json", "LICENSE")

_ST_METADATA = {"format": "pt"}


# ----------------------------------------------------------------------------------------------------------
# helpers


def _seeded_model(model_cls, config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    _perturb_constants(dict(model.named_parameters()), seed)
    return model.to(torch.bfloat16)


@torch.no_grad()
def _perturb_constants(named: dict[str, torch.Tensor], seed: int, std: float = 0.02) -> None:
    """In place: add N(0, std) noise to every floating tensor whose elements are all equal (norms, zero
    biases), visiting names in sorted order so the result depends only on the seed."""
    gen = torch.Generator().manual_seed(seed + 12345)
    for name in sorted(named):
        p = named[name]
        if p.is_floating_point() and p.numel() > 0 and bool((p == p.reshape(-1)[0]).all()):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def _write_side_files(out_dir: Path) -> None:
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (out_dir / "LICENSE").write_text(LICENSE_TEXT)


def _save(model, out_dir: Path, *, fused: bool) -> Path:
    """save_pretrained into out_dir (single model.safetensors), then the fixed side files."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    # save_original_format=True (the default) reverts transformers' fused-expert conversion, i.e. per-expert
    # names as on the Hub; False writes the in-memory (fused) layout.
    model.save_pretrained(out_dir, save_original_format=not fused, max_shard_size="10GB")
    _write_side_files(out_dir)
    return out_dir


def _write_sharded(out_dir: Path, tensors: dict[str, torch.Tensor], shard_names: list[str]) -> None:
    """Write tensors (sorted by name) into len(shard_names) files of about equal bytes + the HF index."""
    names = sorted(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    n = len(shard_names)
    groups: list[list[str]] = [[] for _ in range(n)]
    acc = 0
    for name, size in zip(names, sizes):
        idx = min(n - 1, acc * n // total)
        groups[idx].append(name)
        acc += size
    weight_map: dict[str, str] = {}
    for fname, group in zip(shard_names, groups):
        assert group, "empty shard"
        save_file({k: tensors[k].contiguous() for k in group}, str(out_dir / fname), metadata=_ST_METADATA)
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# inspection helpers for tests


def read_index(ckpt: Path) -> dict[str, str] | None:
    """weight_map of model.safetensors.index.json, or None for a single-file checkpoint."""
    p = Path(ckpt) / "model.safetensors.index.json"
    return json.loads(p.read_text())["weight_map"] if p.exists() else None


def tensor_shapes(ckpt: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype string)} over all safetensors files of the checkpoint."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def tensor_names(ckpt: Path) -> list[str]:
    return sorted(tensor_shapes(ckpt))


def first_difference(a: bytes, b: bytes) -> str | None:
    """None if equal, else one short line locating the first difference: for text the line, else the
    offset and a few bytes around it. Never the contents: a failing comparison of shards must not print
    megabytes (pytest shows whole diffs when it runs under CI)."""
    if a == b:
        return None
    size = f"{len(a):,} vs {len(b):,} bytes"
    try:
        la, lb = a.decode().splitlines(), b.decode().splitlines()
    except UnicodeDecodeError:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"{size}, first difference at byte {at:,}: {a[at:at + 16].hex()} vs {b[at:at + 16].hex()}"
    n = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
    la_n, lb_n = (repr(lines[n][:160]) if n < len(lines) else "(end of text)" for lines in (la, lb))
    return f"{size}, first difference on line {n + 1}: {la_n} vs {lb_n}"


def assert_same_bytes(a: bytes, b: bytes, what: str) -> None:
    """Fail with first_difference's one line, not a diff of the contents."""
    diff = first_difference(a, b)
    if diff is not None:
        pytest.fail(f"{what} differs: {diff}", pytrace=False)


def assert_same_files(a: Path, b: Path, pattern: str = "*", skip: tuple[str, ...] = ()) -> list[str]:
    """Files of a and b matching `pattern` (but `skip`) have the same names and bytes; returns the names.

    Reports the first differing file, where it differs, and nothing of its contents beyond a few bytes."""
    names_a = sorted(p.name for p in Path(a).glob(pattern) if p.name not in skip)
    names_b = sorted(p.name for p in Path(b).glob(pattern) if p.name not in skip)
    if names_a != names_b:
        pytest.fail(f"{a} and {b} hold different files: only in the first {sorted(set(names_a) - set(names_b))}, "
                    f"only in the second {sorted(set(names_b) - set(names_a))}", pytrace=False)
    for name in names_a:
        assert_same_bytes((Path(a) / name).read_bytes(), (Path(b) / name).read_bytes(), f"{name} ({a} vs {b})")
    return names_a


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of the checkpoint (tiny checkpoints only)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ----------------------------------------------------------------------------------------------------------
# 1. Qwen3.5-MoE (Qwen/Qwen3.5-35B-A3B layout)

QWEN35_TEXT = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # head_dim 32 * partial 0.25 = 8 rotary dims = 4 freqs = 2 + 1 + 1 (real: 256 * 0.25 / 2 = 32 = 11+11+10)
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
    # Not transformers config fields; kept as extra keys in config.json like the real checkpoint's.
    mtp_num_hidden_layers=1,
    attn_output_gate=True,
    full_attention_interval=4,
)

QWEN35_VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=64,  # = text hidden
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,  # must be a square
)

# Qwen's shard naming (the index is what readers must follow, not a name pattern).
QWEN35_SHARDS = ["model.safetensors-00001-of-00002.safetensors", "model.safetensors-00002-of-00002.safetensors"]


def _qwen35_mtp_tensors(model, text_config, seed: int) -> dict[str, torch.Tensor]:
    """mtp.* as in the real checkpoint (vLLM qwen3_5_mtp.py: Qwen3_5MultiTokenPredictor):
    fc [H, 2H], pre_fc_norm_embedding/hidden [H], norm [H], layers.0 = full-attention decoder layer whose
    routed experts are stored PER EXPERT (experts.{e}.gate_proj/up_proj/down_proj.weight)."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer, Qwen3_5MoeRMSNorm

    H = text_config.hidden_size
    n_mtp = getattr(text_config, "mtp_num_hidden_layers", 1)
    full_idx = text_config.layer_types.index("full_attention")
    torch.manual_seed(seed + 1)
    out: dict[str, torch.Tensor] = {}
    fc = torch.nn.Linear(2 * H, H, bias=False)
    torch.nn.init.normal_(fc.weight, std=text_config.initializer_range)
    out["mtp.fc.weight"] = fc.weight
    for name in ("mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden", "mtp.norm"):
        out[f"{name}.weight"] = Qwen3_5MoeRMSNorm(H, eps=text_config.rms_norm_eps).weight
    for i in range(n_mtp):
        layer = Qwen3_5MoeDecoderLayer(text_config, layer_idx=full_idx)
        layer.apply(model.model.language_model._init_weights)  # the text model carries the text config
        for k, v in layer.state_dict().items():
            if k == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows then up rows
                I = v.shape[1] // 2
                for e in range(v.shape[0]):
                    out[f"mtp.layers.{i}.mlp.experts.{e}.gate_proj.weight"] = v[e, :I]
                    out[f"mtp.layers.{i}.mlp.experts.{e}.up_proj.weight"] = v[e, I:]
            elif k == "mlp.experts.down_proj":  # [E, H, I]
                for e in range(v.shape[0]):
                    out[f"mtp.layers.{i}.mlp.experts.{e}.down_proj.weight"] = v[e]
            else:
                out[f"mtp.layers.{i}.{k}"] = v
    out = {k: v.detach().float().clone() for k, v in out.items()}
    _perturb_constants(out, seed + 1)
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


def build_qwen35_moe(out_dir: Path, seed: int = 0) -> Path:
    """Tiny Qwen3_5MoeForConditionalGeneration written like Qwen/Qwen3.5-35B-A3B (2 shards + index)."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    config = Qwen3_5MoeConfig(
        text_config=dict(QWEN35_TEXT), vision_config=dict(QWEN35_VISION), tie_word_embeddings=False
    )
    model = _seeded_model(Qwen3_5MoeForConditionalGeneration, config, seed)
    out_dir = _save(model, out_dir, fused=True)
    single = out_dir / "model.safetensors"
    tensors = load_file(str(single))
    single.unlink()
    mtp = _qwen35_mtp_tensors(model, model.config.text_config, seed)
    assert not set(mtp) & set(tensors)
    tensors.update(mtp)
    _write_sharded(out_dir, tensors, QWEN35_SHARDS)
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# 2. Qwen3-MoE (per-expert on disk) and the same model with fused experts


def _qwen3_moe_model(seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,  # dense MLP size (unused: every layer is sparse)
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return _seeded_model(Qwen3MoeForCausalLM, config, seed)


def build_qwen3_moe(out_dir: Path, seed: int = 0) -> Path:
    """Tiny Qwen3MoeForCausalLM, experts per expert (``mlp.experts.{e}.gate_proj.weight``), model.safetensors."""
    return _save(_qwen3_moe_model(seed), out_dir, fused=False)


def build_qwen3_moe_fused(out_dir: Path, seed: int = 0) -> Path:
    """Same weights as build_qwen3_moe(seed) but experts fused: ``mlp.experts.gate_up_proj [E, 2I, H]`` and
    ``mlp.experts.down_proj [E, H, I]`` (no ``.weight``), as transformers >= 5 writes with
    save_original_format=False."""
    return _save(_qwen3_moe_model(seed), out_dir, fused=True)


# ----------------------------------------------------------------------------------------------------------
# 3. Mixtral


def build_mixtral(out_dir: Path, seed: int = 0) -> Path:
    """Tiny MixtralForCausalLM: ``model.layers.N.block_sparse_moe.experts.{e}.w1|w2|w3.weight`` and
    ``block_sparse_moe.gate.weight`` (transformers' default save), model.safetensors."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return _save(_seeded_model(MixtralForCausalLM, config, seed), out_dir, fused=False)


# ----------------------------------------------------------------------------------------------------------
# 4. Llama (dense)


def build_llama(
    out_dir: Path, seed: int = 0, indivisible: bool = False, tie_word_embeddings: bool = False
) -> Path:
    """Tiny dense LlamaForCausalLM (2 layers, hidden 64, intermediate 128). ``indivisible=True``:
    intermediate 80, so ``mlp.down_proj.weight`` is [64, 80] (input dim not a multiple of 32).
    ``tie_word_embeddings=True``: no ``lm_head.weight`` on disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=80 if indivisible else 128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
    )
    return _save(_seeded_model(LlamaForCausalLM, config, seed), out_dir, fused=False)


# ----------------------------------------------------------------------------------------------------------
# DeepSeek-V3 (MLA attention, a dense first layer, shared + routed experts)


def build_deepseek_v3(out_dir: Path, seed: int = 0) -> Path:
    """Tiny DeepseekV3ForCausalLM: MLA projections (``self_attn.q_a_proj``, ``kv_a_proj_with_mqa``, ...), layer 0
    dense (``mlp.gate_proj``), layer 1 MoE with ``mlp.shared_experts`` and per-expert tensors, model.safetensors."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
        topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
        topk_method="noaux_tc",  # as DeepSeek-V3's config.json says: vLLM then loads e_score_correction_bias
        num_nextn_predict_layers=0,  # transformers writes no MTP layer, so the config must not declare one
    )
    return _save(_seeded_model(DeepseekV3ForCausalLM, config, seed), out_dir, fused=False)



# ----------------------------------------------------------------------------------------------------------
# Qwen3-Next (Gated DeltaNet + gated attention, 512 routed experts in the real model)


def build_qwen3_next(out_dir: Path, seed: int = 0) -> Path:
    """Tiny Qwen3NextForCausalLM: linear-attention (Gated DeltaNet) layers with a full-attention layer every 4th,
    routed experts stored per expert (``mlp.experts.{e}.gate_proj.weight``, as Qwen/Qwen3-Next-80B-A3B) beside
    ``mlp.shared_expert`` and ``mlp.shared_expert_gate``; fused ``linear_attn.in_proj_qkvz`` / ``in_proj_ba``."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        max_position_embeddings=512, tie_word_embeddings=False,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    )
    return _save(_seeded_model(Qwen3NextForCausalLM, config, seed), out_dir, fused=False)
