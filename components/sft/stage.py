"""Stage `sft`: supervised fine-tuning (paper §3.1) of `sft.init` on data prep's packed dialogs (`sft/train`), loss
on answer tokens only (`sft.loss_turns`), with the SFT body's epochs, held-out loss and checkpoints
(core/train/finetune.py). Outputs under `sft.output`: checkpoints/, metrics.jsonl, tb/, heldout.json, hf/ (with the
tokenizer), report.json (`heldout_loss_start`, `heldout_loss_end`, and `world` before/after figures when data prep's world is on), report.md, report.html."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubellama.components.core.data import tokenizer
from kubellama.components.core.io import storage
from kubellama.components.core.io.report import write_report
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.train import dist, finetune
from kubellama.components.core.world.evaluate import Probe
from kubellama.conf.schema import Config

NAME = "sft"


def data_urls(data: str) -> tuple[str, str]:
    """(training shards, held-out shards) of a data prep output."""
    return storage.join(data, "sft", "train"), storage.join(data, "sft", "eval")


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work: fine-tune, export HF at the end; rank 0 writes the report."""
    env = dist.init()
    p = cfg.sft
    _trainer, summary = finetune.fit(cfg, NAME, *data_urls(p.data), env, tokenizer=tokenizer.beside(p.data),
                                     world=Probe.of(p.data))
    if env.lead:
        rows, sections, plots = finetune.report_parts(summary)
        paths = write_report(p.output, "Supervised fine-tuning", summary, rows=rows, sections=sections, plots=plots)
        summary.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"])
    summary.pop("records", None)
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind)."""
    return launch.run(cfg, NAME, train)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, train, argv, "supervised fine-tuning on packed dialogs (answer-only loss)")
