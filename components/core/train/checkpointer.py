"""A run's checkpoints as one part: what to save (Stateful parts), when a background save completes, and how a run
resumes (the newest complete checkpoint, refused under another config fingerprint). The files and their layout are
core/train/checkpoint.py's."""
from __future__ import annotations

import sys
import time
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs
from kubellama.components.core.train import checkpoint, dist


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelState:
    """A model and its optimizer as DCP tensors {"model": ..., "optim": ...}, in any world size's shards."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class Parts:
    """Several Stateful parts under their names, as one: e.g. Parts(policy=ModelState(...), value=ModelState(...))."""

    def __init__(self, **parts: Stateful):
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {k: p.state_dict() for k, p in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, p in self.parts.items():
            p.load_state_dict(state[k])


class Checkpointer:
    """Checkpoints of one run under `root` (`<output>/checkpoints`).

    - `tensors`: the Stateful whose state_dict() is the DCP tree (sharded, read back in place on any world size);
    - `meta`: small Stateful parts (scheduler, data position, a whitener...) stored by name in trainer.json;
    - each rank's RNG streams are saved and restored with every checkpoint (checkpoint.save / load);
    - `fingerprint` (runs.fingerprint) is recorded and compared on resume; `run_id` names the run when refused.
    Every method that writes or reads a checkpoint is collective."""

    def __init__(self, root: str, env: dist.Env, tensors: Stateful, meta: dict[str, Stateful] | None = None,
                 keep_last: int = 0, name: str = "train", fingerprint: dict[str, Any] | None = None,
                 run_id: str = ""):
        self.root, self.env, self.tensors, self.meta = root, env, tensors, dict(meta or {})
        self.keep_last, self.name, self.fingerprint, self.run_id = keep_last, name, fingerprint, run_id
        self.last: str | None = None  # the newest complete checkpoint this run saved or resumed from
        # One step kept whatever keep_last says (PPO's best held-out iteration, which its early stop exports).
        self.pinned: int | None = None
        self._pending: checkpoint.Pending | None = None
        self._pending_t0 = 0.0

    def folder(self, step: int) -> str:
        return checkpoint.folder(self.root, step)

    def latest(self) -> str | None:
        return checkpoint.latest(self.root)

    def saved(self, step: int) -> bool:
        """Whether the last complete checkpoint is `step`'s (nothing left to save there)."""
        return self.last == self.folder(step)

    # --- saving ------------------------------------------------------------------------------------------------

    def save(self, step: int, background: bool = False, extra: dict[str, Any] | None = None) -> str:
        """Collective: checkpoint `step`; `extra` adds plain values to trainer.json. With `background` the tensors
        are written by DCP's async_save and the checkpoint becomes complete in a later `settle()`."""
        self.settle(wait=True)
        t0 = time.perf_counter()
        info = {**{k: p.state_dict() for k, p in self.meta.items()}, "name": self.name,
                "fingerprint": self.fingerprint, **(extra or {})}
        # With a pinned step, pruning is done here (`_finished`), around it; checkpoint.save then only drops
        # leftovers of interrupted saves.
        keep = self.keep_last if self.pinned is None else 0
        pending = checkpoint.save(self.root, step, self.tensors.state_dict(), info, self.env, keep,
                                  background=background)
        if background:
            self._pending, self._pending_t0 = pending, t0
            return pending.url
        self._finished(pending.finish(), t0)
        return pending.url

    def pending_done(self) -> bool:
        """Local: a background save is in flight and this rank's writes are done."""
        return self._pending is not None and self._pending.done()

    def settle(self, wait: bool, done_everywhere: bool = False) -> None:
        """Collective: complete a background save when `wait`, or when every rank's writes are done
        (`done_everywhere`, agreed in a collective), so all ranks finish it at the same step."""
        if self._pending is not None and (wait or done_everywhere):
            pending, self._pending = self._pending, None
            self._finished(pending.finish(), self._pending_t0)

    def _finished(self, url: str, t0: float) -> None:
        self.last = url
        if self.pinned is not None and self.keep_last > 0:
            if self.env.lead:
                done, _ = checkpoint.steps(self.root)
                for step in done[:-self.keep_last]:
                    if step != self.pinned:
                        storage.remove(self.folder(step), recursive=True)
            dist.barrier()
        if self.env.lead:
            print(f"[{self.name}] checkpoint step {int(url.rstrip('/').rsplit('_', 1)[1])} -> {url} "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)

    # --- resuming ----------------------------------------------------------------------------------------------

    def load(self, url: str) -> dict[str, Any]:
        """Collective: restore every part from checkpoint `url`; returns its trainer.json."""
        state = self.tensors.state_dict()
        info = checkpoint.load(url, state, self.env)
        self.tensors.load_state_dict(state)
        for k, p in self.meta.items():
            p.load_state_dict(info[k])
        self.last = url
        return info

    def resume(self, announce: bool = True) -> dict[str, Any] | None:
        """Collective: load the newest complete checkpoint (its trainer.json, `step` included), None when there is
        none. Refused in one line when it was written under another fingerprint."""
        url = self.latest()
        if url is None:
            return None
        if self.fingerprint is not None:
            runs.check(checkpoint.meta(url).get("fingerprint"), self.fingerprint, url, self.run_id)
        info = self.load(url)
        if announce and self.env.lead:
            print(f"[{self.name}] resumed from {url} at step {info['step']} "
                  f"(saved on {info['world_size']} ranks, now {self.env.world_size})", file=sys.stderr, flush=True)
        return info

    def lineage(self, parent: str | None, step: int) -> dict[str, Any]:
        """Config hash, data hash, parent checkpoint and step: what reports and exports record."""
        return {**runs.lineage(self.fingerprint or {}), "parent": parent, "step": step}

