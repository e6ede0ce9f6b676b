"""Stage `pretrain`: FSDP pretraining on the token shards of the data prep stage.

Three ways in, one training body (`train`):
- `kubellama pretrain [overrides]`: in this process when the cluster has one process (the embedded default);
  otherwise through torchx: `local_cwd` (torchrun with cluster.nproc_per_node processes here) or `kubernetes`
  (a Volcano job). `--dryrun` prints the job instead of running it.
- `torchrun -m components.pretrain [overrides]`: every rank trains directly (no torchx).
- `launch(cfg)`: what the KFP component calls; runs the job wherever the config says and returns the summary.

Outputs under `pretrain.output`: checkpoints/ (DCP, resumable), metrics.jsonl, tb/ (TensorBoard), hf/ (the
consolidated Hugging Face checkpoint), config.yaml, report.json, report.md, loss.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from components.core import dist, launch as jobs, storage
from components.core.cli import guarded, parser
from components.core.config import load_config, load_resolved, to_yaml
from components.core.errors import ConfigError, KubellamaError
from components.core.shards import Prefetcher, ShardReader
from components.core.trainer import Trainer, write_report
from conf.schema import Config

NAME = "pretrain"


class Preempted(KubellamaError):
    """SIGTERM arrived; the checkpoint is saved and a rerun resumes from it."""


def data_url(cfg: Config) -> str:
    return storage.join(cfg.pretrain.data, "pretrain")


def tokenizer_url(cfg: Config, manifest: dict[str, Any]) -> str | None:
    """The tokenizer the shards were made with, to ship inside the HF checkpoint (None when not found)."""
    given = manifest.get("tokenizer")
    candidates = [given] if isinstance(given, str) and given.endswith(".model") else []
    candidates += [storage.join(cfg.pretrain.data, "tokenizer.model"),
                   storage.join(cfg.pretrain.data, "tokenizer", "tokenizer.model")]
    return next((c for c in candidates if storage.exists(c)), None)


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work (every rank calls it): train, export HF at the end, rank 0 writes the report."""
    env = dist.init()
    # One block per micro-batch: each batch is a single contiguous read (one ranged GET on S3).
    reader = ShardReader(data_url(cfg), rank=env.rank, world_size=env.world_size, block=cfg.pretrain.micro_batch)
    trainer = Trainer(cfg.pretrain, cfg.model, cfg.pretrain.output, Prefetcher(reader), seed=cfg.run.seed, name=NAME,
                      env=env)
    summary = trainer.fit()
    if summary["status"] == "completed":
        summary["hf"] = trainer.export_hf(storage.join(cfg.pretrain.output, "hf"),
                                          tokenizer=tokenizer_url(cfg, reader.manifest))
    summary["output"] = cfg.pretrain.output
    if env.lead:
        paths = write_report(cfg.pretrain.output, "Pretraining", summary)
        summary.update(report_json=paths["json"], report_md=paths["md"])
    summary.pop("records", None)
    return summary


def _config_url(cfg: Config) -> str:
    return storage.join(cfg.pretrain.output, "config.yaml")


def job(cfg: Config):
    """The torchx AppDef of this stage for cfg.cluster."""
    if cfg.cluster.scheduler == "kubernetes" and not storage.is_remote(cfg.pretrain.output):
        raise ConfigError(f"pretrain.output={cfg.pretrain.output} is a local path, which pods on Kubernetes cannot "
                          f"share: set run.root to an s3:// URL")
    return jobs.app(cfg.cluster, "components.pretrain", ["--config", _config_url(cfg)], name=f"{cfg.run.name}-{NAME}")


def in_process(cfg: Config) -> bool:
    """One local process: no torchx, no torchrun, train right here."""
    c = cfg.cluster
    return c.scheduler.startswith("local") and c.nnodes * c.nproc_per_node <= 1


def dryrun(cfg: Config) -> str:
    if in_process(cfg):
        return (f"in process (cluster.nproc_per_node=1): {NAME} on {data_url(cfg)} -> {cfg.pretrain.output}, "
                f"{cfg.pretrain.max_steps} steps\n")
    _, spec = jobs.dryrun(cfg.cluster, job(cfg))
    return jobs.render(spec)


def launch(cfg: Config) -> dict[str, Any]:
    """Run the stage wherever cfg.cluster says and return its summary (output URLs, final metrics, report)."""
    if dist.under_launcher():
        # A torchrun worker: a preempted run still exits 0 here so the launcher (below) reads the report and
        # decides; a non-zero exit would make torchrun tear the other ranks down mid-save.
        return train(cfg)
    if in_process(cfg):
        summary = train(cfg)
    else:
        storage.write_text(_config_url(cfg), to_yaml(cfg))
        jobs.submit(cfg.cluster, job(cfg))
        summary = storage.read_json(storage.join(cfg.pretrain.output, "report.json"))
    if summary.get("status") == "preempted":
        raise Preempted(f"pretraining was preempted at step {summary['step']}; checkpoint "
                             f"{summary['checkpoint']} is saved: run again to resume")
    return summary


run = launch


def load(args: argparse.Namespace) -> Config:
    return load_resolved(args.config, args.overrides) if args.config else load_config(args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(NAME, "FSDP pretraining (torchx local or Kubernetes)")
    p.add_argument("--dryrun", action="store_true", help="print the job that would be submitted, run nothing")
    p.add_argument("--config", help="a resolved config YAML (what launched workers receive)")
    args = p.parse_args(argv)

    def go() -> int:
        cfg = load(args)
        if args.dryrun:
            print(dryrun(cfg), end="")
            return 0
        try:
            summary = launch(cfg)
        except Preempted as exc:
            print(f"kubellama: {exc}", file=sys.stderr)
            # 128 + SIGTERM: what a process stopped by SIGTERM reports, so schedulers see a preemption, not success.
            return 143
        if not dist.under_launcher() or (dist.init().lead and jobs.LAUNCHED not in os.environ):
            print(json.dumps(summary, indent=2, default=str))
        dist.shutdown()
        return 0

    return guarded(go)
