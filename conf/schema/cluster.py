from dataclasses import dataclass, field


@dataclass
class TolerationConfig:
    """A pod toleration; GPU tasks always get the portable one (nvidia.com/gpu Exists NoSchedule) as well."""

    # Taint key to tolerate; empty: every key (with operator Exists).
    key: str = ""
    # Exists (any value) or Equal (the taint's value must be `value`).
    operator: str = "Exists"
    # Taint value matched under operator Equal; null with Exists.
    value: str | None = None
    # NoSchedule, PreferNoSchedule or NoExecute; null: every effect.
    effect: str | None = None


@dataclass
class ClusterConfig:
    """Where stages run. `local` is the embedded default; GPU presets live in conf/cluster/*.yaml."""

    # The preset's name (conf/cluster/<name>.yaml): a label, no code reads it.
    name: str = "local"
    # local_cwd (torchrun on this machine, through torchx), kubernetes (a Volcano gang-scheduled job made by torchx)
    # or trainjob (a Kubeflow Trainer v2.3 TrainJob, which Kueue can queue: components/core/launch/trainjob.py).
    scheduler: str = "local_cwd"
    # Nodes of a training job (torchrun --nnodes; a TrainJob's numNodes).
    nnodes: int = 1
    # Training processes (ranks) per node, one per GPU on GPU nodes (torchrun --nproc_per_node).
    nproc_per_node: int = 1
    # GPUs a training pod asks for (limit of `gpu_resource`); 0: CPU-only, no GPU placement.
    gpus_per_node: int = 0
    # GPU training pods also select nodes whose nvidia.com/gpu.product label is this; null: any.
    gpu_product: str | None = None
    # Kubernetes namespace of the training jobs (Volcano jobs, TrainJobs).
    namespace: str = "kubeflow"
    # Volcano queue (kubernetes; empty: Volcano's "default"), or the Kueue LocalQueue a TrainJob is labelled for
    # (trainjob; empty: no label, so a cluster without Kueue, or without a LocalQueue of that name, still runs it).
    queue: str = ""
    # ServiceAccount of training pods (Volcano jobs, TrainJobs); null: the namespace default.
    service_account: str | None = None
    # PriorityClass of Volcano jobs (a TrainJob ignores it: its runtime sets priority).
    priority_class: str | None = None
    # Image of the training pods and of pipeline steps of launched stages.
    image_train: str = "ghcr.io/kubellama/train:0.1.0"
    # Image of the pipeline steps of stages not launched as training jobs (data prep, ...) and of the resolver.
    image_cpu: str = "ghcr.io/kubellama/cpu:0.1.0"
    # Secrets (names) for pulling the images, set on pipeline steps and training pods.
    image_pull_secrets: list[str] = field(default_factory=list)
    # Extra node labels a training pod must match (on top of the GPU ones).
    node_selector: dict[str, str] = field(default_factory=dict)
    # Size limit of the in-memory /dev/shm of training pods (NCCL needs far more than 64 MB).
    shm_size: str = "16Gi"
    # CPU limit (= request) per training node's pod, a Kubernetes quantity; null: none set.
    cpu: str | None = None
    # Memory limit (= request) per training node's pod, a Kubernetes quantity; null: none set.
    memory: str | None = None
    # A Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_ENDPOINT_URL).
    s3_secret: str | None = None
    # Seconds a pipeline step or training job may run before it is stopped; 0: no limit.
    timeout_s: int = 0
    # Seconds between SIGTERM and SIGKILL: torchx pods' terminationGracePeriodSeconds, torchrun's shutdown timeout
    # and how long a launcher waits for its ranks to save. A preempted step saves within seconds; S3 uploads of
    # large checkpoints need the rest.
    grace_period_s: int = 120
    # Retries of a failed pipeline step (backoff 60 s, doubling) and torchx max_retries.
    retries: int = 0
    # --- pipeline task scheduling (pipelines/k8s.py) ---
    # Extended resource GPU tasks ask for: nvidia.com/gpu, or a MIG profile such as nvidia.com/mig-1g.10gb.
    gpu_resource: str = "nvidia.com/gpu"
    # Tolerations of training pods, after the portable GPU one on GPU nodes.
    tolerations: list[TolerationConfig] = field(default_factory=list)
    # Istio sidecars keep batch pods from finishing.
    pod_annotations: dict[str, str] = field(default_factory=lambda: {"sidecar.istio.io/inject": "false"})
    # S3 endpoint for MinIO/Ceph (the Secret may carry AWS_ENDPOINT_URL instead); not a secret, so plain env.
    s3_endpoint: str | None = None
    # imagePullPolicy of pipeline steps and training containers.
    image_pull_policy: str = "IfNotPresent"
    # --- trainjob: the (Cluster)TrainingRuntime a TrainJob runs on (the Helm chart can install one) ---
    # Name of the (Cluster)TrainingRuntime a TrainJob's runtimeRef points at.
    runtime: str = "torch-distributed"
    # Kind of that runtime: ClusterTrainingRuntime or TrainingRuntime (namespaced).
    runtime_kind: str = "ClusterTrainingRuntime"
    # Create a NetworkPolicy with each multi-node job letting its pods, and no others, reach each other (the Helm
    # chart's NetworkPolicy denies all ingress to kubellama pods and sets this).
    network_policy: bool = False
