"""Stage `pretrain`: FSDP pretraining on the token shards of data prep; `train` runs on every rank (the shared
launcher runs it in-process, under torchrun or as a job). Outputs under `pretrain.output`: checkpoints/ (resumable,
with the config fingerprint), metrics.jsonl, tb/, hf/ (with its lineage), config.yaml, report.json, .md, .html."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubellama.components.core.data import tokenizer
from kubellama.components.core.data.shards import Prefetcher, ShardReader
from kubellama.components.core.io import storage
from kubellama.components.core.io.report import write_report
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.train import dist
from kubellama.components.core.train.trainer import Trainer
from kubellama.conf.schema import Config
from kubellama.conf.schema.train import VOLATILE

NAME = "pretrain"


def data_url(cfg: Config) -> str:
    return storage.join(cfg.pretrain.data, "pretrain")


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work (every rank calls it): train, export HF at the end, rank 0 writes the report."""
    env = dist.init()
    p = cfg.pretrain
    # One block per micro-batch: each batch is a single contiguous read (one ranged GET on S3).
    reader = ShardReader(data_url(cfg), rank=env.rank, world_size=env.world_size, block=p.micro_batch)
    fp = runs.fingerprint(cfg, NAME, VOLATILE, **{"data.manifest": runs.manifest_hash(reader.manifest),
                                                  "init": p.init or None})
    trainer = Trainer(p, cfg.model, p.output, Prefetcher(reader), seed=cfg.run.seed, name=NAME, env=env, init=p.init,
                      fingerprint=fp, run_id=cfg.run.id)
    summary = trainer.fit()
    if summary["status"] == "completed":
        summary["hf"] = trainer.export_hf(storage.join(p.output, "hf"), tokenizer=tokenizer.beside(p.data))
    summary.update(output=p.output, run_id=cfg.run.id, lineage=trainer.lineage())
    if env.lead:
        paths = write_report(p.output, "Pretraining", summary)
        summary.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"])
    summary.pop("records", None)
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind)."""
    return launch.run(cfg, NAME, train)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, train, argv, "FSDP pretraining (torchx local or Kubernetes)")
