"""Check a written MXFP4 checkpoint against the format, vLLM's loading rules and, optionally, its source.

Each check returns a `Check` (what it looked at, and every failure as one line naming the tensor
or file). The cheap checks read headers, config.json and the scale bytes only, so `quantize`
runs them before publishing; the source checks stream both checkpoints in row chunks.

The error bound (`--source`): a block's exponent is fixed by its rule, and nearest rounding
under a fixed exponent has one error whatever the tie-breaking, so a correct output has, block
for block, exactly the squared error of re-quantizing the source with the same rule. Any block
above it (float tolerance aside) has a wrong scale or wrong codes; a scale off by one exponent
makes a block's error several times larger, a nibble-order bug tens of times. The rule comes from
DST's qstream_report.json; without one, each block is held to the worst of all rules. The source is
re-quantized with the torch path (`mxfp4.quantize`), not the C/Triton kernels `quantize` writes with,
so a kernel bug cannot vouch for itself; on a GPU that costs about what quantizing did.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qstream.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint, SourceTensor, open_checkpoint, require_dir
from qstream.errors import QstreamError
from qstream.ignore import BF16, FP8, MXFP4, MXFP8, check_merges, scheme_format, targeting_problems
from qstream.mxfp4 import BLOCK, E8M0_BIAS, E_MAX, NonFiniteError, Rule, dequantize, quantize
from qstream.plan import QuantJob, quant_jobs, linear_modules
from qstream.safetensors_io import TensorInfo, read_rows
from qstream.selection import Role
from qstream.source_formats import PackedExperts, decode_checkpoint

PACKED, SCALE = ".weight_packed", ".weight_scale"
NAN_SCALE = 255  # E8M0 NaN: never a valid scale
CHUNK_ELEMENTS = 4 * 1024 * 1024  # source elements (or scale bytes) held at once
HASH_CHUNK = 16 * 1024 * 1024
ERROR_TOLERANCE = 1e-9  # relative slack on a block's squared error: float64 summation only
LISTED = 20  # failures printed per check; --json lists all
REPORT_NAME = "qstream_report.json"  # = pipeline.REPORT_NAME; not imported, as pipeline calls verify_written

# The compressed-tensors block vLLM reads (see Plan.quantization_config), written out here on purpose
# rather than imported from the planner: a checker sharing the producer's table cannot catch it.
EXPECTED_TOP = {"quant_method": "compressed-tensors", "quantization_status": "compressed"}
EXPECTED_GROUP = {"format": "mxfp4-pack-quantized", "input_activations": None, "output_activations": None}
# Top-level format: MXFP4 alone targets every Linear; beside kept FP8/MXFP8 groups, each group names its modules.
ALONE, MIXED = "mxfp4-pack-quantized", "mixed-precision"
KEPT_GROUP_FORMATS = {FP8: "float-quantized", MXFP8: "mxfp8-quantized"}
F8 = ("F8_E4M3",)
EXPECTED_WEIGHTS = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": BLOCK,
                    "symmetric": True, "dynamic": False, "scale_dtype": "torch.uint8"}
PER_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.(?:weight|weight_packed|weight_scale)$")


@dataclass
class Check:
    """One property of the checkpoint: what was looked at and every way it fails."""

    name: str
    detail: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class VerifyReport:
    dst: Path
    source: Path | None
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f for c in self.checks for f in c.failures]

    def summary(self) -> str:
        """A line per check, then the failures (at most LISTED per check)."""
        n = len(self.failures)
        lines = [f"verify {self.dst}" + (f" against {self.source}" if self.source else "")
                 + (": OK" if self.ok else f": FAILED ({n} failure{'s' * (n != 1)})")]
        lines += [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        for c in self.checks:
            lines += [f"  - {f}" for f in c.failures[:LISTED]]
            if len(c.failures) > LISTED:
                lines.append(f"  - ... and {len(c.failures) - LISTED} more {c.name} failures (see --json)")
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"dst": str(self.dst), "source": str(self.source) if self.source else None, "ok": self.ok,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "failures": c.failures}
                           for c in self.checks]}


def verify(dst: Path, source: Path | None = None, *, device: str = "cpu",
           unfinished_ok: bool = False, parse_with_compressed_tensors: bool = True) -> VerifyReport:
    """Run every check on dst (and against source if given); a bad dst gives failures, not exceptions
    (but a dst that is not a directory at all is a usage error).

    `device` ("cpu", "cuda", "auto") is where the source comparison re-quantizes: as costly as quantizing.
    `parse_with_compressed_tensors` also runs compressed-tensors' own config parser when it is installed
    (importing it costs ~180 MiB, which `quantize` does not spend on its own, fixed, config).
    """
    from qstream.pipeline import resolve_device  # pipeline imports this module

    dst = require_dir(Path(dst))
    src = open_checkpoint(Path(source)) if source is not None else None  # a bad SRC is a usage error
    dev = resolve_device(device)
    layout, out = _layout(dst, unfinished_ok)
    report = VerifyReport(dst, Path(source) if source is not None else None, [layout])
    if out is None:
        return report
    for name, fn in CHEAP_CHECKS:
        if fn is _quantization_config:
            fn = functools.partial(fn, external=parse_with_compressed_tensors)
        report.checks += _guarded(name, fn, out)
    if src is not None:
        report.checks += _guarded("source tensors", _against_source, src, out, _recorded_rule(dst), dev)
    return report


def _guarded(name: str, fn, *args) -> list[Check]:
    """Run one check; bytes it cannot read (a shard truncated under it) are its failure, not a crash."""
    try:
        result = fn(*args)
    except QstreamError as exc:
        return [Check(name, "could not be completed", [str(exc)])]
    return result if isinstance(result, list) else [result]


def verify_written(tmp_dir: Path) -> None:
    """The cheap checks on a just-written output (marker still present); raise if any fails.

    A failure here is a qstream bug, not bad input: the output is not published.
    """
    report = verify(tmp_dir, unfinished_ok=True, parse_with_compressed_tensors=False)
    if not report.ok:
        first, n = report.failures[0], len(report.failures)
        raise QstreamError(f"{tmp_dir}: the written output fails verification ({first}"
                           f"{f'; and {n - 1} more' if n > 1 else ''}); this is a qstream bug, please report it")


# ---------------------------------------------------------------------------------------------- cheap checks


def _layout(dst: Path, unfinished_ok: bool) -> tuple[Check, Checkpoint | None]:
    """Config, index and shard headers readable and consistent; no shard the index leaves out."""
    check = Check("layout", f"{CONFIG_NAME}, index and shard headers")
    try:
        ckpt = open_checkpoint(dst, unfinished_ok=unfinished_ok)
    except QstreamError as exc:
        check.failures.append(str(exc))
        return check, None
    if (dst / INDEX_NAME).exists():
        listed = set(ckpt.weight_files)
        check.failures += [f"{p}: a shard the index does not list; delete it or rewrite the index"
                           for p in sorted(dst.glob("*.safetensors")) if p not in listed]
    check.detail = f"{len(ckpt.weight_files)} shard(s), {len(ckpt.tensors)} tensors, index consistent"
    return check, ckpt


def _quantization_config(ckpt: Checkpoint, external: bool = True) -> Check:
    where = f"{CONFIG_NAME} quantization_config"
    check = Check("quantization_config", f"{where}: {ALONE} (4-bit float groups of {BLOCK}, uint8 E8M0 scales) "
                  "as compressed-tensors and vLLM read it")
    qc = ckpt.config.get("quantization_config")
    if not isinstance(qc, dict):
        check.failures.append(f"{CONFIG_NAME}: no quantization_config object; vLLM would load the model as BF16")
        return check
    bad = check.failures
    bad += _mismatches(where, qc, EXPECTED_TOP)
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        bad.append(f"{where}.config_groups: missing or empty")
        groups = {}
    bad += _mismatches(where, qc, {"format": ALONE if len(groups) == 1 else MIXED})
    formats = {g: scheme_format(v) if isinstance(v, dict) else "?" for g, v in groups.items()}
    if len(groups) > 1 and list(formats.values()).count(MXFP4) != 1:
        bad.append(f"{where}.config_groups: {list(formats.values()).count(MXFP4)} MXFP4 groups, expected exactly 1")
    for g, scheme in groups.items():
        scheme = scheme if isinstance(scheme, dict) else {}
        at = f"{where}.config_groups.{g}"
        weights = scheme.get("weights") if isinstance(scheme.get("weights"), dict) else {}
        if formats[g] == MXFP4 or len(groups) == 1:  # alone, it must be the MXFP4 group
            bad += _mismatches(at, scheme, EXPECTED_GROUP)
            bad += _mismatches(f"{at}.weights", weights, EXPECTED_WEIGHTS)
        elif formats[g] in KEPT_GROUP_FORMATS:
            bad += _mismatches(at, scheme, {"format": KEPT_GROUP_FORMATS[formats[g]]})
        else:
            bad.append(f"{at}: a {formats[g]} weight scheme, which qstream never writes")
        targets = scheme.get("targets")
        if len(groups) == 1:
            bad += _mismatches(at, scheme, {"targets": ["Linear"]})
        elif not (isinstance(targets, list) and targets and "Linear" not in targets):
            bad.append(f"{at}.targets: {targets!r}; beside other groups each group must name its modules")
        else:
            bad += _entry_problems(f"{at}.targets", targets)
    bad += _entry_problems(f"{where}.ignore", qc.get("ignore"))
    if external:
        bad += _compressed_tensors_problems(where, qc)
    return check


def _entry_problems(where: str, entries: object) -> list[str]:
    """A list of module names / `re:` patterns that compile."""
    if not (isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
        return [f"{where}: {entries!r} is not a list of module names / re: patterns"]
    bad = []
    for e in entries:
        if e.startswith("re:"):
            try:
                re.compile(e[3:])
            except re.error as exc:
                bad.append(f"{where}: {e!r} is not a valid regular expression ({exc})")
    return bad


def _mismatches(where: str, got: dict, expected: dict) -> list[str]:
    return [f"{where}.{k}: {got.get(k, '<missing>')!r}, expected {v!r}" for k, v in expected.items()
            if got.get(k, "<missing>") != v]


def _compressed_tensors_problems(where: str, qc: dict) -> list[str]:
    """compressed-tensors' own parser, when installed (a test and serving dependency, not a core one)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
        from pydantic import ValidationError
    except ImportError:
        return []
    try:
        QuantizationConfig.model_validate(qc)
    except ValidationError as exc:
        first = exc.errors()[0]
        return [f"{where}: compressed-tensors rejects it ({'.'.join(map(str, first['loc']))}: {first['msg']})"]
    return []


def _kept(t: dict[str, TensorInfo]) -> dict[str, str]:
    """Modules kept in the source's FP8 (scale beside the weight) -> FP8, or MXFP8 for uint8 scales per 32."""
    return {n.removesuffix(".weight"): MXFP8 if getattr(t.get(n.removesuffix("weight") + "weight_scale"), "dtype",
                                                        None) == "U8" else FP8
            for n, i in t.items() if n.endswith(".weight") and i.dtype in F8}


def _pairs(ckpt: Checkpoint) -> Check:
    """Every MXFP4 module has packed codes [out, in/2] and scales [out, in/32], both uint8, 2-D; every kept
    FP8 module has a scale that fits it."""
    t = {n: s.info for n, s in ckpt.tensors.items()}
    kept = _kept(t)
    modules = sorted({n.removesuffix(PACKED).removesuffix(SCALE) for n in t if n.endswith((PACKED, SCALE))} - set(kept))
    check = Check("packed/scale pairs", f"{len(modules)} MXFP4 modules" + (f", {len(kept)} kept FP8/MXFP8" if kept else ""))
    for m in modules:
        packed, scale = t.get(m + PACKED), t.get(m + SCALE)
        if packed is None or scale is None:
            have, lack = (PACKED, SCALE) if scale is None else (SCALE, PACKED)
            check.failures.append(f"{m}{have}: has no {m}{lack}; vLLM cannot load the module")
            continue
        for info in (packed, scale):
            if info.dtype != "U8" or len(info.shape) != 2:
                check.failures.append(f"{info.name}: {info.dtype}{list(info.shape)}, expected a 2-D U8 tensor")
        if len(packed.shape) == len(scale.shape) == 2:
            (rows, half), (s_rows, blocks) = packed.shape, scale.shape
            if rows != s_rows or half * 2 != blocks * BLOCK:
                check.failures.append(f"{m}: packed {list(packed.shape)} and scale {list(scale.shape)} disagree "
                                      f"(expected [out, in/2] and [out, in/{BLOCK}])")
        if m + ".weight" in t:
            check.failures.append(f"{m}.weight: present beside {m}{PACKED}; the module is stored twice")
    for m, fmt in kept.items():
        w, scale = t[m + ".weight"], t.get(m + SCALE)
        if scale is None:
            check.failures.append(f"{m}.weight: {w.dtype} with no {m}{SCALE}; vLLM would scale it by uninitialised memory")
        elif not _scale_fits(w.shape, scale.shape, fmt):
            check.failures.append(f"{m}{SCALE}: {list(scale.shape)} does not fit {fmt} weight {list(w.shape)}")
        if m + PACKED in t:
            check.failures.append(f"{m}{PACKED}: present beside an {w.dtype} {m}.weight; the module is stored twice")
    return check


def _scale_fits(weight: tuple[int, ...], scale: tuple[int, ...], fmt: str) -> bool:
    """MXFP8: [out, in/32]; FP8: one scale, one per row, or a 2-D grid of blocks no finer than the weight."""
    if len(weight) != 2:
        return False
    if fmt == MXFP8:
        return scale == (weight[0], weight[1] // BLOCK)
    n = 1
    for d in scale:
        n *= d
    return n == 1 or scale == (weight[0], 1) or (len(scale) == 2 and all(0 < s <= w for s, w in zip(scale, weight)))


def _row_chunks(info: TensorInfo, max_elements: int = CHUNK_ELEMENTS):
    """(r0, r1) row ranges of a tensor seen as [-1, last_dim], each at most max_elements."""
    rows = info.numel // max(1, info.shape[-1] if info.shape else 1)
    step = max(1, max_elements // max(1, info.shape[-1] if info.shape else 1))
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def _scales(ckpt: Checkpoint) -> Check:
    """No scale byte is 255 (NaN in E8M0); streamed, the scales are 1/16 of the packed bytes."""
    names = [n for n, s in ckpt.tensors.items() if n.endswith(SCALE) and s.info.dtype == "U8"]
    check = Check("scale bytes", f"{len(names)} scale tensors, no byte {NAN_SCALE}")
    for name in names:
        st = ckpt.tensors[name]
        count, first = 0, None
        for r0, r1 in _row_chunks(st.info):
            hits = (read_rows(st.file, st.info, r0, r1) == NAN_SCALE).nonzero()
            if len(hits) and first is None:
                first = (r0 + int(hits[0, 0]), int(hits[0, 1]))
            count += len(hits)
        if count:
            check.failures.append(f"{name}: {count} scale bytes are {NAN_SCALE} (NaN in E8M0), first at row "
                                  f"{first[0]}, block {first[1]}; the quantizer wrote an invalid exponent")
    return check


def _experts(ckpt: Checkpoint) -> list[Check]:
    """Per-expert tensors: every layer has experts 0..n-1, each with the same projections (no check for
    a dense model)."""
    layers: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for name in ckpt.tensors:
        if m := PER_EXPERT.match(name):
            layers[m["layer"]][int(m["e"])].add(m["proj"])
    if not layers:
        return []
    check = Check("experts", f"{len(layers)} layers of per-expert tensors, each complete")
    for layer, experts in layers.items():
        missing = sorted(set(range(max(experts) + 1)) - set(experts))
        if missing:
            check.failures.append(f"{layer}: experts {missing[:8]} missing of 0..{max(experts)}")
        projs = set().union(*experts.values())
        short = {e: sorted(projs - p) for e, p in experts.items() if p != projs}
        for e, lack in list(short.items())[:8]:
            check.failures.append(f"{layer}.{e}: lacks {lack} that other experts of the layer have")
    return [check]


def _ignore(ckpt: Checkpoint) -> Check:
    """vLLM's view: every module resolves, under merged and renamed names, to the format it is stored in."""
    t = {n: st.info for n, st in ckpt.tensors.items()}
    kept = _kept(t)
    weights = []
    for name, info in t.items():
        if name.endswith(PACKED):
            rows, half = (info.shape + (0, 0))[:2]
            weights.append((name.removesuffix(PACKED) + ".weight", (rows, 2 * half), MXFP4))
        elif not name.endswith(SCALE):
            weights.append((name, info.shape, kept.get(name.removesuffix(".weight"), BF16)))
    check = Check("ignore coverage")
    qc = ckpt.config.get("quantization_config")
    entries = qc.get("ignore") if isinstance(qc, dict) else None
    try:
        modules = linear_modules(weights)
        check_merges(modules)
    except QstreamError as exc:
        check.failures.append(str(exc))
        return check
    counts = {f: sum(m.fmt == f for m in modules) for f in dict.fromkeys(m.fmt for m in modules)}
    experts = " (a layer's experts count as one)" if any(m.role is Role.ROUTED_EXPERT for m in modules) else ""
    check.detail = ", ".join(f"{n} {f}" for f, n in counts.items()) + " Linear modules" + experts
    if isinstance(entries, list) and all(isinstance(e, str) for e in entries):
        for m in modules:  # one line per module, not one per name vLLM may look it up under
            problems = targeting_problems(qc, [m])
            if problems:
                more = f" (and {len(problems) - 1} more of its vLLM names)" if len(problems) > 1 else ""
                check.failures.append(problems[0] + more)
    else:
        check.failures.append(f"{CONFIG_NAME}: no usable quantization_config.ignore list")
    return check


# Run in this order on every output (after the layout check); each reads headers, config or scale bytes only.
CHEAP_CHECKS = (
    ("quantization_config", _quantization_config),
    ("packed/scale pairs", _pairs),
    ("scale bytes", _scales),
    ("experts", _experts),
    ("ignore coverage", _ignore),
)


# --------------------------------------------------------------------------------------------- source checks


def _recorded_rule(dst: Path) -> Rule | None:
    """The rule DST was written with, from its report; None if unknown."""
    try:
        return Rule(json.loads((dst / REPORT_NAME).read_text())["rule"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _against_source(src: Checkpoint, out: Checkpoint, rule: Rule | None, dev: torch.device) -> list[Check]:
    """Every source tensor copied (bytes, or a decoded one's values), kept in its source precision (bytes), or
    quantized; each quantized module within its error bound. The source is seen as the planner sees it:
    FP8/MXFP8 weights decoded, gpt-oss experts as their packed rows."""
    coverage = Check("source tensors")
    errors = Check("error bound")
    rules = (rule,) if rule else tuple(Rule)
    tally = Tally()
    produced: set[str] = set()
    counts = defaultdict(int)
    decoded = decode_checkpoint(src)
    for name, st in decoded.tensors.items():
        stored = getattr(st, "stored", ())
        if stored and all(s.name in out.tensors for s in stored) and out.tensors[name].info.dtype in F8:
            produced.update(s.name for s in stored)
            counts["kept in source precision"] += 1
            for s in stored:
                coverage.failures += _copy_problems(s, out.tensors[s.name])
            continue
        if name in out.tensors:
            produced.add(name)
            counts["copied"] += 1
            coverage.failures += _copy_problems(st, out.tensors[name])
            continue
        try:
            jobs = quant_jobs(decoded, st)
        except QstreamError:
            jobs = []
        present = [j for j in jobs if j.module + PACKED in out.tensors and j.module + SCALE in out.tensors]
        if not jobs or len(present) < len(jobs):
            lack = next((f" nor {j.module}{PACKED}" for j in jobs if j not in present), "")
            coverage.failures.append(f"{name}: neither copied nor quantized (the output has no {name}{lack})")
            continue
        counts["quantized"] += 1
        for job in jobs:
            produced.update((job.module + PACKED, job.module + SCALE))
            problem = _lossless_error(job, out) if isinstance(st, PackedExperts) else _job_error(job, out, rules, dev, tally)
            if problem:
                errors.failures.append(problem)
    coverage.failures += [f"{n}: in the output but made from no source tensor" for n in out.tensors if n not in produced]
    config = {k: v for k, v in out.config.items() if k != "quantization_config"}
    if config != decoded.config:
        keys = sorted(k for k in config.keys() | decoded.config.keys() if config.get(k) != decoded.config.get(k))
        coverage.failures.append(f"{out.root / CONFIG_NAME}: differs from the source's beyond quantization_config "
                                 f"(keys {keys[:5]})")
    coverage.detail = f"{len(decoded.tensors)} source tensors: " + ", ".join(f"{n} {k}" for k, n in counts.items())
    errors.detail = tally.detail(rules)
    return [coverage, errors]


def _sha256(st: SourceTensor) -> str:
    h = hashlib.sha256()
    with open(st.file, "rb", buffering=0) as f:
        f.seek(st.info.start)
        left = st.info.nbytes
        while left:
            chunk = f.read(min(HASH_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _copy_problems(src, out: SourceTensor) -> list[str]:
    """A copied tensor: same dtype and shape, and the same bytes (sha256), or for one computed from
    the source (decoded FP8, a gpt-oss bias slice) the same values."""
    a, b = src.info, out.info
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return [f"{a.name}: {b.dtype}{list(b.shape)} in the output, {a.dtype}{list(a.shape)} in the source"]
    if src.copyable:
        return [] if _sha256(src) == _sha256(out) else [f"{a.name}: copied bytes differ from the source (sha256)"]
    for r0, r1 in _row_chunks(a):
        if not torch.equal(src.read_rows(r0, r1).reshape(-1), out.read_rows(r0, r1).reshape(-1)):
            return [f"{a.name}: values differ from the source's decoded values from row {r0}"]
    return []


def _lossless_error(job: QuantJob, out: Checkpoint) -> str | None:
    """A module already MXFP4 in the source: its packed codes and scales are copied exactly."""
    packed, scales = job.source.read_packed(job.row_start, job.row_end, job.row_step)
    got = out.tensors[job.module + PACKED], out.tensors[job.module + SCALE]
    same = all(g.info.shape == tuple(w.shape) and torch.equal(g.read_rows(0, g.info.shape[0]), w)
               for g, w in zip(got, (packed, scales)))
    return None if same else f"{job.module}: differs from the source's MXFP4 bytes (a lossless copy was expected)"


def _job_error(job: QuantJob, out: Checkpoint, rules: tuple[Rule, ...], dev: torch.device, tally: Tally) -> str | None:
    """Stream one module's source rows and output bytes through `compare_chunk`; a line if it fails."""
    src = job.source
    packed, scale = out.tensors[job.module + PACKED], out.tensors[job.module + SCALE]
    rows, n = job.row_end - job.row_start, job.in_features
    if packed.info.shape != (rows, n // 2) or scale.info.shape != (rows, n // BLOCK):
        return (f"{job.module}: packed {list(packed.info.shape)} / scale {list(scale.info.shape)} do not fit "
                f"source rows {job.row_start}..{job.row_end} of {src.name} ({rows} x {n})")
    over = blocks = 0
    worst, identical = 1.0, True
    step = max(1, CHUNK_ELEMENTS // n)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        w = src.read_rows(job.row_start + r0, job.row_start + r1).to(dev)
        try:
            c = compare_chunk(w, read_rows(packed.file, packed.info, r0, r1).to(dev),
                              read_rows(scale.file, scale.info, r0, r1).to(dev), rules)
        except NonFiniteError as exc:
            return f"{src.name}: {exc} in rows {job.row_start + r0}..{job.row_start + r1}"
        over, blocks, worst = over + c.over, blocks + c.blocks, max(worst, c.worst)
        identical &= c.identical
        tally.sq_error += c.sq_error
        tally.sq_norm += c.sq_norm
    tally.modules += 1
    tally.identical += identical
    tally.blocks += blocks
    if over:
        return (f"{job.module}: {over} of {blocks} blocks have more error than rule "
                f"{'/'.join(r.value for r in rules)} gives on the source (worst {worst:.3g}x); "
                "its scales or codes are wrong")
    return None


@dataclass
class Tally:
    """Totals over every quantized module, for the error check's one-line detail."""

    modules: int = 0
    identical: int = 0  # modules byte-identical to re-quantizing the source with a rule
    blocks: int = 0
    sq_error: float = 0.0
    sq_norm: float = 0.0

    def detail(self, rules: tuple[Rule, ...]) -> str:
        names = "/".join(r.value for r in rules)
        rel = self.sq_error / self.sq_norm if self.sq_norm else 0.0
        return (f"{self.modules} modules, {self.blocks} blocks, rel. error {rel:.3e}; "
                f"{self.identical} modules byte-identical to rule {names} re-run on the source")


# ------------------------------------------------------------------------------------- numerics (pure, no I/O)


def block_errors(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Squared error of each 32-block of w [rows, in] as decoded from packed/scales, in float64.

    Scale bytes above E_MAX (255 is NaN) decode as infinite error rather than a number.
    """
    deq = dequantize(packed, scales.clamp(max=E_MAX + E8M0_BIAS), torch.float64)
    err = (deq - w.double()).pow(2).reshape(*w.shape[:-1], -1, BLOCK).sum(-1)
    return torch.where(scales > E_MAX + E8M0_BIAS, torch.inf, err)


@dataclass(frozen=True)
class ChunkComparison:
    sq_error: float  # of the output's blocks
    sq_norm: float
    blocks: int
    over: int  # blocks whose error exceeds the bound
    worst: float  # largest output / bound error ratio among them (1.0 if none)
    identical: bool  # bytes equal to one rule's quantization


def compare_chunk(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                  rules: tuple[Rule, ...]) -> ChunkComparison:
    """Hold output bytes for w to the error its rule gives, block by block (several rules: the worst of them).

    Bytes equal to a rule's own quantization meet the bound by definition, which skips the float64 pass.
    """
    qs = [quantize(w, r) for r in rules]
    blocks = scales.numel()
    for q in qs:
        if torch.equal(q.packed, packed) and torch.equal(q.scales, scales):
            return ChunkComparison(q.sq_error, q.sq_norm, blocks, 0, 1.0, True)
    got = block_errors(w, packed, scales)
    bound = torch.stack([block_errors(w, q.packed, q.scales) for q in qs]).amax(0)
    over = got > bound * (1 + ERROR_TOLERANCE)
    worst = float((got[over] / bound[over]).max()) if over.any() else 1.0
    return ChunkComparison(float(got.sum()), qs[0].sq_norm, blocks, int(over.sum()), worst, False)
