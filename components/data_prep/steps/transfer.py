"""How the fan-out's steps hand files to each other in storage: ranged reads, whole-file publishing, npz."""
from __future__ import annotations

import io
import itertools
import os
import shutil
from typing import Any

import numpy as np

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage

_CLIENTS: dict[str, Any] = {}


def _filesystem(url: str) -> tuple[Any, str]:
    """storage.filesystem, with one S3 client per bucket and process: reducers and packers make a ranged read per
    worker and partition or group, and a new client each time costs more than the read."""
    if not storage.is_remote(url):
        return storage.filesystem(url)
    bucket = url.split("/", 3)[2]
    key = url.split("://", 1)[0] + "://" + bucket
    if key not in _CLIENTS:
        _CLIENTS[key] = storage.filesystem(url)[0]
    fs = _CLIENTS[key]
    return fs, fs._strip_protocol(url)


def publish_file(local: str, url: str) -> None:
    """Move a finished local file to `url` (a rename when local; one upload on S3)."""
    if storage.is_remote(url):
        fs, path = _filesystem(url)
        fs.put_file(local, path)
        return
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    shutil.move(local, url)


def read_range(url: str, dtype: Any, start: int, stop: int) -> np.ndarray:
    """Records [start, stop) of a file of fixed-size records (one ranged read)."""
    dtype = np.dtype(dtype)
    if stop <= start:
        return np.zeros(0, dtype=dtype)
    fs, path = _filesystem(url)
    return np.frombuffer(fs.cat_file(path, start=start * dtype.itemsize, end=stop * dtype.itemsize), dtype=dtype)


def read_rows(url: str, rows: np.ndarray, width: int) -> np.ndarray:
    """uint32 rows (sorted row numbers) of a file of rows of `width` uint32s: one read per run of consecutive rows
    (local reads, not a memory map: mapped pages would count as the process's memory)."""
    if not len(rows):
        return np.zeros((0, width), dtype=np.uint32)
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    spans = [(int(r[0]) * width * 4, (int(r[-1]) + 1) * width * 4) for r in np.split(rows, cut)]
    if storage.is_remote(url):
        fs, path = _filesystem(url)
        data = fs.cat_ranges([path] * len(spans), [a for a, _ in spans], [b for _, b in spans])
    else:
        fd = os.open(url, os.O_RDONLY)
        try:
            data = [os.pread(fd, b - a, a) for a, b in spans]
        finally:
            os.close(fd)
    return np.frombuffer(b"".join(data), dtype=np.uint32).reshape(-1, width)


def copy_range(url: str, start: int, stop: int, out: Any, block: int = 1 << 20) -> None:
    """Bytes [start, stop) of `url` appended to the open file `out`, a block at a time."""
    if stop <= start:
        return
    fs, path = _filesystem(url)
    with fs.open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            data = f.read(min(block, left))
            if not data:
                raise KubellamaError(f"{url} is shorter than its layout says ({stop} bytes)")
            out.write(data)
            left -= len(data)


def save_npz(url: str, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(url, buf.getvalue())


def load_npz(url: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(url))) as z:
        return {k: z[k] for k in z.files}


def chunks(lengths: np.ndarray, budget: int = 1 << 20) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive documents of about `budget` tokens each (at least one document): what a
    step holds of a token stream at a time."""
    if not len(lengths):
        return []
    ends = np.cumsum(lengths, dtype=np.int64)
    cuts = np.unique(np.searchsorted(ends, np.arange(budget, int(ends[-1]), budget), side="right"))
    bounds = [0, *[int(c) for c in cuts if 0 < c < len(lengths)], len(lengths)]
    return list(itertools.pairwise(bounds))
