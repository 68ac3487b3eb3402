"""`qstream quantize --ray` on a real local Ray cluster (2 CPUs, started once for the module): the same bytes
as one process for RTN, imatrix and GPTQ (each layer's expert groups as tasks), a worker SIGKILLed in the middle
of its shard (Ray retries the task), and a SIGKILLed driver finished with --resume."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from qstream.calib import group_tasks, sequential
from qstream.cli import cli
from qstream.cluster import LOCAL_ONLY_ENV, Cluster, connected
from qstream.common import REPORT_NAME
from qstream.convert.pipeline import run
from qstream.convert.scale_out import RayShards, write_shard_task
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.io.safetensors_io import ShardWriter
from qstream.io.shards import PARTIAL
from qstream.io.staging import temp_dir_for
from qstream.planning.plan import Plan, QuantJob, make_plan, parse_size
from qstream.planning.selection import Selection
from tests.calib_stats import collect_stats
from tests.fixtures import assert_same_files
from tests.test_bad_input import assert_refused, nan_in_selected, tree_hashes
from tests.test_sequential import SMALL, _source

os.environ.setdefault(LOCAL_ONLY_ENV, "0")  # the test's cluster listens on loopback only (read at Ray's import)
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent
SHARDS = ["--max-shard-size", "48KiB", "--no-progress"]  # the fixtures in 9 to 13 shards: several tasks each
TIMES = ("seconds", "stages", "peak_rss_bytes")


@pytest.fixture(scope="module")
def address() -> str:
    """A 2-CPU Ray instance for this module; its workers import this module (the killing task) from ROOT."""
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                   runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def quantize(src: Path, dst: Path, *args: object) -> Result:
    return CliRunner().invoke(cli, ["quantize", str(src), str(dst), *SHARDS, *map(str, args)])


def reference(src: Path, dst: Path, *args: object) -> dict:
    """One process, as without Ray; returns its report."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    res = quantize(src, dst, *args)
    assert res.exit_code == 0, res.output
    return json.loads((dst / REPORT_NAME).read_text())


def same_report(a: dict, b: dict) -> None:
    """Reports agree but for times, memory and the scale-out section; statistics to float rounding: a Ray worker
    runs torch with other thread counts, and a float64 sum over several threads rounds in another order (the
    report is a record; the shards, config and card are what must be the same bytes)."""
    a, b = dict(a), dict(b)
    assert b.pop("scale_out")["engine"] == "ray" and "scale_out" not in a
    for r in (a, b):
        r["totals"] = {k: v for k, v in r["totals"].items() if k not in TIMES}
    assert _close(a, b), "reports differ beyond float rounding"


def _close(a: object, b: object) -> bool:
    """a == b, but floats within 1e-12 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b))
    return a == b


@pytest.fixture(scope="module")
def rtn_ref(tiny_qwen35: Path, tmp_path_factory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("ref") / "q"  # the card is titled with the directory's name: "q" everywhere
    return dst, reference(tiny_qwen35, dst)


def test_rtn_same_bytes(tiny_qwen35: Path, rtn_ref: tuple[Path, dict], address: str, tmp_path: Path) -> None:
    """Shards, config, index and card: byte for byte; the shards were Ray tasks, several at once."""
    ref, ref_report = rtn_ref
    res = quantize(tiny_qwen35, tmp_path / "q", "--ray", address)
    assert res.exit_code == 0, res.output
    names = assert_same_files(tmp_path / "q", ref, skip=(REPORT_NAME,))
    assert {"README.md", "config.json", "model.safetensors.index.json"} <= set(names)
    report = json.loads((tmp_path / "q" / REPORT_NAME).read_text())
    out = report["scale_out"]
    assert out["shard_tasks"] == report["totals"]["shards"] > 8 and out["cpus"] == 2 and out["device"] == "cpu"
    same_report(ref_report, report)


def test_imatrix_same_bytes(tiny_qwen3_moe_fused: Path, address: str, tmp_path: Path) -> None:
    """--method imatrix: the channel weights travel to the tasks with the plan; the same bytes and report."""
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(tiny_qwen3_moe_fused, windows, tmp_path / "stats", all_experts=False)
    args = ("--method", "imatrix", "--calib", stats)
    ref_report = reference(tiny_qwen3_moe_fused, tmp_path / "ref" / "q", *args)
    assert ref_report["imatrix"]["modules_calibrated"] > 0
    (tmp_path / "ray").mkdir()
    res = quantize(tiny_qwen3_moe_fused, tmp_path / "ray" / "q", *args, "--ray", address)
    assert res.exit_code == 0, res.output
    assert_same_files(tmp_path / "ray" / "q", tmp_path / "ref" / "q", skip=(REPORT_NAME,))
    same_report(ref_report, json.loads((tmp_path / "ray" / "q" / REPORT_NAME).read_text()))


def test_bad_source_in_a_task(tiny_qwen35: Path, address: str, tmp_path: Path) -> None:
    """A NaN found by a task: the task's own one-line error, exit 2, nothing that looks finished."""
    src = Path(shutil.copytree(tiny_qwen35, tmp_path / "src"))
    name = nan_in_selected(src)
    before, dst = tree_hashes(src), tmp_path / "q"
    msg = assert_refused(quantize(src, dst, "--ray", address), name, src, before, dst)
    assert "fix the source weights" in msg and not temp_dir_for(dst).exists()


def victim(plan: Plan) -> int:
    """The first shard that quantizes two modules (four writes at least)."""
    return next(i for i, s in enumerate(plan.shards) if sum(isinstance(j, QuantJob) for j in s.jobs) >= 2)


def killing_task(plan: Plan, imatrix, tmp: Path, device: str, cwd: str, index: int) -> dict:
    """write_shard_task, but the first attempt at the victim shard SIGKILLs its own worker at its third write;
    the retry notes which partial files of its shard it found (the dead attempt's)."""
    died = tmp.parent / "died"
    if index != victim(plan):
        return write_shard_task(plan, imatrix, tmp, device, cwd, index)
    if died.exists():
        mine = tmp.glob(f"{plan.shards[index].file_name}*{PARTIAL}")  # other shards' tasks may be writing theirs
        (tmp.parent / "retry-found").write_text(json.dumps(sorted(p.name for p in mine)))
        return write_shard_task(plan, imatrix, tmp, device, cwd, index)
    writes, real = itertools.count(), ShardWriter.write

    def write(self, *args, **kwargs):
        if next(writes) == 2:
            died.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    ShardWriter.write = write  # type: ignore[method-assign]
    try:
        return write_shard_task(plan, imatrix, tmp, device, cwd, index)
    finally:
        ShardWriter.write = real  # type: ignore[method-assign]


def test_killed_worker_is_retried(tiny_qwen35: Path, rtn_ref: tuple[Path, dict], address: str,
                                  tmp_path: Path) -> None:
    """A worker dies half-way through its shard: Ray runs the task again, which writes its own partial file
    beside the dead one's; the output is the same bytes and no partial file is left."""
    ref, _ = rtn_ref
    plan = make_plan(open_checkpoint(tiny_qwen35), Selection(), Rule.MSE3, parse_size(SHARDS[1]))  # as the CLI
    dst = tmp_path / "out" / "q"
    dst.parent.mkdir()
    cluster = Cluster(address)
    with connected(cluster) as resources:
        report = run(plan, dst, progress=False, shards=RayShards(cluster, resources, task=killing_task))
    assert (dst.parent / "died").exists()
    found = json.loads((dst.parent / "retry-found").read_text())
    assert len(found) == 1, found
    assert report["scale_out"]["shard_tasks"] == len(plan.shards)
    assert_same_files(dst, ref, skip=(REPORT_NAME, "README.md"))  # run() alone writes no card


# A driver that SIGKILLs itself once KILL_AFTER shards have come back from their tasks.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import qstream.convert.scale_out as scale_out
    real = scale_out.run_tasks
    def run_tasks(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)
            yield item
    scale_out.run_tasks = run_tasks
    from qstream.cli import main
    sys.argv = ["qstream"] + sys.argv[1:]
    main()
    """
)


def test_killed_driver_resumes(tiny_qwen35: Path, rtn_ref: tuple[Path, dict], address: str, tmp_path: Path) -> None:
    """The driver dies with shards done and others in flight; `--resume --ray` redoes only the rest."""
    ref, _ = rtn_ref
    dst = tmp_path / "q"
    args = ["quantize", str(tiny_qwen35), str(dst), *SHARDS, "--ray", address]
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], env={**os.environ, "KILL_AFTER": "3"},
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    tmp = temp_dir_for(dst)
    assert not dst.exists() and len(list(tmp.glob("*.safetensors"))) >= 3
    res = quantize(tiny_qwen35, dst, "--ray", address, "--resume")
    assert res.exit_code == 0, res.output
    assert_same_files(dst, ref, skip=(REPORT_NAME,))
    report = json.loads((dst / REPORT_NAME).read_text())
    assert report["scale_out"]["shard_tasks"] <= report["totals"]["shards"] - 3
    assert not tmp.exists()


def killing_group_task(*args: object) -> dict:
    """group_task, but the first attempt at layer 1's group of expert 3 SIGKILLs its own worker between gathering
    the group's Hessians and solving them."""
    index, hidden, group = args[5], Path(args[6]), args[-1]  # type: ignore[arg-type]
    died = hidden.parent.parent / "died"
    if index == 1 and group[0] == 3 and not died.exists():  # type: ignore[index]
        def die(*_: object) -> None:
            died.touch()
            os.kill(os.getpid(), signal.SIGKILL)

        group_tasks.solve_group = die  # type: ignore[assignment]  # this worker process only: it dies
    return group_tasks.group_task(*args)


@pytest.mark.parametrize("fixture,layers", [("tiny_qwen35", 4), pytest.param("tiny_mixtral", 2, marks=pytest.mark.slow)])
def test_gptq_same_bytes(fixture: str, layers: int, address: str, tmp_path: Path, request: pytest.FixtureRequest,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--method gptq: each layer's expert groups gathered and solved as Ray tasks (fused experts; per-expert
    tensors, slow), with routed and starved experts, a window a batch (their sums in batch order), and a worker
    killed in the middle of a group (Ray runs the task again); each layer's groups go out twice (gate/up, then down
    fitted on the quantized gate/up); the same bytes as in one process, report aside."""
    src, prose = _source(request.getfixturevalue(fixture), tmp_path)
    widths = 64 * 64 + 32 * 32  # the fixtures' expert inputs: gate/up 64 wide, down 32
    sums = 2  # the Hessians and their cross terms: the source objective, whose tasks also read the reference stream
    monkeypatch.setattr(sequential, "HESSIAN_BUDGET", 3 * widths * (8 + 4 * torch.get_num_threads()) * sums)  # 3 a group
    monkeypatch.setattr(sequential, "GptqSettings", functools.partial(sequential.GptqSettings, batch_tokens=48))
    args = ("--preset", "experts", "--method", "gptq", "--gptq-objective", "source", "--calib-text", prose, "--device",
            "cpu", *SMALL)
    ref_report = reference(src, tmp_path / "ref" / "q", *args)
    cases = ref_report["gptq"]["cases"]
    assert cases["gptq"] > 0 and cases["gptq-all-tokens"] > 0 and cases["mse3"] == 0, cases
    (tmp_path / "ray").mkdir()
    monkeypatch.setattr(group_tasks, "group_task", killing_group_task)
    res = quantize(src, tmp_path / "ray" / "q", *args, "--ray", address)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ray" / "died").exists()
    assert_same_files(tmp_path / "ray" / "q", tmp_path / "ref" / "q", skip=(REPORT_NAME,))
    report = json.loads((tmp_path / "ray" / "q" / REPORT_NAME).read_text())
    groups = len(sequential.expert_groups(8 if layers == 4 else 4, [64, 32], sequential.HESSIAN_BUDGET,
                                          torch.get_num_threads(), sums))
    tasks = layers * groups * 2  # gate/up, then the fitted down projections on the quantized gate/up
    assert groups > 1 and report["gptq"]["solve_report"]["scale_out"]["group_tasks"] == tasks
    assert "scale_out" not in ref_report["gptq"]["solve_report"]
