from dataclasses import dataclass, field


@dataclass
class TolerationConfig:
    """A pod toleration; GPU tasks always get the portable one (nvidia.com/gpu Exists NoSchedule) as well."""

    key: str = ""
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = None


@dataclass
class ClusterConfig:
    """Where stages run. `local` is the embedded default; GPU presets live in conf/cluster/*.yaml."""

    name: str = "local"
    # local_cwd (torchrun on this machine, through torchx), kubernetes (a Volcano gang-scheduled job made by torchx)
    # or trainjob (a Kubeflow Trainer v2.3 TrainJob, which Kueue can queue: components/core/launch/trainjob.py).
    scheduler: str = "local_cwd"
    nnodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int = 0
    gpu_product: str | None = None
    namespace: str = "kubeflow"
    # Volcano queue (kubernetes; empty: Volcano's "default"), or the Kueue LocalQueue a TrainJob is labelled for
    # (trainjob; empty: no label, so a cluster without Kueue, or without a LocalQueue of that name, still runs it).
    queue: str = ""
    service_account: str | None = None
    priority_class: str | None = None
    image_train: str = "ghcr.io/kubellama/train:0.1.0"
    image_cpu: str = "ghcr.io/kubellama/cpu:0.1.0"
    image_pull_secrets: list[str] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    shm_size: str = "16Gi"
    cpu: str | None = None
    memory: str | None = None
    # A Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_ENDPOINT_URL).
    s3_secret: str | None = None
    timeout_s: int = 0
    # Seconds between SIGTERM and SIGKILL: torchx pods' terminationGracePeriodSeconds, torchrun's shutdown timeout
    # and how long a launcher waits for its ranks to save. A preempted step saves within seconds; S3 uploads of
    # large checkpoints need the rest.
    grace_period_s: int = 120
    retries: int = 0
    # --- pipeline task scheduling (pipelines/k8s.py) ---
    # Extended resource GPU tasks ask for: nvidia.com/gpu, or a MIG profile such as nvidia.com/mig-1g.10gb.
    gpu_resource: str = "nvidia.com/gpu"
    tolerations: list[TolerationConfig] = field(default_factory=list)
    # Istio sidecars keep batch pods from finishing.
    pod_annotations: dict[str, str] = field(default_factory=lambda: {"sidecar.istio.io/inject": "false"})
    # S3 endpoint for MinIO/Ceph (the Secret may carry AWS_ENDPOINT_URL instead); not a secret, so plain env.
    s3_endpoint: str | None = None
    image_pull_policy: str = "IfNotPresent"
    # --- trainjob: the (Cluster)TrainingRuntime a TrainJob runs on (the Helm chart can install one) ---
    runtime: str = "torch-distributed"
    runtime_kind: str = "ClusterTrainingRuntime"
    # Create a NetworkPolicy with each multi-node job letting its pods, and no others, reach each other (the Helm
    # chart's NetworkPolicy denies all ingress to kubellama pods and sets this).
    network_policy: bool = False
