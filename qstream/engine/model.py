"""A checkpoint's own transformers model, built on the meta device and materialized one part at a time.

The causal LM's class is picked from config.json as AutoModelForCausalLM picks it (the text model alone for
a multimodal checkpoint: no vision tower, no MTP layers) and built on the meta device, as `from_pretrained`
builds it. Its parameters fall into parts: the input embeddings, each decoder layer, the head (final norm and
lm_head) and whatever else the text model owns (resident, loaded once). A part is materialized from the
checkpoint through qstream's readers (`qstream.engine.weights.lazy_state_dict`: BF16 as stored, FP8/MXFP8 and MXFP4
decoded) and transformers' own key mapping and weight converters (fused or per-expert experts, prefixes), then
sent back to the meta device when done.

Every pass runs the model's own forward: the text model is called on hidden states (`inputs_embeds`) with
every decoder layer but the live one dormant (it returns its input), so the model itself builds the causal
masks, the rotary embeddings and each layer's arguments (sliding windows, linear-attention layers, ...) and
the live layer runs its real code, router included. The head is the causal LM's own forward with every layer
dormant, so anything it does after the last layer (norm, lm_head, soft-capping) is the model's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qstream.engine.weights import causal_lm_class, lazy_state_dict, read_stored
from qstream.errors import QstreamError
from qstream.io.checkpoint import Checkpoint, open_checkpoint
from qstream.io.device_reader import READ_CHUNK, DeviceReader
from qstream.io.read_ahead import read_span

EMBED, HEAD, RESIDENT = "embed", "head", "resident"
Part = int | str  # a decoder layer's index, or EMBED / HEAD / RESIDENT


class _Given:
    """A value handed to transformers' loader where it expects a safetensors slice (`x[...]`)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __getitem__(self, index: object) -> torch.Tensor:
        return self.value[index]  # type: ignore[index]


def _dormant(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """Stands in for a module's forward while it is not the live one: its input passes unchanged."""
    return hidden_states


@dataclass
class _Part:
    """One part's modules, the model parameters they hold, and the checkpoint tensors that fill them."""

    modules: list[nn.Module]
    targets: set[str] = field(default_factory=set)  # model parameter/buffer names
    sources: list[str] = field(default_factory=list)  # checkpoint tensor names (as qstream reads them)
    ranges: list[tuple[Path, int, int]] = field(default_factory=list)  # their bytes on disk


class StreamedModel:
    """A causal LM from `path` on the meta device; parts are loaded, used and freed one at a time.

    Use as a context manager: entering loads the resident part, leaving frees every part.
    """

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.ckpt: Checkpoint = open_checkpoint(Path(path))
        self.dtype, self.device = dtype, torch.device(device)
        self.model: Any = self._build()  # a transformers PreTrainedModel
        self.text: Any = getattr(self.model, self.model.base_model_prefix)
        layers = getattr(self.text, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise QstreamError(f"{self.ckpt.root}: {type(self.text).__name__} keeps no decoder layers in "
                               "`.layers`; the streaming engine cannot run this architecture")
        self.layers: nn.ModuleList = layers
        self._parts = self._split()
        self._sources_of: dict[str, list[str]] = {}
        self._map_sources()
        self._materialized: set[Part] = set()
        for layer in self.layers:
            layer.forward = _dormant
        self.text.norm.forward = _dormant

    # ---- construction -------------------------------------------------------------------------------

    def _build(self) -> Any:
        from transformers.utils.generic import ContextManagers

        model_cls, config = causal_lm_class(self.ckpt)
        with ContextManagers(model_cls.get_init_context(self.dtype, False, False, None)):
            model = model_cls(config)
        return model.eval()

    def _split(self) -> dict[Part, _Part]:
        """The model's modules by part; `text.norm` and the output embeddings make the head."""
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if head is None or not hasattr(self.text, "norm"):
            raise QstreamError(f"{self.ckpt.root}: {type(self.model).__name__} has no final norm and lm_head "
                               "where the streaming engine expects them")
        parts: dict[Part, _Part] = {EMBED: _Part([embed])}
        parts.update({i: _Part([layer]) for i, layer in enumerate(self.layers)})
        parts[HEAD] = _Part([self.text.norm, head])
        owner = {id(m): key for key, p in parts.items() for top in p.modules for m in top.modules()}
        parts[RESIDENT] = _Part([m for m in self.model.modules() if id(m) not in owner and _holds_tensors(m)])
        owner.update({id(m): RESIDENT for m in parts[RESIDENT].modules})
        for name, _ in self._state_items():
            module = self.model.get_submodule(name.rpartition(".")[0])
            parts[owner[id(module)]].targets.add(name)
        return parts

    def _state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters and persistent buffers: what a checkpoint must provide."""
        yield from self.model.state_dict(keep_vars=True).items()

    def _map_sources(self) -> None:
        """Each checkpoint tensor to the model parameter transformers' key mapping loads it into."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        cuda = self.device.type == "cuda"
        self._lazy: dict[str, object] = lazy_state_dict(self.ckpt, DeviceReader(self.device) if cuda else read_stored)
        mapping = get_model_conversion_mapping(self.model, None, None)
        self._mapping: Any = mapping
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta = dict(self._state_items())
        prefix = self.model.base_model_prefix
        part_of = {t: key for key, p in self._parts.items() for t in p.targets}
        for name in self._lazy:
            target, _ = rename_source_key(name, renamings, converters, prefix, meta)
            if target not in meta and name in meta:  # as transformers' loader retries a key unrenamed
                target, _ = rename_source_key(name, [], [], prefix, meta)
            if target not in meta:
                continue  # vision tower, MTP layers, ...: not part of the causal LM
            self._sources_of.setdefault(target, []).append(name)
            self._parts[part_of[target]].sources.append(name)
        tied = self.model.all_tied_weights_keys
        head = self._parts[HEAD]
        if any(t in head.targets and t not in self._sources_of for t in tied):  # lm_head is the embedding
            embed = self._parts[EMBED]
            head.modules.append(embed.modules[0])
            head.targets |= embed.targets
            head.sources += embed.sources
        for key, part in self._parts.items():
            missing = sorted(t for t in part.targets if t not in self._sources_of and t not in tied)
            if missing:
                where = f"decoder layer {key}" if isinstance(key, int) else key
                raise QstreamError(f"{self.ckpt.root}: no tensor for {missing[0]} ({where}) in the checkpoint; it is "
                                   f"incomplete, or not the {self.model.config.model_type} its config.json names")
        self._byte_ranges()

    def _byte_ranges(self) -> None:
        """Where each part's stored tensors lie (an FP8 weight with its scales, an MXFP4 pair, ...), to read
        them ahead."""
        parts_of: dict[str, list[_Part]] = {}
        for p in self._parts.values():
            for name in p.sources:
                parts_of.setdefault(name, []).append(p)
        for raw, t in self.ckpt.tensors.items():
            base = raw.rpartition(".")[0]
            keys = (raw, base + ".weight", raw.rpartition("_")[0])  # as stored, <m>.weight_*, gpt-oss <x>_blocks
            for part in next((parts_of[k] for k in keys if k in parts_of), []):
                part.ranges.append((t.file, t.info.start, t.info.end))
        for p in self._parts.values():
            p.ranges.sort()

    # ---- facts --------------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    @property
    def output_vocab(self) -> int:
        return self.model.get_output_embeddings().out_features

    def sources_of(self, target: str) -> list[str]:
        """Checkpoint tensor names (as the plan names them) that fill model parameter `target`."""
        return self._sources_of.get(target, [])

    def part_sources(self, part: Part) -> list[str]:
        """Checkpoint tensor names (as the plan names them) that fill `part`."""
        return list(self._parts[part].sources)

    def part_bytes(self, part: Part) -> int:
        return sum(e - b for _, b, e in self._parts[part].ranges)

    def layer_path(self, index: int) -> str:
        """The module path of decoder layer `index` in the model, e.g. model.layers.3."""
        layer = self.layers[index]
        return next(n for n, m in self.model.named_modules() if m is layer)

    # ---- loading and freeing ------------------------------------------------------------------------

    def load(self, part: Part, replace: dict[str, torch.Tensor] | None = None, only: bool = False) -> None:
        """Materialize `part` on the device from the checkpoint (thread-safe against passes on other parts).

        `replace`: checkpoint tensors (by the names `sources_of` gives) to load from these values instead, in
        the stored shape, through the same key mapping and converters (sequential GPTQ swaps in a layer's
        quantized weights so). `only`: the part is loaded already; load just the `replace` tensors into it (every
        source of a parameter they fill must be among them). The parameters they fill get new tensors: references
        to the old ones keep the old values."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        p = self._parts[part]
        config = LoadStateDictConfig(device_map={"": str(self.device)}, dtype=self.dtype,
                                     dtype_plan=self.model._get_dtype_plan(self.dtype), weight_mapping=self._mapping)
        replace = replace or {}
        unknown = sorted(set(replace) - set(p.sources))
        if unknown:
            raise ValueError(f"{unknown[0]} does not fill part {part!r}")
        if only and (part not in self._materialized or not replace):
            raise ValueError(f"part {part!r} is not loaded, or nothing is given to load into it")
        state = {n: _Given(replace[n]) if n in replace else self._lazy[n] for n in p.sources
                 if not only or n in replace}
        info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        problems = [f"{n} has shape {list(got)}, the model wants {list(want)}"
                    for n, got, want in sorted(info.mismatched_keys) if n in p.targets]
        problems += [f"{n}: {e}" for n, e in sorted(info.conversion_errors.items())]
        problems += [f"{t} was not loaded" for t in sorted(p.targets & info.missing_keys)
                     if t not in self.model.all_tied_weights_keys and not only]
        if problems:
            raise QstreamError(f"{self.ckpt.root}: {problems[0]}; the checkpoint does not fit the model its "
                               "config.json describes (incomplete or mixed up?)")
        for target, source in self.model.all_tied_weights_keys.items():
            if target in p.targets and target not in self._sources_of:  # tied: share the source's weight
                self._tie(target, source)
        for module in p.modules:
            self._init_buffers(module)
        self._materialized.add(part)

    def _tie(self, target: str, source: str) -> None:
        src = self.model.get_parameter(source)
        if src.is_meta:
            raise QstreamError(f"{self.ckpt.root}: {target} is tied to {source}, which is not loaded")
        module, _, name = target.rpartition(".")
        setattr(self.model.get_submodule(module), name, src)

    def _init_buffers(self, root: nn.Module) -> None:
        """Non-persistent buffers (rotary frequencies, ...) are computed, never loaded: the model's own
        initializer fills them, as after `from_pretrained`."""
        for module in root.modules():
            meta = {n: b for n, b in module._buffers.items() if b is not None and b.is_meta}
            if not meta:
                continue
            if next(module.parameters(recurse=False), None) is not None:
                raise QstreamError(f"{type(module).__name__}: computed buffers {list(meta)} beside parameters; the "
                                   "streaming engine cannot initialize them without re-initializing the weights")
            for n, b in meta.items():
                module._buffers[n] = torch.empty_like(b, device=self.device)
            self.model._init_weights(module)

    @contextlib.contextmanager
    def loaded(self, part: Part) -> Iterator[None]:
        """`part` materialized for the duration."""
        self.load(part)
        try:
            yield
        finally:
            self.free(part)

    def free(self, part: Part) -> None:
        """Send `part` back to the meta device, releasing its memory."""
        for module in self._parts[part].modules:
            module.to("meta")
        self._materialized.discard(part)

    def warm(self, part: Part) -> int:
        """Read `part`'s stored bytes once so that loading it finds them in the page cache; returns bytes."""
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        total = 0
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for path, b, e in self._parts[part].ranges:
            by_file.setdefault(path, []).append((b, e))
        for path, spans in by_file.items():
            fd = os.open(path, os.O_RDONLY)
            try:
                total += sum(read_span(fd, b, e, view) for b, e in spans)
            finally:
                os.close(fd)
        return total

    # ---- passes -------------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids [b, L] (the embed part must be loaded)."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    @contextlib.contextmanager
    def live(self, *modules: nn.Module) -> Iterator[None]:
        """Let `modules` run their own forward for the duration (every other layer stays dormant)."""
        for m in modules:
            del m.forward
        try:
            yield
        finally:
            for m in modules:
                m.forward = _dormant

    def layer_pass(self, hidden: torch.Tensor) -> torch.Tensor:
        """The live decoder layer (see `live`) on hidden states [b, L, H], through the text model's own forward;
        safe to call from several threads at once."""
        return self.text(inputs_embeds=hidden, use_cache=False).last_hidden_state

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The text model's output (its final norm applied) from the last layer's hidden states [b, L, H]."""
        with self.live(self.text.norm):
            return self.text(inputs_embeds=hidden, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] of the last layer's hidden states [R, H], rows independent (the head must be loaded)."""
        with self.live(self.text.norm):
            return self.model(inputs_embeds=hidden[None], use_cache=False).logits[0]

    # ---- lifetime -----------------------------------------------------------------------------------

    def __enter__(self) -> StreamedModel:
        self.load(RESIDENT)
        return self

    def __exit__(self, *exc: object) -> None:
        for part in list(self._materialized):
            self.free(part)


def _holds_tensors(m: nn.Module) -> bool:
    return next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None
