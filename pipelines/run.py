"""`kubellama run` (the pipeline on this machine through kfp.local) and `kubellama compile` (KFP IR YAML).

Both build the same pipeline from the same resolved config; `run` executes each step as a subprocess of this Python
(the project package must be importable here, as it is in the images), `compile` writes what the KFP UI and API take.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Sequence

import yaml

from components.core import storage
from components.core.cli import guarded, parser
from components.core.config import load_config, to_yaml
from components.core.errors import KubellamaError
from conf.schema import Config
from pipelines import llama2

# `kubellama run --demo` (what `make demo` runs): the tiny model on the fetched samples, trained for a couple of
# minutes on a laptop CPU; 16 sequences of 256 tokens per step instead of the paper's 4M tokens.
DEMO = ["pretrain.max_steps=40", "pretrain.warmup_steps=4", "pretrain.global_batch_tokens=4096",
        "pretrain.micro_batch=8", "pretrain.ckpt_every=20", "pretrain.log_every=5", "run.name=demo"]


def resolve(overrides: Sequence[str]) -> Config:
    """Load the config; a relative local run root becomes absolute, since steps may run from another directory."""
    cfg = load_config(overrides)
    if not storage.is_remote(cfg.run.root) and not os.path.isabs(cfg.run.root):
        cfg = load_config([*overrides, f"run.root={os.path.abspath(cfg.run.root)}"])
    return cfg


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = parser(prog, description)
    p.add_argument("--pipeline", default="llama2", choices=list(llama2.PIPELINES),
                   help="the configured recipe (default) or one stage alone")
    return p


def compile_pipeline(cfg: Config, overrides: Sequence[str], path: str, pipeline: str = "llama2") -> str:
    from kfp import compiler

    compiler.Compiler().compile(llama2.build(cfg, overrides, pipeline), package_path=path)
    return path


def dag_text(cfg: Config, overrides: Sequence[str], pipeline: str = "llama2") -> str:
    """The steps of the compiled pipeline, their inputs and their Kubernetes settings, one line each."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with open(compile_pipeline(cfg, overrides, os.path.join(tmp, "p.yaml"), pipeline)) as f:
            docs = list(yaml.safe_load_all(f))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    tasks = spec["root"]["dag"]["tasks"]
    lines = [f"pipeline {spec['pipelineInfo']['name']}: {spec['pipelineInfo'].get('description', '')}"]
    for name, task in tasks.items():
        after = ", ".join(task.get("dependentTasks", [])) or "-"
        comp = spec["components"][task["componentRef"]["name"]]
        executor = comp.get("executorLabel", "")
        container = spec["deploymentSpec"]["executors"].get(executor, {})
        importer = container.get("importer", {}).get("artifactUri", {})
        image = container.get("container", {}).get("image") or f"import {importer.get('constant', '')}"
        res = container.get("container", {}).get("resources", {}).get("accelerator", {})
        gpus = f" gpus={res.get('resourceCount', res.get('count'))} ({res.get('resourceType', res.get('type'))})" \
            if res else ""
        k8s = platform.get(executor, {})
        extra = f" selector={k8s['nodeSelector'].get('labels', k8s['nodeSelector'])}" if "nodeSelector" in k8s else ""
        params = task.get("inputs", {}).get("parameters", {})
        if params.get("in_pod", {}).get("runtimeValue", {}).get("constant") is False:
            c = cfg.cluster
            extra += f" launches a torchx {c.scheduler} job of {c.nnodes} x {c.gpus_per_node} GPUs"
        lines.append(f"  {name:<28} after: {after:<20} {image}{gpus}{extra}")
    return "\n".join(lines)


def _reports(cfg: Config, names: Sequence[str], kfp_root: str, started: float) -> list[str]:
    outputs = {"data_prep": cfg.data.output, "pretrain": cfg.pretrain.output}
    found = [storage.join(outputs[n], "report.md") for n in names if n in outputs]
    found = [p for p in found if storage.exists(p)]
    runs = [d for d in glob.glob(os.path.join(kfp_root, "*")) if os.path.getmtime(d) >= started - 1]
    for d in sorted(runs):
        found += sorted(glob.glob(os.path.join(d, "*", "report")))
    return found


def run_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("run", "Run the pipeline on this machine through kfp.local (each step a subprocess).")
    p.add_argument("--dry-run", action="store_true", help="print the DAG and the resolved config; run nothing")
    p.add_argument("--demo", action="store_true",
                   help="the tiny model, briefly, on the samples of `kubellama data fetch-samples`")
    p.add_argument("--samples", metavar="DIR", help="where fetch-samples put them (default: its cache)")
    args = p.parse_args(argv)

    def go() -> int:
        overrides = list(args.overrides)
        if args.demo or args.samples:
            from components.data_prep import samples

            missing = [s.name for s in samples.PACKAGES
                       if not os.path.isdir(os.path.join(args.samples or samples.DEFAULT_DEST, s.name))]
            if missing:
                raise KubellamaError(f"sample data missing ({', '.join(missing)}): run `kubellama data fetch-samples"
                                     + (f" --dest {args.samples}`" if args.samples else "`"))
            overrides = [*samples.demo_overrides(args.samples or samples.DEFAULT_DEST),
                         *(DEMO if args.demo else []), *overrides]
        cfg = resolve(overrides)
        names = llama2.selected(cfg, args.pipeline)
        if args.dry_run:
            print(dag_text(cfg, overrides, args.pipeline))
            print("\n# resolved config")
            print(to_yaml(cfg), end="")
            return 0
        return _run_local(cfg, overrides, args.pipeline, names)

    return guarded(go)


def _run_local(cfg: Config, overrides: Sequence[str], pipeline: str, names: Sequence[str]) -> int:
    import warnings

    from kfp import local

    # The steps run in this Python on purpose (the package is installed here as in the images).
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom",
                            category=RuntimeWarning)
    root = cfg.pipeline.local_root
    if storage.is_remote(root):
        # kfp.local keeps task artifacts in a local folder only; the stages still write their data to s3://.
        root = os.path.abspath(os.path.join("runs", cfg.run.name, "kfp"))
    os.makedirs(root, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    print(f"kubellama run: {' -> '.join(names)} through kfp.local; artifacts under {root}", flush=True)
    started = time.time()
    try:
        llama2.build(cfg, overrides, pipeline)()
    except RuntimeError as exc:  # kfp.local reports a failed step this way; its log is already on the terminal
        raise KubellamaError(f"pipeline failed: {' '.join(str(exc).split())}") from None
    print(f"kubellama run: done in {time.time() - started:.0f} s; reports:")
    for path in _reports(cfg, names, root, started):
        print(f"  {path}")
    return 0


def compile_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("compile", "Compile the pipeline to KFP IR YAML, with the resolved config as parameter defaults.")
    p.add_argument("-o", "--output", default="llama2.yaml", help="where to write the YAML (default llama2.yaml)")
    args = p.parse_args(argv)

    def go() -> int:
        cfg = resolve(args.overrides)
        if not storage.is_remote(cfg.run.root):
            print(f"kubellama compile: warning: run.root is the local folder {cfg.run.root}; on a cluster set "
                  "run.root=s3://bucket/prefix", file=sys.stderr)
        compile_pipeline(cfg, args.overrides, args.output, args.pipeline)
        print(f"kubellama compile: wrote {args.output} ({llama2.pipeline_name(cfg, args.pipeline)}, "
              f"config {llama2.config_hash(cfg)})")
        return 0

    return guarded(go)
