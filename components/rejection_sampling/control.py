"""Rejection sampling's `world.accuracy_control` (issue 21): the stage's init trained for as many steps (same lr,
batch and schedule) on data prep's plain SFT dialogs (`sft/train`, the world's dialogs among them) instead of the
best-of-K pool. Best-of-K pays for K samples and their scoring: its accuracy gain counts only if it beats the same
steps spent on plain SFT. The control is the SFT body under `<rs output>/control`, with its own checkpoints (a rerun
resumes it; a finished one is not retrained), its own world figures and its own HF export there, never at the stage's
`hf/`."""
from __future__ import annotations

import copy
from typing import Any

from kubellama.components.core.data.shards import read_manifest
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.train import dist, finetune, probe
from kubellama.components.core.world import stats
from kubellama.components.core.world.evaluate import Probe, figures
from kubellama.conf.schema import Config
from kubellama.conf.schema.rejection_sampling import RS_VOLATILE

NAME = "rejection_sampling"


def urls(data: str) -> tuple[str, str]:
    """Data prep's plain SFT shards: train, eval."""
    return storage.join(data, "sft", "train"), storage.join(data, "sft", "eval")


def output(cfg: Config) -> str:
    return storage.join(cfg.rejection_sampling.output, "control")


def check(cfg: Config) -> None:
    """Before any sampling: a control that cannot train must not fail the stage after its main fit."""
    p = cfg.rejection_sampling
    train_url, eval_url = urls(p.data)
    for url in (train_url, eval_url):
        if not storage.is_complete(url):
            raise ConfigError(f"rejection_sampling.control=true trains a control on data prep's SFT shards, but "
                              f"{url} is missing or incomplete: point rejection_sampling.data at a data prep output "
                              f"with sft/, or set rejection_sampling.control=false")
    rows = int(read_manifest(train_url)["seq_len"])
    if rows != p.seq_len:
        raise ConfigError(f"rejection_sampling.control=true trains on {train_url}, whose rows hold {rows} tokens, "
                          f"but rejection_sampling.seq_len={p.seq_len}: set them equal, or "
                          f"rejection_sampling.control=false")


def fit(cfg: Config, steps: int, env: dist.Env, tok: Tokenizer, tok_url: str,
        world: Probe) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collective: train the control for `steps` steps (or resume it), then probe it. Returns the control's summary
    and its figures (None when it was preempted)."""
    own = copy.deepcopy(cfg)
    own.rejection_sampling.output = output(cfg)
    own.rejection_sampling.max_steps = steps
    # `rs.control` keeps its checkpoints' fingerprint apart from the main run's (so does the SFT data's manifest).
    trainer, summary = finetune.fit(own, NAME, *urls(cfg.rejection_sampling.data), env, tokenizer=tok_url,
                                    volatile=RS_VOLATILE, **{"rs.control": True})
    found = None
    if summary["status"] == "completed":
        found = figures(probe.kept(output(cfg), "after", env, lambda: world(trainer.model, tok)))
    keep = ("status", "step", "start_step", "max_steps", "output", "checkpoint", "hf", "train_rows",
            "heldout_loss_start", "heldout_loss_end", "wall_s")
    return {k: summary.get(k) for k in keep}, found


def accuracy(world: dict[str, Any], control: dict[str, Any], steps: int) -> dict[str, Any]:
    """`world.accuracy_control`: before = the stage's init (the main fit's "before"), after = the control's output;
    with whether rejection sampling's own "after" reached the control's."""
    ours, theirs = world["accuracy"]["after"]["value"], control["accuracy"]["value"]
    beats = None if ours is None or theirs is None else bool(ours >= theirs)
    if beats is None:
        note = "no world task was scored"
    else:
        overlap = not (world["accuracy"]["after"]["ci"][0] > control["accuracy"]["ci"][1]
                       or control["accuracy"]["ci"][0] > world["accuracy"]["after"]["ci"][1])
        note = (f"rejection sampling {ours:.3f} {'≥' if beats else '<'} control {theirs:.3f} after {steps} steps"
                + (" (95% intervals overlap)" if overlap else ""))
    before = {**world["accuracy"]["before"], "n": world["accuracy"]["n"]}
    return stats.before_after(before, control["accuracy"], steps=steps, rs_after=ours, rs_beats_control=beats,
                              note=note)
