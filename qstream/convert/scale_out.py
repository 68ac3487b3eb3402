"""A run's shards as Ray tasks (`qstream quantize --ray`): each task reads its rows of the shared source and
writes its one shard, with its statistics, into the shared staging directory.

The driver (convert.pipeline.run) keeps the plan, resume, the report and publishing; this module only
changes where `_write_shard` runs. A shard's bytes do not depend on where or how often it was written, so
the output is byte-identical to a run in one process. A task retried after its worker died writes under a
partial name of its own, so it never shares a file with the attempt that died (or that only seems dead).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from qstream.cluster import Cluster, run_tasks
from qstream.common import resolve_device
from qstream.convert.pipeline import Calibrated, _write_shard
from qstream.io.shards import PARTIAL
from qstream.planning.plan import Plan


def write_shard_task(plan: Plan, calibrated: Calibrated | None, tmp: Path, device: str, cwd: str,
                     index: int) -> dict:
    """One Ray task: plan.shards[index] written into tmp as one process would write it; returns its saved
    statistics. Relative paths of the plan mean what they meant to the driver (`cwd`)."""
    os.chdir(cwd)
    attempt = f".{uuid.uuid4().hex[:12]}{PARTIAL}"
    return _write_shard(plan.shards[index], tmp, plan, resolve_device(device), lambda _: None, calibrated, attempt)


class RayShards:
    """convert.pipeline.ShardRunner on a Ray cluster (`qstream.cluster.connected` must be entered already):
    one task per shard, 1 CPU each, or 1 GPU each when the device is cuda (auto: cuda if the cluster has GPUs).
    `task` is write_shard_task or a function that calls it with the same arguments."""

    def __init__(self, cluster: Cluster, resources: dict, device: str = "auto",
                 task: Callable[..., dict] = write_shard_task) -> None:
        self.cluster, self.resources, self.task = cluster, resources, task
        self.device = ("cuda" if resources["gpus"] else "cpu") if device == "auto" else device
        self.tasks = 0

    def __call__(self, plan: Plan, todo: Sequence[int], tmp: Path, calibrated: Calibrated | None,
                 advance: Callable[[int], None]) -> Iterator[tuple[int, dict]]:
        shared = (plan, calibrated, tmp.resolve(), self.device, os.getcwd())
        gpus = 1 if self.device == "cuda" else 0
        for k, saved in run_tasks(self.task, todo, shared, gpus=gpus, max_retries=self.cluster.max_retries):
            self.tasks += 1
            advance(sum(j.bytes_in for j in plan.shards[todo[k]].jobs))
            yield todo[k], saved
        for stray in tmp.glob(f"*{PARTIAL}"):  # left by attempts whose worker died
            stray.unlink()

    def describe(self) -> dict:
        """The cluster and the work it was given, for the report (peak_rss_bytes there is the driver's)."""
        return {"engine": "ray", **self.resources, "device": self.device, "shard_tasks": self.tasks,
                "max_retries": self.cluster.max_retries}
