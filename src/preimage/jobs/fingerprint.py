"""Content fingerprints: a network, the settings of a job, the rows of a chunk.

A results folder records what its results were computed from, so that a
rerun with another model, other settings or other data is refused rather
than mixed in. Fingerprints are SHA-256 digests of the content itself (the
weights' bytes, not the objects' identities or file names):

- arrays: dtype, shape and the bytes in C order; ``scipy.sparse`` matrices:
  their CSR arrays; torch tensors: as NumPy arrays;
- dataclasses (`Network`, `Layer`, `Activation`, `GlobalSettings`): class and
  fields; other objects (the structured operators): class and public
  attributes, or, with none (`DenseOperator`), their ``matrix()``;
- numbers by ``repr`` (exact for floats), strings, None, tuples, lists and
  dicts (keys sorted).

Private attributes are left out: they are caches built on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np


def fingerprint(obj: Any) -> str:
    """The SHA-256 hex digest of obj's content (module docstring)."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def rows_digest(rows: np.ndarray) -> str:
    """The digest of a chunk of observations (dtype, shape and bytes)."""
    digest = hashlib.sha256()
    _feed_array(digest, rows)
    return digest.hexdigest()


def _feed_array(digest: Any, a: np.ndarray) -> None:
    digest.update(f"ndarray {a.dtype.str} {a.shape};".encode())
    digest.update(memoryview(np.ascontiguousarray(a)).cast("B"))


def _feed(digest: Any, obj: Any) -> None:
    if obj is None or isinstance(obj, (bool, int, float, complex, str)):
        digest.update(f"{type(obj).__name__} {obj!r};".encode())
    elif isinstance(obj, (np.ndarray, np.generic)):
        if np.asarray(obj).dtype.hasobject:
            _feed(digest, np.asarray(obj).tolist())
        else:
            _feed_array(digest, np.asarray(obj))
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)}[".encode())
        for item in obj:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)}{{".encode())
        for key in sorted(obj, key=str):
            _feed(digest, str(key))
            _feed(digest, obj[key])
        digest.update(b"}")
    elif _is_sparse(obj):
        csr = obj.tocsr()
        digest.update(f"sparse {csr.shape};".encode())
        for part in (csr.data, csr.indices, csr.indptr):
            _feed_array(digest, part)
    elif type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "numpy"):
        _feed(digest, obj.detach().cpu().numpy())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _feed(digest, _qualname(obj))
        _feed(digest, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    else:
        public = {k: v for k, v in getattr(obj, "__dict__", {}).items() if not k.startswith("_")}
        if public:
            _feed(digest, _qualname(obj))
            _feed(digest, public)
        elif callable(getattr(obj, "matrix", None)):
            _feed(digest, _qualname(obj))
            _feed(digest, obj.matrix())
        else:
            raise TypeError(f"Cannot fingerprint a {_qualname(obj)}: it has no public content.")


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_sparse(obj: Any) -> bool:
    from scipy import sparse

    return bool(sparse.issparse(obj))
