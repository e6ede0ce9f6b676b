"""Kubernetes settings of pipeline tasks, all from the Hydra `cluster` config, through kfp-kubernetes.

kfp.local ignores these (except environment variables), so the same pipeline runs on a laptop unchanged.
"""
from __future__ import annotations

from kfp import kubernetes
from kfp.dsl import PipelineTask

from kubellama.components.core.launch.manifests import SCHEDULERS
from kubellama.components.core.launch.pods import S3_KEYS, S3_OPTIONAL_KEYS, placement
from kubellama.conf.schema import Config


def trains_in_pod(cfg: Config) -> bool:
    """True when the training step runs torchrun inside its own pod, with the node's GPUs.

    One node needs no gang scheduling: the step's pod asks for the GPUs itself, which spares a second pod and
    Volcano. Several nodes (scheduler kubernetes or trainjob, nnodes > 1) make the step a small pod that launches
    the Volcano job or TrainJob and streams its logs.
    """
    return cfg.cluster.scheduler not in SCHEDULERS or cfg.cluster.nnodes <= 1


def schedule(task: PipelineTask, cfg: Config, gpu: bool = False) -> PipelineTask:
    """Apply images, secrets, timeouts, retries, caching and, for a training pod (`gpu`), its node's resources and
    GPU placement to `task`."""
    c = cfg.cluster
    task.set_caching_options(bool(cfg.pipeline.caching))
    kubernetes.set_image_pull_policy(task, c.image_pull_policy)
    if c.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(c.image_pull_secrets))
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "kubellama")
    for key, value in c.pod_annotations.items():
        kubernetes.add_pod_annotation(task, key, str(value))
    if c.s3_secret:
        # The same variables torchx pods get from the Secret (launch/pods.py): the keys, and endpoint/region if present.
        kubernetes.use_secret_as_env(task, c.s3_secret, {k: k for k in S3_KEYS})
        kubernetes.use_secret_as_env(task, c.s3_secret, {k: k for k in S3_OPTIONAL_KEYS}, optional=True)
    if c.s3_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", c.s3_endpoint)
    if c.timeout_s > 0:
        kubernetes.set_timeout(task, int(c.timeout_s))
    if c.retries > 0:
        task.set_retry(num_retries=int(c.retries), backoff_duration="60s", backoff_factor=2.0)
    if gpu:
        # cluster.cpu/memory describe a training node; CPU steps keep the namespace defaults.
        if c.cpu:
            task.set_cpu_request(str(c.cpu)).set_cpu_limit(str(c.cpu))
        if c.memory:
            task.set_memory_request(str(c.memory)).set_memory_limit(str(c.memory))
        selector, tolerations = placement(c)
        for key, value in selector.items():
            kubernetes.add_node_selector(task, key, value)
        for t in tolerations:
            kubernetes.add_toleration(task, **t)
        if c.gpus_per_node > 0:
            task.set_accelerator_type(c.gpu_resource)
            task.set_accelerator_limit(int(c.gpus_per_node))
            # NCCL moves data through shared memory; the container default of 64 MB is far too small.
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=c.shm_size)
    return task
