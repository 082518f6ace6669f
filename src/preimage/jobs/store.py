"""A results folder: one ``.npz`` file per chunk, a manifest, the job's identity.

    RESULTS/
      job.json             what the results are of: model, settings, input, chunk size
      manifest.jsonl       one line per chunk as it finishes ("done" or "failed")
      chunks/000000.npz    chunk 0's InversionResult (samples 0 .. chunk_size - 1)
      chunks/000001.npz    ...

A chunk's file is written to a temporary name and renamed into place, then
its manifest line is appended: a run killed at any moment leaves finished
chunks whole, and a chunk without its line is redone. A chunk is done when
its last manifest line says so and its file is there; the line also keeps
the digest of the chunk's input rows, so a resumed run can check that the
input is still the same. A rerun with another model, other settings or
other data is refused (`ResultsFolder.claim`), not mixed in.

Why files and not zarr: results arrive one chunk at a time, from any
machine, and are written by the one process that gathers them; a chunk is
then a unit of work, of failure and of storage alike. One ``.npz`` per chunk
with NumPy alone gives that, atomically, without a dependency; zarr's chunked
arrays would add one and would need a write per field per chunk.

Strings (statuses, messages) are stored as codes into their distinct values;
``InversionResult`` fields that are None are left out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preimage.results import InversionResult, LayerReport, combine_results

#: The format of a results folder (job.json's "format").
FORMAT = "preimage-results/1"
JOB_FILE = "job.json"
MANIFEST = "manifest.jsonl"
CHUNKS = "chunks"
LOCK = ".lock"
#: What job.json must agree on for a run to continue a folder, and how to say it.
IDENTITY: dict[str, str] = {
    "format": "format",
    "model": "model",
    "settings": "settings (method, tolerances, options)",
    "chunk_size": "chunk size",
    "input": "input",
}
#: The suffix of the arrays of a string field: its distinct values, and codes into them.
VALUES, CODES = "#values", "#codes"


# ------------------------------------------------------------------------ encoding


def encode(result: InversionResult) -> dict[str, np.ndarray]:
    """The arrays of one chunk's file: every array field, the rest in "meta" (JSON)."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"layers": []}
    for f in dataclasses.fields(InversionResult):
        value = getattr(result, f.name)
        if f.name == "layers":
            for report in value:
                prefix = f"layers.{report.index}."
                meta["layers"].append(report.index)
                for g in dataclasses.fields(LayerReport):
                    column = getattr(report, g.name)
                    if isinstance(column, np.ndarray):
                        _put(arrays, prefix + g.name, column)
        elif isinstance(value, np.ndarray):
            _put(arrays, f.name, value)
        elif value is not None:
            meta[f.name] = value.item() if isinstance(value, np.generic) else value
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def _put(arrays: dict[str, np.ndarray], name: str, column: np.ndarray) -> None:
    if column.dtype.hasobject:
        flat = column.reshape(-1)
        if not all(isinstance(v, str) for v in flat):
            raise TypeError(f"`{name}` holds objects other than strings; cannot store it.")
        values, codes = np.unique(flat.astype(str), return_inverse=True)
        arrays[name + VALUES] = values
        arrays[name + CODES] = codes.reshape(column.shape).astype(np.int32)
    else:
        arrays[name] = column


def decode(arrays: Any) -> InversionResult:
    """The InversionResult of a chunk's arrays (`encode`'s inverse, bit for bit)."""
    meta = json.loads(str(arrays["meta"][()]))
    layer_indices = meta.pop("layers")
    columns: dict[str, Any] = {}
    for key in arrays.files if hasattr(arrays, "files") else arrays:
        if key == "meta" or key.endswith(CODES):
            continue
        if key.endswith(VALUES):
            name = key[: -len(VALUES)]
            columns[name] = arrays[key][arrays[name + CODES]].astype(object)
        else:
            columns[key] = arrays[key]
    layers = []
    for index in layer_indices:
        prefix = f"layers.{index}."
        fields = {k[len(prefix):]: v for k, v in columns.items() if k.startswith(prefix)}
        layers.append(LayerReport(index=index, **fields))
    top = {k: v for k, v in columns.items() if not k.startswith("layers.")}
    return InversionResult(layers=tuple(layers), **top, **meta)


# -------------------------------------------------------------------------- folder


class ResultsFolder:
    """The results folder at `path` (module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def chunks(self) -> Path:
        return self.path / CHUNKS

    def chunk_path(self, index: int) -> Path:
        return self.chunks / f"{index:06d}.npz"

    # --- identity ---------------------------------------------------------------

    def job(self) -> dict[str, Any] | None:
        """job.json, or None where the folder holds none yet."""
        path = self.path / JOB_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a results folder's job file: {exc}") from exc

    def claim(self, job: dict[str, Any]) -> dict[str, Any]:
        """Create the folder for `job`, or check that it holds results of this same job.

        Returns the job on file. Raises PermissionError where the folder cannot
        be written, ValueError where it holds another job's results (or other files).
        """
        try:
            self.chunks.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise PermissionError(
                    f"cannot write the results folder {self.path}: {reason}; give a folder "
                    "you can write to"
                ) from None
            raise ValueError(f"cannot make a results folder at {self.path}: {reason}") from None
        found = self.job()
        if found is None:
            others = sorted(p.name for p in self.path.iterdir()
                            if p.name not in (CHUNKS, MANIFEST) and not p.name.startswith("."))
            if others or any(self.chunks.iterdir()):
                raise ValueError(
                    f"{self.path} is not empty and holds no {JOB_FILE} (it has {others[:3]}...): "
                    "not a results folder; give a new or empty folder"
                )
            _atomic_write(self.path / JOB_FILE, json.dumps(job, indent=1).encode())
            return job
        for key, what in IDENTITY.items():
            mine, theirs = job.get(key), found.get(key)
            if _identity(mine) != _identity(theirs):
                raise ValueError(
                    f"{self.path} holds results of another {what}: {_describe(theirs)}, not "
                    f"{_describe(mine)}. Refused, not mixed: give another folder, or delete "
                    "this one to start over"
                )
        return found

    # --- manifest ---------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """The manifest's lines, in order. A line cut short by a crash (the last one, or
        one `append` has since closed) is left out; any other line that is not JSON is an
        error."""
        path = self.path / MANIFEST
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        out = []
        for k, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                if k < len(lines) - 1 and line.rstrip().endswith("}"):
                    raise ValueError(f"{path}: line {k + 1} is not JSON") from None
                continue
            problem = _entry_problem(entry)
            if problem:
                raise ValueError(
                    f"{path}: line {k + 1} is not a chunk's entry ({problem}); the folder "
                    "was edited by hand or by another program"
                )
            out.append(entry)
        return out

    def state(self) -> dict[int, dict[str, Any]]:
        """Each chunk's last manifest line."""
        return {int(e["chunk"]): e for e in self.entries()}

    def done(self, verify: bool = True) -> dict[int, dict[str, Any]]:
        """The chunks done: last line "done" and the chunk's file present and, with
        ``verify``, intact (every member's CRC, which reads the whole file; a file cut short
        or damaged is a chunk to redo, not one to load). Without it, a damaged file shows
        when it is read."""
        present = {i: e for i, e in self.state().items()
                   if e["status"] == "done" and self.chunk_path(i).exists()}
        return {i: e for i, e in present.items() if not verify or _intact(self.chunk_path(i))}

    def append(self, entry: dict[str, Any]) -> None:
        path = self.path / MANIFEST
        with path.open("ab") as fh:
            # a last line cut short by a crash (`entries` skips it) must not swallow this one
            if fh.tell() > 0:
                with path.open("rb") as last:
                    last.seek(-1, os.SEEK_END)
                    if last.read(1) != b"\n":
                        fh.write(b"\n")
            fh.write((json.dumps(entry) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())

    # --- chunks -----------------------------------------------------------------

    def write_chunk(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Chunk `index`'s file, written whole or not at all."""
        path = self.chunk_path(index)
        tmp = path.with_name(f".{path.stem}-{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())  # (on disk before the manifest says "done")
        os.replace(tmp, path)

    def read_chunk(self, index: int) -> InversionResult:
        with np.load(self.chunk_path(index), allow_pickle=False) as arrays:
            return decode(arrays)

    def read_field(self, name: str, chunks: Sequence[int] | None = None) -> np.ndarray:
        """One per-sample field (e.g. "status", "z", "layers.0.rank") over chunks, in order."""
        # (not verified: a read per field must not read every chunk whole first)
        order = sorted(self.done(verify=False)) if chunks is None else list(chunks)
        parts = []
        for i in order:
            with np.load(self.chunk_path(i), allow_pickle=False) as arrays:
                if name + CODES in arrays.files:
                    parts.append(arrays[name + VALUES][arrays[name + CODES]].astype(object))
                elif name in arrays.files:
                    parts.append(arrays[name])
                else:
                    raise KeyError(f"chunk {i} has no field {name!r}")
        if not parts:
            return np.empty(0)
        return np.concatenate(parts)

    # --- one run at a time -------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock: a second run on it at the same time is refused."""
        import fcntl

        with (self.path / LOCK).open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ValueError(
                    f"{self.path} is in use by another run (its lock is held); wait for it, "
                    "or give another folder"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def load_results(path: str | os.PathLike[str]) -> InversionResult:
    """The whole job's InversionResult from its results folder (every chunk done).

    The chunks' results combined (`preimage.results.combine_results`): for the
    exact method, bit for bit those of one `preimage.invert` call over all the
    samples with ``batch_size`` the job's chunk size, timings aside.
    """
    folder = ResultsFolder(path)
    job = folder.job()
    if job is None:
        raise ValueError(f"{folder.path} is not a results folder (no {JOB_FILE}).")
    done, state = folder.done(), folder.state()
    missing = [i for i in range(job["chunks"]) if i not in done]
    if missing:
        failed = [i for i in missing if state.get(i, {}).get("status") == "failed"]
        raise ValueError(
            f"{folder.path}: {len(missing)} of {job['chunks']} chunks are not done "
            f"({len(failed)} failed: {failed[:5]}); rerun the job to finish them"
        )
    return combine_results([folder.read_chunk(i) for i in range(job["chunks"])])


#: The fields every manifest line has, and those of a chunk done.
ENTRY_FIELDS = ("chunk", "start", "stop", "input", "status")
DONE_FIELDS = ("counts",)


def _entry_problem(entry: Any) -> str:
    """What is wrong with one parsed manifest line ("" when nothing)."""
    if not isinstance(entry, dict):
        return f"a JSON {type(entry).__name__}, not an object"
    need = ENTRY_FIELDS + (DONE_FIELDS if entry.get("status") == "done" else ())
    missing = [k for k in need if k not in entry]
    if missing:
        return f"no {', '.join(map(repr, missing))}"
    positions = ("chunk", "start", "stop")
    if not all(isinstance(entry[k], int) and not isinstance(entry[k], bool) and entry[k] >= 0
               for k in positions):
        return f"{', '.join(positions)} must be integers >= 0"
    if not isinstance(entry["status"], str):
        return "its status must be a string"
    return ""


def _intact(path: Path) -> bool:
    """Whether `path` is a whole .npz file: every member there, its CRC right."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, EOFError, zipfile.BadZipFile):
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}-{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _identity(value: Any) -> Any:
    """The part of a job.json entry that must agree ("fingerprint" where there is one)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "description"}
    return value


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        text = value.get("description", "")
        fp = value.get("fingerprint") or value.get("first_chunk", "")
        shape = f" of shape {tuple(value['shape'])}, {value['dtype']}" if "shape" in value else ""
        return f"{text}{shape} ({str(fp)[:12]})".strip()
    return repr(value)
