"""Training checkpoints on disk with torch.distributed.checkpoint (DCP), at any fsspec URL: under
`checkpoints/step_0000100/` the DCP files (loadable on any world size), `trainer.json` (step, scheduler, data
position, world size), `rng_<rank>.pt`, and `_COMPLETE` written last by rank 0 (a folder without it is never resumed
and is deleted by the next save). Also the readers of `<stage>.init` weights and of a checkpoint as a plain Llama."""
from __future__ import annotations

import io
import random
import re
import warnings
from typing import Any, cast

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage, trust
from kubellama.components.core.model.hf import read_into
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.train import dist, safe_dcp
from kubellama.conf.schema.model import ModelConfig

PREFIX = "step_"
_NAME = re.compile(r"^step_(\d+)$")


def folder(root: str, step: int) -> str:
    return storage.join(root, f"{PREFIX}{step:07d}")


def steps(root: str) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps under `root`, ascending."""
    done: list[int] = []
    partial: list[int] = []
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
    # Only tensors, lists and numbers, so loading needs no pickle of arbitrary objects (weights_only=True): a
    # checkpoint bucket must not be a way to run code.
    name, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next],
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Pending:
    """A checkpoint being written in the background (DCP async_save). `done()` is local; `finish()` is collective:
    it waits for every rank's writes, then rank 0 writes `_COMPLETE` (last, so a cut-short save is never read)."""

    def __init__(self, root: str, url: str, step: int, future: Any, env: dist.Env, keep: int):
        self.root, self.url, self.step, self.future, self.env, self.keep = root, url, step, future, env, keep

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def finish(self) -> str:
        if self.future is not None:
            self.future.result()
        dist.barrier()
        if self.env.lead:
            storage.mark_complete(self.url, {"step": self.step, "world_size": self.env.world_size})
            prune(self.root, self.keep)
        dist.barrier()
        return self.url


def save(root: str, step: int, tensors: dict[str, Any], meta: dict[str, Any], env: dist.Env, keep: int,
         background: bool = False) -> Pending:
    """Collective: every rank calls it. The small files (trainer.json, RNG) are written now; the tensors too, or,
    with `background`, by DCP's async_save once they are staged in host memory. Call `finish()` on the result."""
    url = folder(root, step)
    if env.lead and storage.exists(url):
        # Leftovers of a save that was cut short at this same step (before a restart): start clean.
        storage.remove(url, recursive=True)
    dist.barrier()
    writer = FsspecWriter(url, **storage.storage_options(url))
    future = None
    if background:
        future = dcp.async_save(tensors, storage_writer=writer, process_group=dist.checkpoint_group())
    else:
        dcp.save(tensors, storage_writer=writer)
    buf = io.BytesIO()
    torch.save(_rng_state(), buf)
    storage.write_bytes(storage.join(url, f"rng_{env.rank}.pt"), buf.getvalue())
    if env.lead:
        storage.write_json(storage.join(url, "trainer.json"), {**meta, "step": step, "world_size": env.world_size})
    return Pending(root, url, step, future, env, keep)


def meta(url: str) -> dict[str, Any]:
    """trainer.json of checkpoint `url`: step, world size, fingerprint, scheduler and data position. Its shape is
    checked here, once, so a hand-edited or foreign file is one line, not a KeyError deep in a resume."""
    where = storage.join(url, "trainer.json")
    info = storage.read_json(where)
    if not isinstance(info, dict):
        raise trust.Refused(f"{where}: not a trainer state (a {type(info).__name__}, not an object)")
    for key, kind in (("step", int), ("world_size", int), ("fingerprint", dict), ("scheduler", dict),
                      ("data", dict)):
        if key in info and info[key] is not None and not isinstance(info[key], kind):
            what = "an int" if kind is int else "an object"
            raise trust.Refused(f"{where}: not a trainer state ({key!r} is not {what})")
    if not isinstance(info.get("step"), int) or info["step"] < 0:
        raise trust.Refused(f"{where}: not a trainer state (no step)")
    if info.get("world_size") is not None and info["world_size"] < 1:  # it picks the RNG file to restore
        raise trust.Refused(f"{where}: not a trainer state (world_size {info['world_size']!r})")
    return info


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
    safe_dcp.load(tensors, url)
    info = meta(url)
    saved = info.get("world_size") or 1
    # RNG streams are per rank; on a different world size rank r continues rank (r mod saved world size)'s stream.
    rng_url = storage.join(url, f"rng_{env.rank % saved}.pt")
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(rng_url)), weights_only=True)
        _set_rng_state(state)
    except Exception as exc:  # noqa: BLE001
        raise trust.Refused(f"{rng_url}: not an RNG state of plain tensors and numbers ({trust.one_line(exc)})") \
            from None
    return info


def resolve(url: str) -> tuple[str, str]:
    """(kind, url) of a weights source given as `<stage>.init`: ("dcp", a complete step folder) for a step folder,
    a checkpoints/ folder or a stage output holding one (its newest complete step); ("hf", folder) for an HF Llama
    directory or a stage output with an hf/ export."""
    candidates = [url, storage.join(url, "checkpoints")]
    if storage.exists(storage.join(url, ".metadata")):
        if not storage.is_complete(url):
            raise KubellamaError(f"{url}: checkpoint is incomplete (no {storage.COMPLETE} marker)")
        return "dcp", url
    for c in candidates:
        found = latest(c) if storage.isdir(c) else None
        if found:
            return "dcp", found
    for c in (url, storage.join(url, "hf")):
        if storage.exists(storage.join(c, "config.json")):
            return "hf", c
    raise KubellamaError(f"{url}: neither a Hugging Face Llama directory (config.json + safetensors) nor a "
                         f"kubellama checkpoint (a {PREFIX}* folder with {storage.COMPLETE})")


def load_weights(model: Any, url: str, optional: tuple[str, ...] = ()) -> str:
    """Collective: fill `model` (sharded by FSDP2 or not) from `<stage>.init` = `url`, each rank reading only the
    slices of its own shards, on any world size. Parameters whose names start with one of `optional` may be absent
    (a reward model's scalar head when the source is a language model). Returns the resolved source URL."""
    kind, src = resolve(url)
    state = get_model_state_dict(model)
    if kind == "hf":
        missing = read_into(src, state)
    else:
        stored = {k.removeprefix("model.") for k in safe_dcp.reader(src).read_metadata().state_dict_metadata if
                  k.startswith("model.")}
        missing = [k for k in state if k not in stored]
        wanted = {k: v for k, v in state.items() if k in stored}
        safe_dcp.load({"model": wanted}, src, failure="checkpoint does not fit this model")
    absent = [k for k in missing if not k.startswith(optional)]
    if absent:
        raise KubellamaError(f"{src}: no weights for {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}"
                             f" (the init checkpoint does not match the model config)")
    set_model_state_dict(model, {k: v for k, v in state.items() if k not in missing},
                         options=StateDictOptions(strict=False))
    return src


def load_model(url: str, model_cfg: ModelConfig) -> Llama:
    """The model weights of training checkpoint `url` (any world size) as a plain Llama, without a process group:
    what `kubellama export-hf --checkpoint` converts."""
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
        safe_dcp.load(state, url, failure=f"checkpoint does not match model '{model_cfg.name}'")
    model.load_state_dict(state["model"])
    return model.eval()
