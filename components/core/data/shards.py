"""Packed token shards: the format data prep writes and every trainer streams. A shard set is a folder (local or
s3://) of `shard_00000.bin` rows of `seq_len` token ids (uint16/uint32, little-endian), optional aligned side arrays
(`shard_00000.<field>.bin`), `manifest.json` (dtype, seq_len, rows and sha256 per shard) and `_COMPLETE`, written last.
ShardReader deals rows to ranks round-robin in blocks (a W-rank run sees the rows a 1-rank run sees); Prefetcher reads
ahead in a thread; BatchSource is what the trainer reads from."""
from __future__ import annotations

import hashlib
import os
import queue
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import numpy as np

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage, trust

FORMAT = "kubellama-shards/1"
# Token and side-array dtypes a manifest may name: integers, as ShardWriter writes them.
_INT_DTYPES = {np.dtype(f"<{kind}{size}").str for kind in "iu" for size in (1, 2, 4, 8)}


class BatchSource(Protocol):
    """What the trainer reads rows from: ShardReader, EpochReader, Prefetcher, or any resumable reader alike."""

    seq_len: int

    def next_batch(self, rows: int) -> dict[str, np.ndarray]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class ShardWriter:
    """Writes rows of `seq_len` tokens into shards of at most `shard_rows` rows, then publishes the manifest.

    Rows are spooled to local temporary files, not kept in memory, so memory stays flat whatever the shard size
    (100M tokens by default: 200 MB); each shard is uploaded atomically once full.
    """

    def __init__(self, url: str, seq_len: int, vocab_size: int, shard_rows: int = 65536,
                 fields: dict[str, str] | None = None, spool_dir: str | None = None):
        self.url, self.seq_len, self.shard_rows = url, seq_len, max(1, shard_rows)
        self.dtype = token_dtype(vocab_size)
        # Side arrays and their dtypes, e.g. {"labels": "<i4"}.
        self.fields = {k: np.dtype(v) for k, v in (fields or {}).items()}
        self.shards: list[dict[str, Any]] = []
        self._rows = 0
        self._dir = tempfile.TemporaryDirectory(prefix="kubellama-spool-", dir=spool_dir)
        self._files: dict[str, Any] = {}
        self._sha = hashlib.sha256()
        storage.remove(storage.join(url, storage.COMPLETE))
        storage.makedirs(url)

    def _spool(self, suffix: str) -> Any:
        if suffix not in self._files:
            self._files[suffix] = open(os.path.join(self._dir.name, "shard" + suffix), "w+b")  # noqa: SIM115 (open until close)
        return self._files[suffix]

    def add(self, rows: np.ndarray, **side: np.ndarray) -> None:
        rows = np.asarray(rows).reshape(-1, self.seq_len)
        if set(side) != set(self.fields):
            raise ValueError(f"side arrays {sorted(side)} do not match declared fields {sorted(self.fields)}")
        side = {k: np.asarray(v).reshape(rows.shape) for k, v in side.items()}
        start = 0
        while start < len(rows):
            take = min(len(rows) - start, self.shard_rows - self._rows)
            data = rows[start:start + take].astype(self.dtype).tobytes()
            self._spool(".bin").write(data)
            self._sha.update(data)
            for k, v in side.items():
                self._spool(f".{k}.bin").write(v[start:start + take].astype(self.fields[k]).tobytes())
            self._rows += take
            start += take
            if self._rows == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if self._rows == 0:
            return
        name = f"shard_{len(self.shards):05d}"
        for suffix in [".bin"] + [f".{k}.bin" for k in self.fields]:
            f = self._files.pop(suffix)
            f.seek(0)
            with storage.atomic_write(storage.join(self.url, name + suffix)) as out:
                shutil.copyfileobj(f, out, 1 << 22)
            f.close()
        self.shards.append({"name": name, "rows": int(self._rows), "sha256": self._sha.hexdigest()})
        self._sha = hashlib.sha256()
        self._rows = 0

    def close(self, **meta: Any) -> dict[str, Any]:
        try:
            self._flush()
            manifest = {
                "format": FORMAT,
                "dtype": self.dtype.str,
                "seq_len": self.seq_len,
                "fields": {k: v.str for k, v in self.fields.items()},
                "shards": self.shards,
                "rows": sum(s["rows"] for s in self.shards),
                "tokens": sum(s["rows"] for s in self.shards) * self.seq_len,
                **meta,
            }
            storage.write_json(storage.join(self.url, "manifest.json"), manifest)
            storage.mark_complete(self.url, {"rows": manifest["rows"]})
            return manifest
        finally:
            self._dir.cleanup()


def read_manifest(url: str) -> dict[str, Any]:
    if not storage.is_complete(url):
        raise KubellamaError(f"token shards at {url} are incomplete or missing (no {storage.COMPLETE} marker)")
    where = storage.join(url, "manifest.json")
    manifest = storage.read_json(where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise KubellamaError(f"{where}: unknown format {found!r}, expected {FORMAT}")
    # Everything a reader turns into paths, dtypes and offsets is checked here: the manifest may come from anyone
    # who can write to the bucket, and a name like `../x` or `s3://other/x` would make it read another object.
    fields = manifest.get("fields", {})
    shards = manifest.get("shards")
    if not isinstance(fields, dict) or not isinstance(shards, list):
        raise trust.Refused(f"{where}: 'fields' must be a mapping and 'shards' a list")
    for dtype in [manifest.get("dtype"), *fields.values()]:
        if not isinstance(dtype, str) or dtype not in _INT_DTYPES:
            raise trust.Refused(f"{where}: dtype {dtype!r} is not one of {sorted(_INT_DTYPES)}")
    seq_len = manifest.get("seq_len")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise trust.Refused(f"{where}: seq_len {seq_len!r} is not a positive integer")
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("rows"), int) or s["rows"] < 0:
            raise trust.Refused(f"{where}: shard entry {s!r} needs a name and a row count")
        name = trust.safe_name(s.get("name"), where)
        for k in fields:
            trust.safe_name(f"{name}.{k}.bin", where)
    return manifest


@dataclass
class ShardReader:
    """Streams one rank's rows of a shard set, memory-mapped locally, by ranged reads on S3; resumable.

    Rows are dealt to ranks in blocks of `block` rows, round-robin: block k of rank r is global block k·W + r. With
    `block` equal to the micro-batch each batch is one contiguous read (one ranged GET on S3), and the rows of one
    global batch are the same whatever the number of ranks.

    With `verify`, the first time this reader touches a shard it hashes the whole shard file (streamed, a few
    seconds for a 200 MB shard even from S3) against the manifest's sha256; shards this rank never reaches are never
    read. A mismatch raises, naming the shard.
    """

    url: str
    rank: int = 0
    world_size: int = 1
    block: int = 1
    # Rows this rank has consumed so far (across epochs); the whole reader state.
    position: int = 0
    verify: bool = True
    manifest: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.manifest = read_manifest(self.url)
        self.seq_len = int(self.manifest["seq_len"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.fields = {k: np.dtype(v) for k, v in self.manifest.get("fields", {}).items()}
        self._starts = np.cumsum([0] + [s["rows"] for s in self.manifest["shards"]])
        self.total_rows = int(self._starts[-1])
        if self.rows_per_rank == 0:
            raise KubellamaError(f"{self.url}: {self.total_rows} rows cannot feed {self.world_size} ranks "
                                 f"in blocks of {self.block}")
        self._maps: dict[str, np.ndarray] = {}
        self._remote = storage.is_remote(self.url)
        # One client for the reader's life: a new one per read would reconnect on every batch.
        self._fs, self._root = storage.filesystem(self.url)
        self._verified: set[int] = set()

    @property
    def rows_per_rank(self) -> int:
        # A remainder that doesn't fill a block on every rank is dropped so all ranks step through the same rows.
        return self.total_rows // (self.world_size * self.block) * self.block

    def _path(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{name}"

    def _check(self, shard: int) -> None:
        """Hash shard `shard` against the manifest, once per reader."""
        if not self.verify or shard in self._verified:
            return
        entry = self.manifest["shards"][shard]
        url = storage.join(self.url, entry["name"] + ".bin")
        if "sha256" not in entry:
            raise KubellamaError(f"{storage.join(self.url, 'manifest.json')}: shard {entry['name']} has no sha256 "
                                 f"to verify {url} against")
        sha = hashlib.sha256()
        with self._fs.open(self._path(entry["name"] + ".bin"), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
        if sha.hexdigest() != entry["sha256"]:
            raise KubellamaError(f"{url}: sha256 {sha.hexdigest()} differs from {entry['sha256']} in the manifest: "
                                 f"shard {entry['name']} is corrupt or was modified after it was written")
        self._verified.add(shard)

    def _read(self, start: int, n: int, suffix: str, dtype: np.dtype) -> np.ndarray:
        """Global rows [start, start + n): one slice (local memmap) or one ranged read (S3) per shard touched."""
        parts = []
        while n > 0:
            shard = int(np.searchsorted(self._starts, start, side="right") - 1)
            local = start - int(self._starts[shard])
            take = min(n, int(self._starts[shard + 1]) - start)
            self._check(shard)
            name = self.manifest["shards"][shard]["name"] + suffix
            if self._remote:
                width = self.seq_len * dtype.itemsize
                data = self._fs.cat_file(self._path(name), start=local * width, end=(local + take) * width)
                parts.append(np.frombuffer(data, dtype=dtype).reshape(take, self.seq_len))
            else:
                if name not in self._maps:
                    self._maps[name] = np.memmap(self._path(name), dtype=dtype, mode="r").reshape(-1, self.seq_len)
                parts.append(np.array(self._maps[name][local:local + take]))
            start, n = start + take, n - take
        return np.concatenate(parts)

    def row(self, index: int) -> dict[str, np.ndarray]:
        """Global row `index`: tokens plus side arrays."""
        return {k: v[0] for k, v in self._rows(index, 1).items()}

    def _rows(self, start: int, n: int) -> dict[str, np.ndarray]:
        out = {"tokens": self._read(start, n, ".bin", self.dtype)}
        for k, dt in self.fields.items():
            out[k] = self._read(start, n, f".{k}.bin", dt)
        return out

    def global_index(self, position: int) -> int:
        block, j = divmod(position % self.rows_per_rank, self.block)
        return (block * self.world_size + self.rank) * self.block + j

    def next_batch(self, batch: int) -> dict[str, np.ndarray]:
        index = [self.global_index(self.position + i) for i in range(batch)]
        self.position += batch
        # Read contiguous runs of global rows at once.
        runs: list[tuple[int, int]] = []
        for i in index:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        chunks = [self._rows(start, n) for start, n in runs]
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Positions count rows per rank; on a different world size, keep the global row count consumed.
        consumed = int(state["position"]) * int(state.get("world_size", self.world_size))
        self.position = consumed // self.world_size


def _read_ahead(source: BatchSource, rows: int, out: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: batches with the source state after each, or the exception that ended it."""
    while not stop.is_set():
        try:
            item: tuple[Any, ...] = (source.next_batch(rows), source.state_dict())
        except BaseException as exc:  # handed to the consumer, which re-raises it  # noqa: BLE001
            item = (exc,)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if len(item) == 1:
            return


class Prefetcher:
    """Reads `depth` batches ahead of the caller in a background thread (S3 reads, shard verification and copies
    overlap the training step), while `state_dict()` stays the position after the batches actually handed out: a
    checkpoint resumes at the first batch the trainer has not consumed, never past the read-ahead.

    Batches come out in the source's order. The thread reads ahead at the row count of the last call; another row
    count, `load_state_dict` or an error drops what was read ahead and rewinds the source to the consumed position.
    An exception in the thread is raised by the `next_batch` call that would have returned that batch; calling
    again retries from there.
    """

    def __init__(self, source: BatchSource, depth: int = 2):
        self.source, self.depth = source, max(1, depth)
        self.seq_len = source.seq_len
        self._state = source.state_dict()
        self._rows: int | None = None
        self._queue: queue.Queue = queue.Queue(self.depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The thread holds no reference to self, so a Prefetcher dropped without close() still stops its thread.
        weakref.finalize(self, self._stop.set)

    def _start(self, rows: int) -> None:
        self._rows, self._queue = rows, queue.Queue(self.depth)
        self._thread = threading.Thread(target=_read_ahead, args=(self.source, rows, self._queue, self._stop),
                                        name="kubellama-prefetch", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        """Stop the thread and rewind the source to what was handed out."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._stop.clear()
        self._thread, self._rows = None, None
        self.source.load_state_dict(self._state)

    def next_batch(self, rows: int) -> dict[str, np.ndarray]:
        if rows != self._rows:
            self._halt()
            self._start(rows)
        item = self._queue.get()
        if len(item) == 1:
            self._halt()
            raise item[0]
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._halt()
        self.source.load_state_dict(state)
        self._state = self.source.state_dict()

    def close(self) -> None:
        self._halt()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
