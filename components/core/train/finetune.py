"""The SFT body that `sft` and `gatt` share: packed answer-only fine-tuning for whole epochs on the trainer core.

- Rows come from an EpochReader (a seeded order per epoch, part of the resumable state) through the Prefetcher.
- `max_steps` 0 means `epochs` × steps per epoch; the cosine schedule spans that.
- Held-out loss and perplexity at the start, after every epoch (then a checkpoint) and after a last partial epoch.
  The records live in `<output>/heldout.json`; a resumed run keeps those up to its checkpoint's step, so the start
  figure survives any number of restarts.
- At the end, the HF export with the tokenizer the data was made with.
"""
from __future__ import annotations

from typing import Any

from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io.report import Section, Table, line_png, loss_png, training_rows
from kubellama.components.core.data.shards import Prefetcher
from kubellama.components.core.train.trainer import Trainer
from kubellama.components.sft.data import EpochReader, Heldout, sft_loss
from kubellama.conf.schema import Config
from kubellama.conf.schema.sft import SFT_VOLATILE


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
        **fingerprint: Any) -> tuple[Trainer, dict[str, Any]]:
    """Fine-tune section `cfg[name]` on the SFT shards at `train_url`, scoring `eval_url`; every rank calls it.
    `fingerprint` adds what else shapes the run (e.g. how a GAtt set was made). Returns the trainer (its model
    holds the final weights) and the summary, HF export included when the run completed."""
    p = cfg[name]
    reader = EpochReader(train_url, env.rank, env.world_size, block=p.micro_batch, seed=cfg.run.seed)
    fp = runs.fingerprint(cfg, name, SFT_VOLATILE, **{"data.manifest": runs.manifest_hash(reader.manifest),
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
