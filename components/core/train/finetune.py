"""The SFT body that `sft`, `gatt` and `rejection_sampling` share: packed answer-only fine-tuning for whole epochs
(EpochReader through the Prefetcher; `max_steps` 0 = `epochs` × steps per epoch) on the Trainer, with the held-out
loss at the start and after every epoch (then a checkpoint) kept in `<output>/heldout.json` across restarts, and the
HF export at the end."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from kubellama.components.core.data.epochs import EpochReader
from kubellama.components.core.data.shards import Prefetcher, ShardReader, read_manifest
from kubellama.components.core.data.tokenizer import IGNORE, Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.io.report import Section, Table, line_png, loss_png, training_rows
from kubellama.components.core.recipe import runs
from kubellama.components.core.train import checkpoint, dist, probe
from kubellama.components.core.train.loss import LossFn, sft_loss
from kubellama.components.core.train.trainer import Trainer
from kubellama.components.core.world.evaluate import Probe, compare, figures
from kubellama.conf.schema import Config
from kubellama.conf.schema.sft import SFT_VOLATILE


class Heldout:
    """Loss and perplexity of a model on a held-out shard set. Collective: every rank scores its share of rows and
    takes the same number of forward passes (FSDP gathers parameters in each), padding with rows that carry no
    loss."""

    def __init__(self, url: str, micro_batch: int, loss_fn: LossFn, env: dist.Env, max_rows: int = 0):
        rows = int(read_manifest(url)["rows"])
        self.rows = min(rows, max_rows) if max_rows > 0 else rows
        self.reader = ShardReader(url) if self.rows else None
        self.micro_batch, self.loss_fn, self.env = micro_batch, loss_fn, env

    def __call__(self, model: nn.Module) -> dict[str, float] | None:
        """{"loss", "ppl", "tokens"}; None when the held-out set is empty."""
        if self.reader is None:
            return None
        env, mb = self.env, self.micro_batch
        mine = list(range(env.rank, self.rows, env.world_size))
        batches = math.ceil(math.ceil(self.rows / env.world_size) / mb)
        was_training = model.training
        model.eval()
        loss_sum = count = 0.0
        with torch.no_grad():
            for b in range(batches):
                idx = mine[b * mb:(b + 1) * mb]
                parts = [self.reader.row(i) for i in idx]
                while len(parts) < mb:
                    filler = dict(self.reader.row(0))
                    filler["labels"] = np.full_like(filler["labels"], IGNORE)
                    parts.append(filler)
                batch = {k: torch.from_numpy(np.stack([p[k] for p in parts]).astype(np.int64)).to(env.device)
                         for k in parts[0]}
                loss, n = self.loss_fn(model, batch)
                loss_sum += float(loss)
                count += float(n)
        model.train(was_training)
        total, tokens = dist.all_sum([loss_sum, count], env.device)
        mean = total / max(tokens, 1.0)
        return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(tokens)}


class History:
    """Held-out records [{epoch, step, loss, ppl, tokens}], written by rank 0 after each one."""

    def __init__(self, output: str, lead: bool):
        self.url, self.lead = storage.join(output, "heldout.json"), lead
        self.records: list[dict[str, Any]] = []

    def restore(self, step: int) -> None:
        """Keep the records a resume from `step` still stands on."""
        saved = storage.read_json(self.url) if storage.exists(self.url) else []
        if not isinstance(saved, list):
            raise KubellamaError(f"{self.url}: not a list of held-out records")
        self.records = [r for r in saved
                        if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step]

    def add(self, epoch: float, step: int, scores: dict[str, float] | None) -> None:
        if scores is None:
            return
        self.records.append({"epoch": round(epoch, 4), "step": step, **scores})
        if self.lead:
            storage.write_json(self.url, self.records)


def fit(cfg: Config, name: str, train_url: str, eval_url: str, env: dist.Env, tokenizer: str | None = None,
        world: Probe | None = None, volatile: tuple[str, ...] = SFT_VOLATILE,
        **fingerprint: Any) -> tuple[Trainer, dict[str, Any]]:
    """Fine-tune section `cfg[name]` on the SFT shards at `train_url`, scoring `eval_url`; every rank calls it.
    `fingerprint` adds what else shapes the run (e.g. how a GAtt set was made), `volatile` the keys that do not
    (they may change on a resume); `world` (with `tokenizer`) adds the
    world's before/after figures to the summary. Returns the trainer (its model holds the final weights) and the
    summary, HF export included when the run completed."""
    p = cfg[name]
    reader = EpochReader(train_url, env.rank, env.world_size, block=p.micro_batch, seed=cfg.run.seed)
    fp = runs.fingerprint(cfg, name, volatile, **{"data.manifest": runs.manifest_hash(reader.manifest),
                                                      "init": p.init or None, **fingerprint})
    loss = sft_loss(p.loss_turns)
    source = Prefetcher(reader)
    trainer = Trainer(p, cfg.model, p.output, source, loss_fn=loss, seed=cfg.run.seed, name=name, env=env,
                      init=p.init, fingerprint=fp, run_id=cfg.run.id)
    per_epoch = reader.plan(trainer.accum * p.micro_batch)
    if p.max_steps <= 0:
        # The LR schedule reads max_steps at every step; the fingerprint holds 0 (= derived from the data).
        p.max_steps = p.epochs * per_epoch
    score = Heldout(eval_url, p.micro_batch, loss, env, p.eval_rows)
    history = History(p.output, env.lead)
    latest = checkpoint.latest(trainer.ckpt_root)
    tok = Tokenizer(tokenizer) if world is not None and tokenizer else None
    before = None
    if world is not None and tok is not None:
        before = probe.kept(p.output, "before", env, lambda: world(trainer.model, tok))
    if latest is None:
        history.add(0.0, 0, score(trainer.model))
    else:
        history.restore(int(checkpoint.meta(latest)["step"]))

    def on_step(step: int) -> bool:
        state = source.state_dict()  # what the trainer consumed, not what the prefetcher read ahead
        if state["position"] != 0:
            return False
        history.add(float(state["epoch"]), step, score(trainer.model))
        return True  # an epoch ended: checkpoint it

    summary = trainer.fit(on_step)
    if summary["status"] == "completed":
        if not history.records or history.records[-1]["step"] != trainer.step:
            history.add(trainer.step / per_epoch, trainer.step, score(trainer.model))
        summary["hf"] = trainer.export_hf(storage.join(p.output, "hf"), tokenizer=tokenizer)
        if world is not None and tok is not None and before is not None:
            after = probe.kept(p.output, "after", env, lambda: world(trainer.model, tok))
            summary["world"] = compare(figures(before), figures(after))
    start = history.records[0] if history.records and history.records[0]["step"] == 0 else {}
    end = history.records[-1] if history.records else {}
    summary.update(
        output=p.output, run_id=cfg.run.id, lineage=trainer.lineage(), epochs=p.epochs, steps_per_epoch=per_epoch,
        max_steps=p.max_steps, train_rows=reader.total_rows, heldout_rows=score.rows, heldout=history.records,
        heldout_loss_start=start.get("loss"), heldout_loss_end=end.get("loss"), heldout_ppl_start=start.get("ppl"),
        heldout_ppl_end=end.get("ppl"))
    return trainer, summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report_parts(summary: dict[str, Any]) -> tuple[list[tuple[str, Any]], list[Section], dict[str, bytes]]:
    """Headline rows, sections and plots of an SFT-body run, for write_report."""
    rows = training_rows(summary) + [
        ("epochs", f"{summary['epochs']} × {summary['steps_per_epoch']} steps ({summary['train_rows']} rows)"),
        ("held-out loss start → end",
         f"{_fmt(summary['heldout_loss_start'])} → {_fmt(summary['heldout_loss_end'])}"),
        ("held-out perplexity start → end",
         f"{_fmt(summary['heldout_ppl_start'])} → {_fmt(summary['heldout_ppl_end'])}")]
    records = summary["heldout"]
    text = "" if records else "The held-out set is empty (raise data.sft.eval_fraction): nothing was scored."
    table = Table(["epoch", "step", "loss", "perplexity", "answer tokens"],
                  [[r["epoch"], r["step"], f"{r['loss']:.4f}", f"{r['ppl']:.3f}", r["tokens"]] for r in records])
    sections = [Section("Held-out loss", text=text, tables=[table] if records else [])]
    plots = {}
    png = loss_png(summary.get("records") or [], "training loss")
    if png:
        plots["loss"] = png
    if len(records) > 1:
        plots["heldout"] = line_png([r["step"] for r in records], [r["loss"] for r in records],
                                    title="held-out loss", xlabel="step", ylabel="loss")
    return rows, sections, plots
