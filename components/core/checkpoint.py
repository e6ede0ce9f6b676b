"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), at any fsspec URL.

Layout under `<output>/checkpoints/step_0000100/`:
- the DCP files: model and optimizer state, one file per rank plus `.metadata`, written through fsspec so the same
  code writes a local folder or s3://;
- `trainer.json`: step, scheduler, data reader position, world size (rank 0; the same on every rank);
- `rng_<rank>.pt`: each rank's RNG states;
- `_COMPLETE`, written by rank 0 after every rank finished: a folder without it (a save cut short by SIGKILL or a
  node loss) is never picked for resume and is deleted by the next successful save.

DCP stores tensors by fully qualified name with their global shape, so a checkpoint written on W ranks loads on any
other number of ranks: every rank reads the slices its own shards need.
"""
from __future__ import annotations

import io
import re
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from components.core import dist, storage, trust

PREFIX = "step_"
_NAME = re.compile(r"^step_(\d+)$")


def folder(root: str, step: int) -> str:
    return storage.join(root, f"{PREFIX}{step:07d}")


def steps(root: str) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps under `root`, ascending."""
    done, partial = [], []
    for name in storage.listdir(root):
        m = _NAME.match(name)
        if m:
            step = int(m.group(1))
            (done if storage.is_complete(storage.join(root, name)) else partial).append(step)
    return sorted(done), sorted(partial)


def latest(root: str) -> str | None:
    done, _ = steps(root)
    return folder(root, done[-1]) if done else None


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    # Only tensors, lists and numbers, so loading needs no pickle of arbitrary objects (weights_only=True): a
    # checkpoint bucket must not be a way to run code.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next],
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: str, step: int, tensors: dict[str, Any], meta: dict[str, Any], env: dist.Env, keep: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint URL once it is complete."""
    url = folder(root, step)
    if env.lead and storage.exists(url):
        # Leftovers of a save that was cut short at this same step (before a restart): start clean.
        storage.remove(url, recursive=True)
    dist.barrier()
    dcp.save(tensors, storage_writer=FsspecWriter(url, **storage.storage_options(url)))
    buf = io.BytesIO()
    torch.save(_rng_state(), buf)
    storage.write_bytes(storage.join(url, f"rng_{env.rank}.pt"), buf.getvalue())
    if env.lead:
        storage.write_json(storage.join(url, "trainer.json"), {**meta, "step": step, "world_size": env.world_size})
    dist.barrier()
    if env.lead:
        storage.mark_complete(url, {"step": step, "world_size": env.world_size})
        prune(root, keep)
    dist.barrier()
    return url


def prune(root: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and leftovers of interrupted saves."""
    done, partial = steps(root)
    newest = done[-1] if done else -1
    drop = done[:-keep] if keep > 0 else []
    # A partial folder older than the newest complete one is a dead save; a newer one cannot exist here because
    # saves are collective and this runs after the barrier.
    drop += [s for s in partial if s < newest]
    for step in drop:
        storage.remove(folder(root, step), recursive=True)


def load(url: str, tensors: dict[str, Any], env: dist.Env) -> dict[str, Any]:
    """Collective: fill `tensors` in place from checkpoint `url`; restore RNG; return trainer.json."""
    trust.load(tensors, url)
    meta_url = storage.join(url, "trainer.json")
    meta = storage.read_json(meta_url)
    saved = meta.get("world_size", 1) if isinstance(meta, dict) else None
    if not isinstance(saved, int) or saved < 1:
        raise trust.Refused(f"{meta_url}: not a trainer state (world_size {saved!r})")
    # RNG streams are per rank; on a different world size rank r continues rank (r mod saved world size)'s stream.
    rng_url = storage.join(url, f"rng_{env.rank % saved}.pt")
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(rng_url)), weights_only=True)
        _set_rng_state(state)
    except Exception as exc:
        raise trust.Refused(f"{rng_url}: not an RNG state of plain tensors and numbers ({trust.one_line(exc)})") \
            from None
    return meta


def load_model(url: str, model_cfg: Any) -> Any:
    """The model weights of training checkpoint `url` (any world size) as a plain Llama, without a process group:
    what `kubellama export-hf --checkpoint` converts."""
    from components.core.errors import KubellamaError
    from components.core.model import Llama

    if not storage.is_complete(url):
        found = latest(url)
        if found is None:
            raise KubellamaError(f"{url}: not a complete training checkpoint (no {storage.COMPLETE} marker) and no "
                                 f"{PREFIX}* checkpoint below it")
        url = found
    model = Llama(model_cfg)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        # Loading without a process group is the point here, not an accident to warn about.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        trust.load(state, url, failure=f"checkpoint does not match model '{model_cfg.name}'")
    model.load_state_dict(state["model"])
    return model.eval()
