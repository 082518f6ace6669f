"""Dask clusters for `invert_stream`: a local one, or an existing one by its address.

    dask scheduler                              # on one machine: prints its address
    dask worker tcp://HOST:8786 --nthreads 1    # on each machine, one per core

A worker per core with one thread each: the LPs of small layers hold the
GIL (HiGHS's Python front end), so processes, not threads, run them side by
side.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from preimage.model.validation import check_positive

#: Seconds to wait for a scheduler to answer before giving up.
CONNECT_TIMEOUT = 10.0


@contextmanager
def dask_client(
    *, workers: int | None = None, scheduler: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> Iterator[Any]:
    """A ``dask.distributed.Client``: of a new ``LocalCluster`` of `workers` single-threaded
    processes, or of the cluster whose scheduler is at `scheduler` (e.g. "tcp://host:8786").

    Raises ValueError for a bad count or address, ConnectionError where the
    scheduler does not answer within `timeout` seconds. The client (and a
    local cluster) is closed on exit.
    """
    if (workers is None) == (scheduler is None):
        raise ValueError("Give either `workers` (a local cluster) or `scheduler` (an address).")
    from distributed import Client, LocalCluster

    if scheduler is not None:
        timeout = check_positive(timeout, "timeout")  # (Dask's own message names neither)
        if not isinstance(scheduler, str) or not scheduler.strip():
            raise ValueError(f"`scheduler` must be an address like tcp://host:8786; got "
                             f"{scheduler!r}.")
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"cannot reach the Dask scheduler at {scheduler} (no answer within "
                f"{timeout:g} s: {exc}); start one with `dask scheduler` and workers with "
                "`dask worker ADDRESS --nthreads 1`"
            ) from None
        except ValueError as exc:
            raise ValueError(f"`scheduler` {scheduler!r} is not a Dask address: {exc}") from None
        try:
            yield client
        finally:
            client.close()
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1; got {workers!r}.")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
