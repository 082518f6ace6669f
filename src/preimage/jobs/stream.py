"""`invert_stream`: `preimage.invert` over a dataset, chunk by chunk, into a results folder.

The samples are cut into chunks of ``chunk_size`` (by default the batched exact
method's own working chunk: `preimage.methods.batched.context.chunk_size`);
each chunk is one task, ``invert(net, rows, batch_size=chunk_size, ...)``, run

- in this process (``executor=None``), one chunk after the other;
- on a Dask cluster (``executor`` a ``dask.distributed.Client``): the network
  is scattered to every worker once (``broadcast=True``), each chunk's rows go
  with its task (the scheduler keeps them, so a task whose worker dies is
  rerun elsewhere), ``retries`` reruns of a task that raised; results are
  gathered as they finish (``as_completed``);
- on any ``concurrent.futures.Executor`` (a process pool): the network goes
  with each task, a task that raised is resubmitted up to ``retries`` times.

At most ``max_in_flight`` chunks are read and pending at a time, so the
memory held stays a few chunks whatever the dataset's size. Each result is
written to the folder as it arrives (`preimage.jobs.store`), by this process
alone: a task rerun after a worker died is still written once. A chunk that
still fails after its retries is recorded "failed" with its error and the
other chunks go on. Rerunning the same job resumes: chunks done are skipped
(after checking that their input rows are unchanged), failed ones are retried.

Results: the exact method's chunks combined are bit for bit one
``invert(net, x, batch_size=chunk_size)`` call (timings aside; its default
chunk is that of ``invert(net, x)``, whose answers do not depend on the thread
count: `preimage.results.combine_results`). Methods that draw random starts
(the gradient methods, the hybrid) draw them chunk by chunk.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import pickle
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import preimage
from preimage.api import invert, route_arguments
from preimage.jobs.fingerprint import fingerprint, rows_digest
from preimage.jobs.source import Rows
from preimage.jobs.store import FORMAT, ResultsFolder, encode
from preimage.methods.batched.context import chunk_size as default_chunk
from preimage.model.network import Network
from preimage.model.validation import check_callback, check_count, refused_samples
from preimage.results import ProgressCallback, with_unread_samples

#: Arguments of `invert` that the job sets itself.
OWN = ("progress", "batch_size")


@dataclass(frozen=True)
class JobReport:
    """What a run of `invert_stream` did.

    Attributes
    ----------
    folder : the results folder
    samples, chunks, chunk_size : the job's size and cut
    skipped, skipped_samples : chunks (samples) already done by earlier runs, not recomputed
    computed, computed_samples : chunks (samples) this run inverted and wrote
    failed : chunk -> its error, for the chunks of this run that failed after their retries
    counts : samples per status over every chunk done (this run's and earlier ones')
    seconds : this run's wall-clock time
    """

    folder: Path
    samples: int
    chunks: int
    chunk_size: int
    skipped: int
    computed: int
    skipped_samples: int = 0
    computed_samples: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Every chunk done."""
        return self.skipped + self.computed == self.chunks

    def rows(self, chunk: int) -> tuple[int, int]:
        """The samples (first, end) of a chunk."""
        return chunk * self.chunk_size, min(self.samples, (chunk + 1) * self.chunk_size)


def invert_chunk(net: Any, rows: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
    """One task: ``invert(net, rows, **settings)``, encoded for its file (`store.encode`).

    `net`: a Network or a `Portable` one. Rows that arrive as a view into a
    message (Dask's frames) are copied into an array of their own first.
    """
    if isinstance(net, Portable):
        net = net.net
    if not rows.flags.owndata or rows.ctypes.data % ALIGNMENT:
        rows = rows.copy()
    refused = refused_samples(rows)
    if not refused:
        return encode(invert(net, rows, **settings))
    # one sample that invert refuses (NaN, inf, out of scale) must not cost its chunk the
    # others' answers, nor be retried (none left: a blank row gives the layout, dropped)
    kept = np.ones(len(rows), dtype=bool)
    kept[list(refused)] = False
    result = invert(net, rows[kept] if kept.any() else np.zeros_like(rows[:1]), **settings)
    return encode(with_unread_samples(result, kept, [
        f"not inverted: {why}" for _, why in sorted(refused.items())]))


#: The alignment, in bytes, of the arrays NumPy allocates (glibc's malloc: 16).
ALIGNMENT = 16


class Portable:
    """A network that travels to Dask workers as one pickle of its own.

    Dask deserializes arrays as views into its message frames, at any offset:
    there, weights at addresses 23 bytes past a multiple of 64 were measured to
    change BLAS's rounding (the residuals of the authors' MNIST decoder differed
    in the last bit). Unpickled from bytes of its own (pickle protocol 4, no
    out-of-band buffers), every array is a new allocation, aligned by NumPy.
    """

    def __init__(self, net: Network) -> None:
        self.net = net

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return _unpickle_portable, (pickle.dumps(self.net, protocol=4),)


def _unpickle_portable(blob: bytes) -> Portable:
    return Portable(pickle.loads(blob))


def invert_stream(
    net: Network,
    x: Any,
    out: str | os.PathLike[str],
    *,
    executor: Any = None,
    chunk_size: int | None = None,
    retries: int = 2,
    max_in_flight: int | None = None,
    progress: ProgressCallback | None = None,
    **settings: Any,
) -> JobReport:
    """Invert every sample of x through `net`, chunk by chunk, into the folder `out`.

    Parameters
    ----------
    net : Network
    x : path of a ``.npy`` file (memory-mapped chunk by chunk), or array-like
        of shape (B, ...): the observations, as for `preimage.invert`.
    out : path
        The results folder (`preimage.jobs.store`); made if missing. One that
        holds results of this job is resumed; one of another model, other
        settings or other input is refused (ValueError).
    executor : None, ``dask.distributed.Client`` or ``concurrent.futures.Executor``
        Where the chunks run (module docstring). With an executor each task
        uses ``n_jobs=1`` unless ``n_jobs`` is given: the workers are the
        parallelism.
    chunk_size : int >= 1, optional
        Samples per chunk (the last may be shorter); default: the batched
        exact method's working chunk for `net` (a few thousand samples for
        small networks).
    retries : int >= 0
        Reruns of a chunk whose task raised, before it is recorded "failed".
    max_in_flight : int >= 1, optional
        Chunks read and pending at once (default: twice the executor's workers,
        plus one).
    progress : callable(done, total), optional
        Samples done so far (including those of earlier runs), after each chunk.
    **settings
        Keyword arguments of `preimage.invert` (method, rtol, noise, options, ...).

    Returns
    -------
    JobReport
        Load the results with `preimage.jobs.load_results(out)`.

    Raises
    ------
    ValueError, TypeError
        Bad arguments (checked on a first row before anything is written), or
        a folder that holds other results.
    PermissionError
        A folder that cannot be written.
    """
    start = time.perf_counter()
    if not isinstance(net, Network):
        raise TypeError(f"`net` must be a preimage.Network; got {type(net).__name__}.")
    for name in OWN:
        if name in settings:
            raise TypeError(
                f"`{name}` is set by invert_stream itself"
                + (" (use `chunk_size`)" if name == "batch_size" else " (pass it to invert_stream)")
                + "."
            )
    retries = check_count(retries, "retries", 0)
    if chunk_size is not None:
        chunk_size = check_count(chunk_size, "chunk_size", 1)
    if max_in_flight is not None:
        max_in_flight = check_count(max_in_flight, "max_in_flight", 1)
    check_callback(progress, "progress")
    kind = _executor_kind(executor)
    takes = route_arguments(net, **_route_settings(settings))
    if kind != "local" and "n_jobs" in takes:
        settings.setdefault("n_jobs", 1)
    rows = Rows(x, net)
    folder = ResultsFolder(out)
    total = rows.count
    if total == 0:
        raise ValueError("`x` holds no samples.")
    # The arguments are checked by invert itself, on the first row (made finite):
    # an error then stops the job before anything is written, with invert's message.
    first = np.nan_to_num(rows.read(0, 1), nan=0.0, posinf=0.0, neginf=0.0)
    invert(net, first, **settings)
    on_file = folder.job()
    if chunk_size is None:  # the folder's, when it has one; else the exact method's own
        size = on_file.get("chunk_size") if on_file is not None else None
        chunk_size = size if isinstance(size, int) else default_chunk(net, total, None)
    job = {
        "format": FORMAT,
        "model": {"fingerprint": fingerprint(net), "description": repr(net)},
        # n_jobs changes no answer (`preimage.methods.batched.gram.PARALLEL_PIECES`): a
        # job started here may go on on a cluster
        "settings": {"fingerprint": fingerprint(_identity(settings)),
                     "description": _summary(_identity(settings))},
        "input": {"shape": list(rows.rows_shape), "dtype": rows.dtype.str,
                  "first_chunk": rows_digest(rows.read(0, min(total, chunk_size))),
                  "description": rows.describe()},
        "chunk_size": chunk_size,
        "samples": total,
        "chunks": -(-total // chunk_size),
        "preimage": preimage.__version__,
    }
    folder.claim(job)
    if "batch_size" in takes:
        settings["batch_size"] = chunk_size
    n_chunks = -(-total // chunk_size)
    with folder.locked():
        done = folder.done()
        for i, entry in sorted(done.items()):
            lo, hi = i * chunk_size, min(total, (i + 1) * chunk_size)
            if rows_digest(rows.read(lo, hi)) != entry["input"]:
                raise ValueError(
                    f"{folder.path}: chunk {i} (samples {lo}..{hi - 1}) was computed from "
                    "other rows than x has now: the input changed. Refused, not mixed: give "
                    "another folder, or delete this one to start over"
                )
        todo = [i for i in range(n_chunks) if i not in done]
        counter = _Counter(total, progress)
        for entry in done.values():
            counter.add(entry)
        counter.report()
        run = _Run(folder, rows, chunk_size, total, counter)
        if todo:
            if kind == "local":
                run.local(net, settings, todo, retries)
            elif kind == "dask":
                run.dask(executor, net, settings, todo, retries, max_in_flight)
            else:
                run.futures(executor, net, settings, todo, retries, max_in_flight)
    return JobReport(
        folder=folder.path, samples=total, chunks=n_chunks, chunk_size=chunk_size,
        skipped=len(done), computed=run.computed,
        skipped_samples=sum(int(e["stop"]) - int(e["start"]) for e in done.values()),
        computed_samples=run.computed_samples, failed=dict(sorted(run.failed.items())),
        counts=dict(sorted(counter.counts.items())), seconds=time.perf_counter() - start,
    )


class _Counter:
    """Samples done and statuses counted, reported through ``progress``."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total, self.progress = total, progress
        self.samples = 0
        self.counts: dict[str, int] = {}

    def add(self, entry: dict[str, Any]) -> None:
        self.samples += int(entry["stop"]) - int(entry["start"])
        for status, n in entry.get("counts", {}).items():
            self.counts[status] = self.counts.get(status, 0) + int(n)

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.samples, self.total)


class _Run:
    """One run's chunks: read, dispatched, written as they finish."""

    def __init__(self, folder: ResultsFolder, rows: Rows, chunk_size: int, total: int,
                 counter: _Counter) -> None:
        self.folder, self.rows, self.chunk_size, self.total = folder, rows, chunk_size, total
        self.counter = counter
        self.computed = 0
        self.computed_samples = 0
        self.failed: dict[int, str] = {}
        self.token = uuid.uuid4().hex[:8]

    def span(self, i: int) -> tuple[int, int]:
        return i * self.chunk_size, min(self.total, (i + 1) * self.chunk_size)

    def read(self, i: int) -> tuple[np.ndarray, str]:
        rows = self.rows.read(*self.span(i))
        return rows, rows_digest(rows)

    def finish(self, i: int, digest: str, attempts: int | None, seconds: float,
               arrays: dict[str, Any] | None, error: BaseException | None) -> None:
        """Write chunk i's result (or record its failure) and its manifest line.

        attempts: the runs it took (None on Dask, which retries by itself).
        """
        lo, hi = self.span(i)
        entry: dict[str, Any] = {"chunk": i, "start": lo, "stop": hi, "input": digest,
                                 "seconds": round(seconds, 6)}
        if attempts is not None:
            entry["attempts"] = attempts
        if arrays is None:
            message = f"{type(error).__name__}: {error}"
            self.folder.append({**entry, "status": "failed", "error": message})
            self.failed[i] = message
            return
        self.folder.write_chunk(i, arrays)
        codes = np.bincount(arrays["status#codes"], minlength=len(arrays["status#values"]))
        counts = {str(v): int(n) for v, n in zip(arrays["status#values"], codes, strict=True)
                  if n}
        entry = {**entry, "status": "done", "counts": counts}
        self.folder.append(entry)
        self.computed += 1
        self.computed_samples += hi - lo
        self.counter.add(entry)
        self.counter.report()

    # --- in this process ---------------------------------------------------------

    def local(self, net: Network, settings: dict[str, Any], todo: list[int],
              retries: int) -> None:
        for i in todo:
            rows, digest = self.read(i)
            began = time.perf_counter()
            for attempt in range(1, retries + 2):
                try:
                    arrays = invert_chunk(net, rows, settings)
                except Exception as exc:  # a failed chunk must not stop the others
                    if attempt > retries:
                        self.finish(i, digest, attempt, time.perf_counter() - began, None, exc)
                else:
                    self.finish(i, digest, attempt, time.perf_counter() - began, arrays, None)
                    break

    # --- a concurrent.futures.Executor -------------------------------------------

    def futures(self, executor: cf.Executor, net: Network, settings: dict[str, Any],
                todo: list[int], retries: int, max_in_flight: int | None) -> None:
        limit = max_in_flight or 2 * (os.cpu_count() or 1) + 1
        queue = iter(todo)
        pending: dict[cf.Future[Any], tuple[int, np.ndarray, str, int, float]] = {}

        def submit(i: int, rows: np.ndarray, digest: str, attempt: int, began: float) -> None:
            future = executor.submit(invert_chunk, net, rows, settings)
            pending[future] = (i, rows, digest, attempt, began)

        def refill() -> None:
            while len(pending) < limit:
                i = next(queue, None)
                if i is None:
                    return
                submit(i, *self.read(i), 1, time.perf_counter())

        try:
            refill()
            while pending:
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    i, rows, digest, attempt, began = pending.pop(future)
                    error = future.exception()
                    if error is not None and attempt <= retries:
                        submit(i, rows, digest, attempt + 1, began)
                        continue
                    arrays = None if error is not None else future.result()
                    self.finish(i, digest, attempt, time.perf_counter() - began, arrays, error)
                refill()
        finally:
            for future in pending:
                future.cancel()

    # --- a Dask cluster ----------------------------------------------------------

    def dask(self, client: Any, net: Network, settings: dict[str, Any], todo: list[int],
             retries: int, max_in_flight: int | None) -> None:
        from distributed import as_completed

        threads = sum(client.nthreads().values()) or 1
        limit = max_in_flight or 2 * threads + 1
        # Sent once to every worker (and from them to any worker that joins later).
        shared_net = client.scatter(Portable(net), broadcast=True, hash=False)
        queue = iter(todo)
        pending: dict[str, tuple[int, str, float, Any]] = {}
        finished = as_completed()

        def refill() -> None:
            while len(pending) < limit:
                i = next(queue, None)
                if i is None:
                    return
                rows, digest = self.read(i)
                with warnings.catch_warnings():
                    # The rows go in the task on purpose (about 10 MB, Dask warns): the
                    # scheduler keeps them, and reruns the task elsewhere if its worker
                    # dies; scattered rows would be lost with that worker.
                    warnings.filterwarnings("ignore", message=".*[Ll]arge object")
                    future = client.submit(
                        invert_chunk, shared_net, rows, settings, key=self.key(i),
                        retries=retries, pure=False,
                    )
                pending[future.key] = (i, digest, time.perf_counter(), future)
                finished.add(future)

        try:
            refill()
            for future in finished:
                i, digest, began, _ = pending.pop(future.key)
                seconds = time.perf_counter() - began
                if future.status == "finished":
                    self.finish(i, digest, None, seconds, future.result(), None)
                else:
                    self.finish(i, digest, None, seconds, None, _future_error(future))
                future.release()
                refill()
        finally:
            if pending:  # interrupted: the chunks not written are not wanted any more
                client.cancel([entry[3] for entry in pending.values()])
            shared_net.release()

    def key(self, i: int) -> str:
        """The Dask key of chunk i's task in this run."""
        return chunk_key(self.token, i)


def chunk_key(token: str, i: int) -> str:
    """The Dask key of chunk i's task in the run `token`."""
    return f"preimage-chunk-{i}-{token}"


def _future_error(future: Any) -> BaseException:
    try:
        error = future.exception()
    except Exception as exc:  # a cancelled or lost future raises instead
        return exc
    return error if error is not None else RuntimeError(f"task {future.status}")


def _executor_kind(executor: Any) -> str:
    if executor is None:
        return "local"
    module = type(executor).__module__.split(".")[0]
    if module == "distributed":
        from distributed import Client

        if isinstance(executor, Client):
            return "dask"
    if isinstance(executor, cf.ProcessPoolExecutor):
        context = getattr(executor, "_mp_context", None)
        if context is not None and context.get_start_method() == "fork":
            # the forked workers inherit torch's OpenMP pool mid-use and wait on it for ever
            raise ValueError(
                "`executor` is a ProcessPoolExecutor that forks its workers, which hang in "
                "torch's thread pool; make it with mp_context=multiprocessing.get_context("
                "'spawn') (or 'forkserver')."
            )
    if isinstance(executor, cf.Executor):
        return "futures"
    raise TypeError(
        "`executor` must be None (this process), a dask.distributed.Client or a "
        f"concurrent.futures.Executor; got {type(executor).__name__}."
    )


def _route_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: settings.get(k) for k in ("noise", "observe", "A")} | {
        "method": settings.get("method", "exact")
    }


def _identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that the results depend on, those equal to `invert`'s defaults left
    out (the CLI passes method="exact", rtol=None; Python code often nothing: one job)."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(invert).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def default(name: str, value: Any) -> bool:
        plain = isinstance(value, (str, bool, int, float, type(None)))
        return name in defaults and plain and type(value) is type(defaults[name]) and (
            value == defaults[name])

    return {k: v for k, v in settings.items() if k != "n_jobs" and not default(k, v)}


def _summary(settings: dict[str, Any]) -> dict[str, str]:
    """A readable account of the settings (job.json's "description")."""
    return {k: _short(v) for k, v in sorted(settings.items())}


def _short(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.shape} {value.dtype}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
