"""Work spread over a Ray cluster: connect (or start a local instance), run a function over items as tasks.

The one door to Ray, so every stage that scales out (quantize's shards now; a GPTQ stage's per-layer expert
groups later) shares one way to connect, retry, cancel and report errors. Ray is an optional extra
(`pip install qstream[ray]`), imported here only when a command was given `--ray`. Knows nothing of tensors.

Tasks read and write files by path: on a cluster of several machines the source, the output's staging
directory and the working directory must be on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from qstream.errors import QstreamError

LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address is loopback (a one-machine cluster)
MAX_RETRIES = 3  # attempts after the first for a task whose worker process or node died
CANCEL_WAIT_S = 60  # how long a stopped run waits for its cancelled tasks to end


@dataclass(frozen=True)
class Cluster:
    """Where tasks run: a running cluster's `address` (host:port of its head, ray://host:port, or auto), or
    None to start a local instance with `cpus` CPUs (default: all of this machine's) for this command only."""

    address: str | None = None
    cpus: int | None = None
    max_retries: int = MAX_RETRIES


def check_address(address: str) -> str:
    """A Ray address as --ray takes it, or QstreamError (a path there means --ray swallowed SRC)."""
    if address == "auto" or ":" in address:
        return address
    raise QstreamError(f"--ray {address!r}: not a Ray address (host:port, ray://host:port or auto); "
                       "give one, or put a bare --ray after SRC DST to start a local Ray instance")


def _ray(local: bool) -> Any:
    """The ray module, or QstreamError naming the extra to install. A local instance listens on loopback
    only (Ray reads that setting when first imported)."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    try:
        import ray
    except ImportError:
        raise QstreamError("--ray needs Ray: pip install 'qstream[ray]' (or pip install ray)") from None
    return ray


@contextlib.contextmanager
def connected(cluster: Cluster) -> Iterator[dict]:
    """Ray ready for the block; yields what the cluster has ({"address", "cpus", "gpus", "nodes"}).

    Connects to `cluster.address`, or starts a local instance that is shut down after the block. A Ray this
    process has already initialised (a test's, a notebook's) is used as it is and left running.
    """
    ray = _ray(cluster.address is None)
    started = not ray.is_initialized()
    if started:
        try:
            if cluster.address is None:
                ray.init(num_cpus=cluster.cpus or os.cpu_count(), include_dashboard=False,
                         logging_level="WARNING", log_to_driver=False)
            else:
                ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = cluster.address or "a local instance"
            raise QstreamError(f"--ray {where}: Ray did not start ({str(exc).splitlines()[0]}); check the "
                               "address (`ray status` on the head node) or run without --ray") from None
    try:
        res = ray.cluster_resources()
        yield {"address": cluster.address or "local", "cpus": int(res.get("CPU", 0)), "gpus": int(res.get("GPU", 0)),
               "nodes": len([n for n in ray.nodes() if n.get("Alive")])}
    finally:
        if started:
            ray.shutdown()


def run_tasks(fn: Callable[..., Any], items: Sequence[Any], shared: tuple = (), *, cpus: float = 1, gpus: float = 0,
              max_retries: int = MAX_RETRIES) -> Iterator[tuple[int, Any]]:
    """`fn(*shared, item)` for every item as a Ray task; yields (position in items, result) as tasks finish.

    `shared` is put into the object store once and handed to every task. A task whose worker process or
    node died is run again, up to `max_retries` times (fn must then start its work afresh); an exception
    raised by fn is not retried: it is raised here as itself, and so is a KeyboardInterrupt. Whenever the
    caller stops early, tasks not yet finished are cancelled, and waited for. Call it inside `connected`.
    """
    ray = _ray(False)
    refs = [ray.put(value) for value in shared]
    remote = ray.remote(fn).options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False)
    pending = {remote.remote(*refs, item): i for i, item in enumerate(items)}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:  # fn raised: its own exception, one line at the CLI
                raise exc.cause from None
            except ray.exceptions.RayError as exc:  # its worker or node died once more than it may
                raise QstreamError(f"a Ray worker died {max_retries + 1} times running task {i} of {fn.__name__} "
                                   f"({str(exc).splitlines()[0]}); see the Ray logs of the cluster") from None
            yield i, result
    finally:  # cancel what is left, and wait until it has stopped writing (the caller cleans up after us)
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
