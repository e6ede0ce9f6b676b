"""DCP checkpoints read without trusting them (the trust boundary: core/io/trust.py).

Torch's FsspecReader unpickles `.metadata` with plain `pickle.load`, and its default planner unpickles the
non-tensor values of a state dict (optimizer hyperparameters) with `torch.load(weights_only=False)`: a crafted
checkpoint could run code on whoever loads it. `SafeReader` is that reader with `.metadata` read through an
allowlist unpickler, the file names it lists checked, and non-tensor values loaded weights-only (tensors already
are).
"""
from __future__ import annotations

import dataclasses
import io
import pickle
import re
from typing import IO, Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.io.trust import Refused, one_line, safe_name

# What DCP's `.metadata` pickle is made of (torch 2.x FileSystemWriter and FsspecWriter, any world size, FSDP2
# DTensor shards included): its metadata dataclasses, the storage entries, sizes, dtypes and layouts. Containers
# need no global: pickle protocol 4 (DCP's) has opcodes for lists, tuples, dicts and sets.
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    # torch.layout pickles as a lookup by name in torch's own table of layouts.
    ("torch.serialization", "_get_layout"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise Refused(f"{self.where}: refused to unpickle {f'{module}.{name}'!r} (DCP metadata holds only checkpoint "
                      f"metadata types; this file could run code)")


class _TensorsOnly:
    """A load planner whose non-tensor values are unpickled with weights_only=True (DCP's own planner uses
    weights_only=False). The value is re-saved from what the safe load built, so the planner only ever sees bytes
    made here."""

    def __init__(self, planner: LoadPlanner, reader: SafeReader):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise self._reader.refuse(f"{self._reader.url}: value {read_item.dest_index.fqn!r} is not plain data "
                                      f"({one_line(exc)})") from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


class SafeReader(FsspecReader):
    """FsspecReader that reads `.metadata` with an allowlist unpickler, checks the file names it lists, and loads
    non-tensor values weights-only."""

    def __init__(self, url: str):
        super().__init__(url, **storage.storage_options(url))
        self.url = url
        # The first refusal, kept because DCP turns reader errors into its own (and retries read_metadata).
        self.refusal: Refused | None = None

    def refuse(self, message: str) -> Refused:
        self.refusal = self.refusal or Refused(message)
        return self.refusal

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        # FileSystemReader.read_metadata with the pickle.load replaced.
        path = self._get_metadata_path(kwargs.get("rank"))
        where = storage.join(self.url, str(path).rsplit("/", 1)[-1])
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(cast(IO[bytes], f), where).load()
        except Refused as exc:
            raise self.refuse(str(exc)) from None
        except Exception as exc:  # noqa: BLE001
            raise self.refuse(f"{where}: not DCP checkpoint metadata ({one_line(exc)})") from None
        if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
            raise self.refuse(f"{where}: not DCP checkpoint metadata (a {type(metadata).__name__})")
        for info in metadata.storage_data.values():
            if not isinstance(info, _StorageInfo):
                raise self.refuse(f"{where}: not DCP checkpoint metadata (storage entry {type(info).__name__})")
            try:
                safe_name(info.relative_path, where)
            except Refused as exc:
                raise self.refuse(str(exc)) from None
        # A metadata file pickled by an older torch may lack the attribute.
        storage_meta = getattr(metadata, "storage_meta", None) or dcp_metadata.StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        # One file at a time, so that a tensor slot weights-only loading refuses (a pickle where a tensor should be)
        # is reported with the file it came from, as untrusted content rather than as a model mismatch.
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        safe = _TensorsOnly(planner, self)
        fut = None
        for name, items in per_file.items():
            try:
                fut = super().read_data(dataclasses.replace(plan, items=items), safe)  # type: ignore[arg-type]
            except pickle.UnpicklingError as exc:
                # torch's message is advice on loading it unsafely; keep only what it refused.
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
                what = f"a pickle of {found.group(1)!r}, which could run code" if found else one_line(exc)
                raise self.refuse(f"{storage.join(self.url, name)}: refused as untrusted content (a tensor slot "
                                  f"holds {what})") from None
        return fut if fut is not None else super().read_data(plan, safe)  # type: ignore[arg-type]


def load(state: dict[str, Any], url: str, failure: str = "cannot load the checkpoint",
         planner: LoadPlanner | None = None) -> None:
    """dcp.load of `state` from `url` through SafeReader. A refusal, or any failure of DCP (`failure` says what it
    means to the caller), comes out as one KubellamaError line."""
    r = SafeReader(url)
    # Read once before DCP does: a refusal surfaces here as itself, not after DCP logged it and retried.
    r.read_metadata()
    try:
        dcp.load(state, storage_reader=r, planner=planner)
    except CheckpointException as exc:  # a BaseException wrapping every rank's error
        errors = [e for e, _ in exc.failures.values()]
        refused = next((e for e in errors if isinstance(e, Refused)), None) or r.refusal
        if refused is not None:
            raise Refused(str(refused)) from None
        reasons = "; ".join(dict.fromkeys(one_line(e) for e in errors)) or "no reason given"
        raise KubellamaError(f"{url}: {failure} ({reasons})") from None


def reader(url: str) -> SafeReader:
    """A DCP storage reader for checkpoint `url` that cannot be made to run code or read outside the folder."""
    return SafeReader(url)
