"""`preimage.jobs`: streamed, resumable inversion jobs, here, on executors and on Dask.

The Dask tests run a real `LocalCluster` of 2 single-threaded worker processes
(one for the module: starting one costs seconds).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from preimage import invert, random_network
from preimage.jobs import ResultsFolder, dask_client, invert_stream, load_results
from preimage.jobs import stream as stream_module
from preimage.jobs.store import decode, encode
from preimage.model.mnist import shipped_decoder
from tests.test_combine import assert_identical


@pytest.fixture(scope="module")
def client() -> Client:
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def mnist() -> tuple:
    """The shipped MNIST decoder and 240 of its outputs (unique and non-unique; LPs)."""
    net = shipped_decoder("relu")
    return net, net.forward(np.random.default_rng(1).standard_normal((240, 20)))


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ in process


def test_stream_here_is_one_invert_call_and_resumes(tmp_path: Path, mnist: tuple) -> None:
    net, x = mnist
    np.save(tmp_path / "x.npy", x)
    seen: list[tuple[int, int]] = []

    def stop_after_two_chunks(done: int, total: int) -> None:
        seen.append((done, total))
        if done >= 64:
            raise KeyboardInterrupt  # the user's Ctrl-C, between two chunks

    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        invert_stream(net, tmp_path / "x.npy", out, chunk_size=32,
                      progress=stop_after_two_chunks)
    assert seen == [(0, 240), (32, 240), (64, 240)]
    assert sorted(ResultsFolder(out).done()) == [0, 1]
    seen.clear()
    report = invert_stream(net, tmp_path / "x.npy", out, chunk_size=32,
                           progress=lambda d, t: seen.append((d, t)))
    assert (report.skipped, report.computed, report.chunks) == (2, 6, 8)
    assert (report.skipped_samples, report.computed_samples) == (64, 176)
    assert report.complete and not report.failed
    assert seen[0] == (64, 240) and seen[-1] == (240, 240)
    result = load_results(out)
    assert_identical(result, invert(net, x, batch_size=32))
    assert report.counts == result.counts()
    assert {"unique", "non_unique"} <= set(report.counts)
    # a third run does nothing
    again = invert_stream(net, tmp_path / "x.npy", out, chunk_size=32)
    assert (again.skipped, again.computed) == (8, 0)
    assert [e["chunk"] for e in manifest(out)] == list(range(8))  # each chunk written once


def test_default_chunks_are_invert_s_own(tmp_path: Path) -> None:
    """Without a chunk size, chunks are the batched method's: one plain invert call."""
    net = random_network([10, 40, 20000], seed=1)  # wide output: chunks of 69 samples
    x = net.forward(np.random.default_rng(2).standard_normal((150, 10)))
    report = invert_stream(net, x, tmp_path / "r")
    assert report.chunks == 3 and report.chunk_size == 69
    assert_identical(load_results(tmp_path / "r"), invert(net, x))


def test_memory_mapped_float32_rows(tmp_path: Path) -> None:
    """float32 rows read chunk by chunk from a .npy: float32 tolerances, polished answers."""
    net = shipped_decoder("relu")
    x = net.forward(np.random.default_rng(3).standard_normal((20, 20))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    invert_stream(net, str(tmp_path / "x.npy"), tmp_path / "r", chunk_size=8)
    result = load_results(tmp_path / "r")
    assert result.rtol == pytest.approx(1e-5)
    # (no sample here needs the cell search, whose default budget is in seconds: where
    # it runs, its answer depends on the machine's speed, chunked or not)
    assert "cell search" not in " ".join(result.message)
    assert_identical(result, invert(net, x, batch_size=8))
    assert np.all(result.residual[result.success] < 1e-5)


def test_chunk_files_round_trip_every_field() -> None:
    """Noisy results (tau, error bounds) and gradient ones decode to the same bits."""
    net = random_network([5, 30, 90], seed=4)
    x = net.forward(np.random.default_rng(0).standard_normal((6, 5)))
    for result in (invert(net, x, noise="linf", noise_level=1e-6, method="layerwise"),
                   invert(net, x, method="adam", options={"steps": 3}),
                   invert(net, x)):
        back = decode(encode(result))
        assert_identical(back, result)
        assert back.time == result.time


# --------------------------------------------------------------------- refusals


def test_other_model_input_or_settings_are_refused(tmp_path: Path) -> None:
    net = random_network([6, 30, 80], seed=3)
    x = net.forward(np.random.default_rng(1).standard_normal((20, 6)))
    out = tmp_path / "r"
    invert_stream(net, x, out, chunk_size=8)
    before = (out / "manifest.jsonl").read_text()
    with pytest.raises(ValueError, match="another model"):
        invert_stream(random_network([6, 30, 80], seed=4), x, out, chunk_size=8)
    with pytest.raises(ValueError, match="another input"):
        invert_stream(net, x[::-1], out, chunk_size=8)
    with pytest.raises(ValueError, match="another input"):
        invert_stream(net, x[:19], out, chunk_size=8)
    with pytest.raises(ValueError, match="another settings"):
        invert_stream(net, x, out, chunk_size=8, rtol=1e-6)
    with pytest.raises(ValueError, match="another chunk size"):
        invert_stream(net, x, out, chunk_size=4)
    changed = x.copy()
    changed[17, 3] += 1.0  # the last chunk only: caught by its own digest
    with pytest.raises(ValueError, match="chunk 2 .*input changed"):
        invert_stream(net, changed, out, chunk_size=8)
    assert (out / "manifest.jsonl").read_text() == before  # nothing mixed in
    # the same job, its chunk size left to the folder: resumed
    assert invert_stream(net, x, out).skipped == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a results folder"):
        invert_stream(net, x, tmp_path / "other")


def test_unwritable_folders_and_bad_arguments(tmp_path: Path) -> None:
    net = random_network([6, 30, 80], seed=3)
    x = net.forward(np.random.default_rng(1).standard_normal((4, 6)))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot make a results folder"):
        invert_stream(net, x, tmp_path / "file" / "r")
    if Path("/sys").is_dir():  # read-only even for root
        with pytest.raises(PermissionError, match="cannot write the results folder"):
            invert_stream(net, x, "/sys/preimage-results")
    if os.geteuid() != 0:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(PermissionError, match="cannot write"):
            invert_stream(net, x, locked / "r")
    bad = [
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be an integer >= 1"),
        ({"retries": -1}, ValueError, "`retries` must be an integer >= 0"),
        ({"progress": 3}, TypeError, "`progress` must be a callable"),
        ({"executor": "dask"}, TypeError, "`executor` must be None"),
        ({"batch_size": 3}, TypeError, "use `chunk_size`"),
        ({"method": "nope"}, ValueError, "`method` must be one of"),
        ({"options": {"steps": 3}}, TypeError, "not settings of method"),
    ]
    for kwargs, error, needle in bad:
        with pytest.raises(error, match=needle):
            invert_stream(net, x, tmp_path / "bad", **kwargs)
    with pytest.raises(ValueError, match="width 80"):
        invert_stream(net, np.ones((3, 81)), tmp_path / "bad")
    with pytest.raises(ValueError, match="cannot read the observations"):
        invert_stream(net, tmp_path / "missing.npy", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_unreachable_scheduler_is_a_clear_error() -> None:
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot reach the Dask scheduler at tcp://127"), \
            dask_client(scheduler="tcp://127.0.0.1:1", timeout=1):
        pass
    assert time.perf_counter() - start < 30
    with pytest.raises(ValueError, match="not a Dask address"), dask_client(scheduler="nowhere"):
        pass
    with pytest.raises(ValueError, match="either `workers`"), dask_client():
        pass


# -------------------------------------------------------------------- executors


def test_failed_chunks_are_retried_then_recorded(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread pool: chunk 1 fails once (retried, done); chunk 2 always (recorded)."""
    net = random_network([6, 30, 80], seed=3)
    x = net.forward(np.random.default_rng(1).standard_normal((40, 6)))
    runs: Counter[int] = Counter()
    real = stream_module.invert_chunk

    def flaky(net_, rows, settings):
        chunk = int(np.flatnonzero((x == rows[0]).all(axis=1))[0]) // 10
        runs[chunk] += 1
        if chunk == 2 or (chunk == 1 and runs[chunk] == 1):
            raise RuntimeError(f"chunk {chunk} broke")
        return real(net_, rows, settings)

    monkeypatch.setattr(stream_module, "invert_chunk", flaky)
    out = tmp_path / "r"
    with cf.ThreadPoolExecutor(2) as pool:
        report = invert_stream(net, x, out, executor=pool, chunk_size=10, retries=2)
    assert runs == {0: 1, 1: 2, 2: 3, 3: 1}
    assert report.failed == {2: "RuntimeError: chunk 2 broke"}
    assert (report.computed, report.complete) == (3, False)
    entries = {e["chunk"]: e for e in manifest(out)}
    assert entries[1]["attempts"] == 2 and entries[2]["attempts"] == 3
    assert entries[2]["status"] == "failed" and "chunk 2 broke" in entries[2]["error"]
    with pytest.raises(ValueError, match="1 of 4 chunks are not done"):
        load_results(out)
    monkeypatch.setattr(stream_module, "invert_chunk", real)
    report = invert_stream(net, x, out, chunk_size=10)  # the rerun retries the failed one
    assert (report.skipped, report.computed, report.complete) == (3, 1, True)
    assert_identical(load_results(out), invert(net, x, batch_size=10))


def test_process_pool_executor(tmp_path: Path, mnist: tuple) -> None:
    import multiprocessing

    net, x = mnist
    # spawn: forked children of a process that ran torch's thread pools can hang
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        invert_stream(net, x[:96], tmp_path / "r", executor=pool, chunk_size=32)
    assert_identical(load_results(tmp_path / "r"), invert(net, x[:96], batch_size=32))


# ------------------------------------------------------------------------- Dask


def test_dask_cluster_is_one_invert_call(tmp_path: Path, client: Client, mnist: tuple) -> None:
    net, x = mnist
    holders: list[dict] = []

    def watch(done: int, total: int) -> None:
        if 0 < done < total:
            holders.append(client.has_what())

    report = invert_stream(net, x, tmp_path / "r", executor=client, chunk_size=32,
                           progress=watch)
    assert report.complete and report.computed == 8
    assert_identical(load_results(tmp_path / "r"), invert(net, x, batch_size=32))
    # the network travels as one scattered key, never inside each chunk's task (Dask's
    # active memory manager may drop an idle worker's replica, so which workers hold
    # it at a given moment is not asserted)
    scattered = {k for snapshot in holders for keys in snapshot.values() for k in keys
                 if k.startswith("Portable-")}
    assert len(scattered) == 1


def test_dask_retries_then_records_the_failure(tmp_path: Path, client: Client) -> None:
    net = random_network([6, 30, 80], seed=3)
    x = net.forward(np.random.default_rng(1).standard_normal((40, 6)))
    x[25, 7] = 12345.0  # chunk 2's task raises on every worker (a failure planted there)

    def plant(on: bool) -> None:
        import preimage.jobs.stream as stream

        def failing(net, rows, **settings):  # type: ignore[no-untyped-def]
            if np.any(rows == 12345.0):
                raise RuntimeError("planted failure")
            return stream.__dict__["_real_invert"](net, rows, **settings)

        if on and "_real_invert" not in stream.__dict__:
            stream._real_invert, stream.invert = stream.invert, failing
        elif not on and "_real_invert" in stream.__dict__:
            stream.invert = stream.__dict__.pop("_real_invert")

    client.run(plant, True)
    try:
        report = invert_stream(net, x, tmp_path / "r", executor=client, chunk_size=10,
                               retries=1)
    finally:
        client.run(plant, False)
    assert list(report.failed) == [2] and "planted" in report.failed[2]
    assert report.computed == 3
    entries = {e["chunk"]: e["status"] for e in manifest(tmp_path / "r")}
    assert entries == {0: "done", 1: "done", 2: "failed", 3: "done"}

    def runs_of_failed_tasks(dask_scheduler) -> dict[str, int]:  # key -> times sent to run
        log = list(dask_scheduler.transition_log)
        erred = {str(e[0]) for e in log if e[2] == "erred"}
        return dict(Counter(str(e[0]) for e in log if str(e[0]) in erred and e[2] == "processing"))

    runs = client.run_on_scheduler(runs_of_failed_tasks)
    assert list(runs.values()) == [2]  # chunk 2's task ran twice: once, and one retry
    assert next(iter(runs)).startswith("preimage-chunk-2-")


def test_worker_killed_mid_run(tmp_path: Path, client: Client, mnist: tuple) -> None:
    """SIGKILL to a worker that is running a chunk: its chunks are redone elsewhere."""
    net, x = mnist
    pids = client.run(os.getpid)
    killed: dict[str, list] = {}

    def kill_a_busy_worker(done: int, total: int) -> None:
        if killed or done == 0:
            return
        busy = {w: list(keys) for w, keys in client.processing().items() if keys}
        if not busy:
            return  # both idle for a moment: try after the next chunk
        worker = next(iter(busy))
        killed[worker] = busy[worker]
        os.kill(pids[worker], signal.SIGKILL)

    report = invert_stream(net, x, tmp_path / "r", executor=client, chunk_size=16,
                           progress=kill_a_busy_worker)
    assert killed and next(iter(killed.values()))  # it was running a chunk
    assert report.complete and not report.failed
    chunks = [e["chunk"] for e in manifest(tmp_path / "r")]
    assert sorted(chunks) == list(range(15))  # every chunk exactly once
    assert_identical(load_results(tmp_path / "r"), invert(net, x, batch_size=16))
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_cli_on_a_scheduler_and_resumed(tmp_path: Path, client: Client, mnist: tuple,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from preimage.apps.cli import main

    net, x = mnist
    np.save(tmp_path / "x.npy", x[:64])
    args = ["invert", "mnist-relu", str(tmp_path / "x.npy"), "--out", str(tmp_path / "r"),
            "--chunk-size", "16"]
    assert main([*args, "--scheduler", client.scheduler.address]) == 0
    text = capsys.readouterr().out
    assert "4 chunks of 16 samples, on the cluster at tcp://" in text
    assert "answers (z with its checks passed): 64/64" in text
    assert main(args) == 0  # rerun here: nothing left to do
    assert "resumed: 4 of 4 chunks were already done (64 samples), skipped" in \
        capsys.readouterr().out
    assert_identical(load_results(tmp_path / "r"), invert(net, x[:64], batch_size=16))
    assert main(["invert", "mnist-relu", str(tmp_path / "x.npy"), "--workers", "2"]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def test_interrupted_dask_run_cancels_and_resumes(tmp_path: Path, client: Client) -> None:
    net = random_network([6, 30, 80], seed=3)
    x = net.forward(np.random.default_rng(1).standard_normal((60, 6)))

    def stop(done: int, total: int) -> None:
        if done >= 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_stream(net, x, tmp_path / "r", executor=client, chunk_size=10, progress=stop)
    done = len(ResultsFolder(tmp_path / "r").done())
    assert 2 <= done < 6
    report = invert_stream(net, x, tmp_path / "r", executor=client, chunk_size=10)
    assert (report.skipped, report.computed) == (done, 6 - done)
    assert_identical(load_results(tmp_path / "r"), invert(net, x, batch_size=10))
    deadline = time.time() + 10
    while client.processing() and any(client.processing().values()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(client.processing().values())  # the interrupted run left no tasks behind



def test_other_methods_stream_chunk_by_chunk(tmp_path: Path) -> None:
    """A method that takes no n_jobs (Adam) on an executor; it draws its starts per chunk."""
    from preimage.results import combine_results

    net = random_network([5, 30, 90], seed=4)
    x = net.forward(np.random.default_rng(0).standard_normal((12, 5)))
    settings = {"method": "adam", "options": {"steps": 5}}
    with cf.ThreadPoolExecutor(2) as pool:
        report = invert_stream(net, x, tmp_path / "r", executor=pool, chunk_size=5, **settings)
    assert report.complete
    by_chunk = combine_results([invert(net, x[lo : lo + 5], **settings) for lo in (0, 5, 10)])
    assert_identical(load_results(tmp_path / "r"), by_chunk)


def test_a_damaged_chunk_or_a_cut_manifest_line_is_redone_not_loaded(tmp_path: Path) -> None:
    # a chunk file cut short counted as done (load_results then raised BadZipFile, for
    # good); a manifest line cut short by a crash swallowed the next run's first line
    net = random_network([5, 40, 100], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal((40, 5)))
    np.save(tmp_path / "x.npy", x)
    folder = tmp_path / "out"
    invert_stream(net, tmp_path / "x.npy", folder, chunk_size=10)
    whole = load_results(folder)
    damaged = ResultsFolder(folder).chunk_path(1)
    damaged.write_bytes(damaged.read_bytes()[:100])
    path = folder / "manifest.jsonl"
    lines = path.read_text().splitlines(True)
    path.write_text("".join(lines[:-1]) + lines[-1][:15])  # the last chunk's line, cut
    report = invert_stream(net, tmp_path / "x.npy", folder, chunk_size=10)
    assert report.complete and report.computed == 2
    assert_identical(load_results(folder), whole)
    again = invert_stream(net, tmp_path / "x.npy", folder, chunk_size=10)
    assert again.computed == 0  # the manifest is readable after the repair


@pytest.mark.parametrize("line", ['{"chunk": 1}', '[1, 2]', '{"chunk": 1, "start": 0, '
                                  '"stop": 10, "input": "x", "status": "done"}'])
def test_a_manifest_line_of_another_program_is_named(tmp_path: Path, line: str) -> None:
    # a line without "status" stopped the run with the bare KeyError "status"
    net = random_network([5, 40, 100], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal((20, 5)))
    invert_stream(net, x, tmp_path / "out", chunk_size=10)
    with (tmp_path / "out" / "manifest.jsonl").open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl: line 3 is not a chunk's entry"):
        invert_stream(net, x, tmp_path / "out", chunk_size=10)


def test_a_chunk_larger_than_any_float_holds_exactly_is_one_chunk(tmp_path: Path) -> None:
    # 10**20 is not a float's integer: the check through float refused it, at the chunk
    net = random_network([5, 40, 100], seed=0)
    x = net.forward(np.random.default_rng(0).standard_normal((6, 5)))
    report = invert_stream(net, x, tmp_path / "out", chunk_size=10**20)
    assert report.complete and report.chunks == 1 and report.counts == {"unique": 6}


def test_a_forking_process_pool_is_refused_not_left_to_hang(tmp_path: Path) -> None:
    import multiprocessing

    net = random_network([5, 40, 100], seed=0)
    np.save(tmp_path / "x.npy", net.forward(np.zeros((4, 5))))
    fork = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(1, mp_context=fork) as pool, pytest.raises(
        ValueError, match="forks its workers"
    ):
        invert_stream(net, tmp_path / "x.npy", tmp_path / "out", executor=pool)


def test_settings_equal_to_inverts_defaults_are_the_same_job(tmp_path: Path) -> None:
    # the CLI passes method="exact", rtol=None; a Python call nothing: one job, resumable
    net = random_network([5, 40, 100], seed=0)
    np.save(tmp_path / "x.npy", net.forward(np.random.default_rng(0).standard_normal((8, 5))))
    invert_stream(net, tmp_path / "x.npy", tmp_path / "out", chunk_size=4)
    again = invert_stream(net, tmp_path / "x.npy", tmp_path / "out", chunk_size=4,
                          method="exact", rtol=None)
    assert again.computed == 0 and again.skipped == 2
    with pytest.raises(ValueError, match="another settings"):
        invert_stream(net, tmp_path / "x.npy", tmp_path / "out", chunk_size=4, rtol=1e-6)


def test_a_sample_with_nan_costs_its_chunk_no_other_answer(tmp_path: Path) -> None:
    # invert refuses NaN for the whole batch: a NaN or inf row failed its whole chunk (18
    # of 48 finite samples answered), retried for nothing
    net = random_network([5, 30, 80], seed=0)
    x = net.forward(np.random.default_rng(1).standard_normal((50, 5)))
    x[3, 5], x[20, 0] = np.nan, np.inf
    x[7] *= 1e-200  # below MIN_SCALE: refused too
    x[32:48] = np.nan  # a chunk with no finite sample
    np.save(tmp_path / "x.npy", x)
    report = invert_stream(net, tmp_path / "x.npy", tmp_path / "out", chunk_size=16)
    assert report.complete and not report.failed
    res = load_results(tmp_path / "out")
    bad = ~np.all(np.isfinite(x), axis=1)
    bad[7] = True
    assert np.all(res.status[bad] == "failed") and np.all(np.isnan(res.z[bad]))
    assert all(m.startswith("not inverted: `x`") for m in res.message[bad])
    assert "magnitude" in res.message[7] and "NaN" in res.message[3]
    assert "inf" in res.message[20]
    alone = invert(net, x[~bad])
    np.testing.assert_array_equal(res.status[~bad], alone.status)
    np.testing.assert_allclose(res.z[~bad], alone.z, rtol=1e-9, atol=1e-12)


def test_a_bad_connect_timeout_is_named() -> None:
    with pytest.raises(ValueError, match="timeout"), dask_client(scheduler="tcp://127.0.0.1:1",
                                                                  timeout=-1):
        pass


def test_a_stream_of_the_wrong_shape_names_the_files_shape(tmp_path: Path) -> None:
    # invert, handed the first row, named the row's shape (1, 8, 10), not the file's
    net = random_network([4, 20, 80], seed=0)
    np.save(tmp_path / "x.npy", np.zeros((50, 8, 10)))
    with pytest.raises(ValueError, match=r"width 80 \(shape \(80,\)\), as \(B, \.\.\.\); got "
                                         r"an array of shape \(50, 8, 10\)"):
        invert_stream(net, tmp_path / "x.npy", tmp_path / "out")
