"""Stage `sft`: supervised fine-tuning (paper §3.1) on the SFT shards of data prep.

It starts from `sft.init` (the pretraining output in the pipeline, or any HF Llama directory or kubellama checkpoint,
local or s3://) and trains on data prep's `sft/train` rows: dialogs packed into rows of seq_len tokens, attention and
RoPE positions restarting per example, loss on answer tokens only (every assistant turn, or the last with
`sft.loss_turns=last`). Epochs, per-epoch shuffling, held-out loss and the checkpoints are the SFT body's
(components/core/train/finetune.py). The shared launcher runs `train` on every rank.

Outputs under `sft.output` (by default `<run.root>/<run.id>/sft`): checkpoints/, metrics.jsonl, tb/, heldout.json,
hf/ (with the tokenizer), report.json (with `heldout_loss_start` and `heldout_loss_end`), report.md, report.html.
"""
from __future__ import annotations

from typing import Any, Sequence

from kubellama.components.core.train import dist
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.io import storage
from kubellama.components.core.data import tokenizer
from kubellama.components.core.io.report import write_report
from kubellama.components.core.train import finetune
from kubellama.conf.schema import Config

NAME = "sft"


def data_urls(data: str) -> tuple[str, str]:
    """(training shards, held-out shards) of a data prep output."""
    return storage.join(data, "sft", "train"), storage.join(data, "sft", "eval")


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work: fine-tune, export HF at the end; rank 0 writes the report."""
    env = dist.init()
    p = cfg.sft
    trainer, summary = finetune.fit(cfg, NAME, *data_urls(p.data), env, tokenizer=tokenizer.beside(p.data))
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
