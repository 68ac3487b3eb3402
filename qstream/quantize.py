"""`qstream quantize` as one call: the conversion, then the command's own finishing steps.

The pipeline (convert.pipeline.run) streams the plan into a temporary directory; before that
directory is published as DST, this command holds it to the cheap checks of `qstream verify` and
writes its model card. Checks and cards sit above the conversion, so the conversion knows neither.
"""

from __future__ import annotations

from pathlib import Path

from qstream.check.verify import verify_written
from qstream.cluster import Cluster, connected
from qstream.convert.pipeline import Calibrated, run
from qstream.convert.scale_out import RayShards
from qstream.io.staging import check_destination
from qstream.planning.plan import Plan
from qstream.report.card import write_card


def quantize_checkpoint(plan: Plan, dst: Path, device: str = "auto", overwrite: bool = False,
                        progress: bool = True, resume: bool = False, calibrated: Calibrated | None = None,
                        cluster: Cluster | None = None) -> dict:
    """Write DST per the plan, verified and with its model card; returns the run's report. `calibrated`: a
    calibrated method's per-module data (imatrix channel weights, sequential GPTQ's solved modules). `cluster`:
    write the shards as Ray tasks there (`--ray`); the same bytes as without."""

    def finish(tmp: Path) -> None:
        verify_written(tmp)  # a failure here is a qstream bug: nothing is published
        write_card(tmp, plan.source.root / "README.md", name=Path(dst).name)

    def convert(shards: RayShards | None = None) -> dict:
        return run(plan, dst, device=device, overwrite=overwrite, progress=progress, resume=resume, finish=finish,
                   calibrated=calibrated, shards=shards)

    if cluster is None:
        return convert()
    check_destination(plan.source.root, dst, overwrite or resume)  # before Ray starts: a refused DST costs nothing
    with connected(cluster) as resources:
        return convert(RayShards(cluster, resources, device))
