"""The Kubernetes objects of a multi-node training stage, built before any API call: the job (a torchx Volcano Job or
a TrainJob) under its deterministic name `kl-<stage>-<hash of run id, stage, output>`, stamped with the hash of its
spec and config, and the NetworkPolicy that lets its pods, and only them, reach each other."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.launch import torchx_job, trainjob
from kubellama.components.core.recipe import runs

SCHEDULERS = ("kubernetes", "trainjob")
PART_OF = "app.kubernetes.io/part-of"
JOB_LABEL = "kubellama.io/job"
SPEC_HASH = "kubellama.io/spec-hash"


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    state: Callable[[dict], tuple[str, str]]
    # Create with fieldValidation=Strict: an API server whose CRD lacks a field refuses instead of dropping it.
    strict: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


KINDS = {
    "batch.volcano.sh/v1alpha1/Job": Kind("batch.volcano.sh", "v1alpha1", "jobs", torchx_job.volcano_state),
    # Strict: a Trainer older than the one trainjob.py targets (no runtimePatches before 2.2) would silently drop our
    # pod settings (GPU node selector, /dev/shm, S3 keys) and run the job without them.
    f"{trainjob.API_VERSION}/{trainjob.KIND}": Kind(trainjob.GROUP, trainjob.VERSION, trainjob.PLURAL, trainjob.state,
                                                     strict=True),
}


def kind_of(job: dict) -> Kind:
    return KINDS[f"{job['apiVersion']}/{job['kind']}"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def job_name(cfg: Any, stage: str) -> str:
    """The job of (run, stage, output): the same for every attempt of a step, different for every other run. An
    RFC 1035 label short enough for TrainJob's and Volcano's pod hostnames (`<name>-node-0-0`)."""
    key = runs.digest({"run": cfg.run.id, "stage": stage, "output": cfg[stage].output}, 10)
    return f"kl-{_slug(stage)[:20]}-{key}"


def labels(cfg: Any, stage: str, name: str) -> dict[str, str]:
    """Labels of the job and its pods: the chart's NetworkPolicy selects `part-of`, logs and the per-job policy
    select `kubellama.io/job`."""
    return {PART_OF: "kubellama", JOB_LABEL: name, "kubellama.io/stage": _slug(stage)[:63]}


def manifest(cfg: Any, stage: str) -> dict[str, Any]:
    """The Kubernetes object that runs training stage `stage` of bound config `cfg`, as submitted."""
    name = job_name(cfg, stage)
    if not storage.is_remote(cfg[stage].output):
        raise ConfigError(f"{stage}.output={cfg[stage].output} is a local path, which pods on Kubernetes cannot "
                          f"share: set run.root to an s3:// URL")
    tags = labels(cfg, stage, name)
    if cfg.cluster.scheduler == "trainjob":
        job = trainjob.build(cfg, stage, name, tags)
    else:
        job = torchx_job.volcano_job(cfg, stage, name, tags)
    # The config too: a retried step attaches to its job only when it would have started the same job with the same
    # config (the job reads config.yaml, which only the lease holder writes).
    spec = runs.digest({"job": job, "config": runs.config_hash(cfg)}, 16)
    job["metadata"].setdefault("annotations", {})[SPEC_HASH] = spec
    return job


def policy_name(job: dict) -> str:
    """The NetworkPolicy of this job object, named by its uid too: a replaced (failed) job's policy lives on until the
    garbage collector deletes it with that job; under the job's name alone it would stand in for the new job's."""
    meta = job["metadata"]
    return f"{meta['name']}-{meta['uid'].split('-')[0]}"


def network_policy(job: dict) -> dict[str, Any]:
    """Ingress from and egress to the pods of `job` (as created: it has a uid) only, owned by the job (deleted with
    it). The Helm chart denies all other ingress to kubellama pods."""
    meta = job["metadata"]
    pods = {"podSelector": {"matchLabels": {JOB_LABEL: meta["name"]}}}
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": policy_name(job), "namespace": meta["namespace"],
                     "labels": {PART_OF: "kubellama", JOB_LABEL: meta["name"]},
                     "ownerReferences": [{"apiVersion": job["apiVersion"], "kind": job["kind"], "name": meta["name"],
                                          "uid": meta["uid"]}]},
        "spec": {**pods, "policyTypes": ["Ingress", "Egress"], "ingress": [{"from": [pods]}],
                 "egress": [{"to": [pods]}]},
    }
