"""One storage layer for local folders and S3 (or MinIO, Ceph: anything that speaks the S3 API).

Every path in kubellama is a URL handed to these functions. S3 endpoint and credentials come from the standard AWS
environment variables (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION), so the same code runs against AWS, MinIO and the moto server the tests start.

Atomicity, from a reader's view:
- a single object is written to a temporary name and moved into place (local: os.replace) or uploaded in one
  PUT / multipart upload that S3 only shows once complete;
- a folder of many objects (a checkpoint, a shard set) counts as complete only once its `_COMPLETE` marker exists,
  written last. Readers call `is_complete` and ignore folders without it.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import trust

COMPLETE = "_COMPLETE"


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`: the S3 endpoint from the environment, so MinIO and moto work unchanged."""
    if is_remote(url) and url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {"skip_instance_cache": True}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(url, **storage_options(url))
    return fs, path


def join(url: str, *parts: str) -> str:
    if is_remote(url):
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    # S3 has no folders; creating one would make an empty marker object some tools trip over.
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under `url`, sorted; [] when it does not exist."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = sorted({posixpath.basename(e.rstrip("/")) for e in entries})
    return [n for n in names if n]


def glob(url: str) -> list[str]:
    fs, path = filesystem(url)
    found = sorted(fs.glob(path))
    if is_remote(url):
        proto = url.split("://", 1)[0]
        return [f"{proto}://{p}" for p in found]
    return found


def open_file(url: str, mode: str = "rb", **kwargs: Any) -> IO:
    fs, path = filesystem(url)
    return fs.open(path, mode, **kwargs)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open `url` for writing so that readers see either the old object, or the whole new one; never a part.

    On an exception nothing is published. Locally the data goes to a hidden temporary file in the same folder and
    is renamed into place after fsync; on S3 the upload only becomes visible when it completes.
    """
    fs, path = filesystem(url)
    if not is_remote(url):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        f = open(tmp, mode)  # noqa: SIM115 (closed in finally)
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        return
    f = fs.open(path, mode)
    try:
        yield f
    except BaseException:
        # s3fs uploads on close; discarding aborts the multipart upload so no partial object appears.
        with contextlib.suppress(Exception):
            f.discard()
            f.closed = True  # so the file's finaliser does not try to upload the discarded buffer
        raise
    f.close()


def write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url, "wb") as f:
        f.write(data)


def read_bytes(url: str) -> bytes:
    with open_file(url, "rb") as f:
        return f.read()


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(url: str) -> Any:
    try:
        return json.loads(read_text(url))
    except ValueError as exc:  # bad JSON or bad UTF-8: one line naming the file, not a traceback
        raise KubellamaError(f"{url}: not valid JSON ({exc})") from None


def read_jsonl(url: str, keys: tuple[str, ...] = ()) -> list[dict]:
    """The records of JSONL file `url`; each must be an object holding `keys`. A bad line is one error naming the
    file and line, not a traceback from deep in a resume."""
    out = []
    for n, line in enumerate(read_text(url).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise KubellamaError(f"{url}:{n}: not valid JSON ({exc})") from None
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            raise KubellamaError(f"{url}:{n}: not a record with {', '.join(map(repr, keys)) or 'fields'}")
        out.append(rec)
    return out


def mark_complete(folder: str, info: dict | None = None) -> None:
    """Publish a multi-object folder; call after every object in it is written."""
    write_json(join(folder, COMPLETE), info or {})


def is_complete(folder: str) -> bool:
    return exists(join(folder, COMPLETE))


def put_dir(local: str, url: str) -> None:
    """Upload a local folder's files to `url` (a no-op copy when both are local and equal)."""
    if not is_remote(url):
        if os.path.abspath(local) != os.path.abspath(url):
            import shutil

            shutil.copytree(local, url, dirs_exist_ok=True)
        return
    fs, path = filesystem(url)
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local).replace(os.sep, "/")
            fs.put_file(src, posixpath.join(path, rel))


def get_dir(url: str, local: str) -> str:
    """Make the folder at `url` available locally; returns a local path (the same one when `url` is local)."""
    if not is_remote(url):
        return url
    fs, path = filesystem(url)
    os.makedirs(local, exist_ok=True)
    for src in fs.find(path):
        rel = posixpath.relpath(src, path)
        # Object keys are names from storage: a key with `..` in it must not write outside `local`.
        dst = os.path.join(local, *(trust.safe_name(part, url) for part in rel.split("/")))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(src, dst)
    return local
