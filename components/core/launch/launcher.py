"""The one launcher of every training stage: in this process, under torchrun, as a torchx `local_cwd` job
(torchrun on this machine), or as a multi-node job on Kubernetes: a Volcano job made by torchx, or a Kubeflow
Trainer TrainJob (components/core/trainjob.py), both run by components/core/kube.py (deterministic names, adopt on
retry, a lease per output, deletion on SIGTERM and timeout).

A training stage supplies its training body (`train(cfg) -> summary`, run by every rank) and calls `main()` from its
`__main__` / CLI entry and `run()` from its KFP component. Everything else is here: `--dryrun`, `--config`, the run
binding (components/core/runs.py), the job, SIGTERM handling and exit code 143, and reading back the report.

A job runs `python -m components.<stage> --config <url>`, where the config is the resolved tree written next to the
stage's output, so workers see exactly the config the launcher saw, whatever overrides or KFP parameters produced it.

Preemption: on SIGTERM the launcher signals its local ranks directly (their pids are recorded in a folder named by
$KUBELLAMA_PIDS), which stop at the next micro-batch, save the last finished step and exit 0 with status
`preempted`; torchrun and torchx then see a clean exit, so neither kills a save half-way (torchx's local scheduler
SIGKILLs 10 s after its own SIGTERM). The launcher then exits 143. In Kubernetes pods SIGTERM reaches torchrun
(exec'd as the container's process), which forwards it and waits `cluster.grace_period_s` before killing.

torchx's Kubernetes scheduler already emits one Volcano task per node, c10d rendezvous on task 0, /dev/shm as a
memory emptyDir, `nvidia.com/gpu` limits and the Istio opt-out annotation. What it lacks for GPU node pools managed
by the NVIDIA GPU operator is added to each pod template here: the node selector `nvidia.com/gpu.present=true`
(+ `nvidia.com/gpu.product` when the cluster names one), the toleration for the `nvidia.com/gpu` taint, a size limit
on /dev/shm, image pull secrets and the S3 credentials Secret as environment.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import yaml

from kubellama.components.core.train import dist
from kubellama.components.core.launch import kube
from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.errors import ConfigError, KubellamaError, rank_error
from kubellama.conf.schema.cluster import ClusterConfig

GPU = "nvidia.com/gpu"
GPU_PRESENT = "nvidia.com/gpu.present"
GPU_PRODUCT = "nvidia.com/gpu.product"
# Environment variables a pod takes from the cluster's S3 Secret; the optional ones may sit there too (MinIO, Ceph).
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")


def placement(cluster: ClusterConfig) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Node selector and tolerations of a training pod, the same for a pipeline step and a torchx job: GPU nodes of
    the GPU operator (and the product, when set) tolerating the portable GPU taint, then the user's own."""
    selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    if cluster.gpus_per_node > 0:
        selector[GPU_PRESENT] = "true"
        if cluster.gpu_product:
            selector[GPU_PRODUCT] = cluster.gpu_product
        tolerations.append({"key": GPU, "operator": "Exists", "value": None, "effect": "NoSchedule"})
    selector.update({k: str(v) for k, v in (cluster.node_selector or {}).items()})
    for t in cluster.tolerations:
        entry = {"key": t.key or None, "operator": t.operator, "value": t.value, "effect": t.effect}
        if entry not in tolerations:
            tolerations.append(entry)
    return selector, tolerations
# c10d rendezvous port on task 0 (torchx's own default).
RDZV_PORT = 29500
# Set in every worker of a job launched from here: the launcher prints the summary, the workers need not.
LAUNCHED = "KUBELLAMA_LAUNCHED"
# A local folder where the ranks of a local job record their pids, so the launcher can signal them directly.
PIDS = "KUBELLAMA_PIDS"
# 128 + SIGTERM: what a process stopped by SIGTERM reports, so schedulers see a preemption, not success.
EXIT_PREEMPTED = 143

TrainFn = Callable[[Any], dict]


class Preempted(KubellamaError):
    """SIGTERM arrived; the last finished step is saved and a rerun of the same run resumes from it."""


class StageFailed(KubellamaError):
    """The stage finished its work and its report says `failed` (e.g. safety eval's promotion gate): the message is
    the report's `error`, and `summary` the report, so a KFP step can still publish it before failing."""

    def __init__(self, summary: dict):
        super().__init__(str(summary.get("error") or "the stage reports status failed"))
        self.summary = summary


def _quantity(value: str | None) -> float:
    if not value:
        return 0.0
    from kubernetes.utils import parse_quantity

    try:
        return float(parse_quantity(value))
    except ValueError as exc:
        raise ConfigError(f"cluster: bad Kubernetes quantity {value!r}: {exc}") from None


def app(cluster: ClusterConfig, module: str, args: list[str], name: str, env: dict[str, str] | None = None):
    """A torchx AppDef running `python -m module args` under torchrun on cluster.nnodes × nproc_per_node."""
    from torchx import specs
    from torchx.specs import macros

    local = cluster.scheduler.startswith("local")
    nnodes, nproc = max(1, cluster.nnodes), max(1, cluster.nproc_per_node)
    if nnodes == 1:
        endpoint = "localhost:0"  # one agent: let it pick a free port
    else:
        # Volcano exposes task 0's hostname to every task; torchx's kubernetes scheduler names it TORCHX_RANK0_HOST
        # on task 0 and VC_<ROLE>_0_HOSTS elsewhere (the rank0_env macro). `$$` escapes torchx's own templating.
        endpoint = f"$${{{macros.rank0_env}:=localhost}}:{RDZV_PORT}"
    python = sys.executable if local else "python"
    cmd = [python, "-m", "torch.distributed.run", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
           "--rdzv_id", macros.app_id, "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
           # On SIGTERM torchrun forwards it to the ranks and waits this long for their save before SIGKILL.
           "--shutdown_timeout", str(max(1, cluster.grace_period_s - 5)),
           "-m", module, *args]
    # Keep the rendezvous variable unquoted so bash expands it; quote everything else. `exec`: torchrun becomes the
    # container's main process, so the SIGTERM of a pod deletion reaches it (bash would not forward it).
    line = "exec " + " ".join(c if "${" in c else shlex.quote(c) for c in cmd)
    role = specs.Role(
        # Volcano exports task 0's host as VC_<ROLE>_0_HOSTS: a role name with '-' would not be a shell variable.
        name="".join(c for c in name.split("-")[-1] if c.isalnum()) or "trainer",
        image=cluster.image_train,
        entrypoint="bash",
        args=["-c", line],
        num_replicas=nnodes,
        min_replicas=nnodes,
        resource=resource(cluster),
        env={"PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING", LAUNCHED: "1",
             # The endpoint is configuration, not a secret: plain env (credentials come from cluster.s3_secret).
             **({"AWS_ENDPOINT_URL": cluster.s3_endpoint} if cluster.s3_endpoint else {}), **(env or {})},
        port_map={"c10d": RDZV_PORT},
        max_retries=cluster.retries,
    )
    return specs.AppDef(name=name, roles=[role])


def resource(cluster: ClusterConfig):
    from torchx import specs

    cpu, mem = _quantity(cluster.cpu), int(_quantity(cluster.memory) / 1e6)
    if cluster.gpu_resource == GPU:
        return specs.Resource(cpu=cpu, gpu=cluster.gpus_per_node, memMB=mem)  # type: ignore[arg-type]
    # A MIG profile (nvidia.com/mig-1g.10gb, ...) is an extended resource of its own.
    devices = {cluster.gpu_resource: cluster.gpus_per_node} if cluster.gpus_per_node else {}
    return specs.Resource(cpu=cpu, gpu=0, memMB=mem, devices=devices)  # type: ignore[arg-type]


def scheduler_cfg(cluster: ClusterConfig) -> dict[str, Any]:
    if cluster.scheduler == "kubernetes":
        # torchx's Volcano scheduler needs a queue: Volcano's own default one unless another is named.
        cfg: dict[str, Any] = {"queue": cluster.queue or "default", "namespace": cluster.namespace}
        if cluster.service_account:
            cfg["service_account"] = cluster.service_account
        if cluster.priority_class:
            cfg["priority_class"] = cluster.priority_class
        return cfg
    if cluster.scheduler in ("local_cwd", "local"):
        return {}
    raise ConfigError(f"cluster.scheduler={cluster.scheduler!r}: expected local_cwd, kubernetes or trainjob")


def _patch_pods(resource: dict[str, Any], cluster: ClusterConfig) -> None:
    from kubernetes.client.models import V1EnvFromSource, V1LocalObjectReference, V1SecretEnvSource, V1Toleration

    for task in resource["spec"]["tasks"]:  # type: ignore[index]
        pod = task["template"]
        spec = pod.spec
        spec.termination_grace_period_seconds = cluster.grace_period_s
        selector, tolerations = placement(cluster)
        spec.node_selector = {**(spec.node_selector or {}), **selector} or None
        spec.tolerations = [V1Toleration(**t) for t in tolerations] or None
        pod.metadata.annotations = {**(pod.metadata.annotations or {}), **(cluster.pod_annotations or {})}
        for vol in spec.volumes or []:
            if vol.empty_dir is not None and vol.empty_dir.medium == "Memory" and cluster.shm_size:
                # NCCL needs far more than Docker's 64 MB /dev/shm; bound it so it cannot eat the node's memory.
                vol.empty_dir.size_limit = cluster.shm_size
        if cluster.image_pull_secrets:
            spec.image_pull_secrets = [V1LocalObjectReference(name=n) for n in cluster.image_pull_secrets]
        for c in spec.containers:
            c.image_pull_policy = cluster.image_pull_policy
            if cluster.s3_secret:
                c.env_from = [V1EnvFromSource(secret_ref=V1SecretEnvSource(name=cluster.s3_secret))]


def dryrun(cluster: ClusterConfig, appdef) -> tuple[Any, dict[str, Any] | list[str]]:
    """(torchx dry-run info, the job as plain data): the Volcano Job for kubernetes, the command line locally."""
    from torchx.runner import get_runner

    runner = get_runner()
    info = runner.dryrun(appdef, cluster.scheduler, cfg=scheduler_cfg(cluster))
    if cluster.scheduler == "kubernetes":
        from kubernetes.client import ApiClient

        resource = info.request.resource
        _patch_pods(resource, cluster)
        resource.setdefault("metadata", {})["namespace"] = cluster.namespace
        return info, ApiClient().sanitize_for_serialization(resource)
    return info, [str(info)]


def render(job: dict[str, Any] | list[str]) -> str:
    if isinstance(job, dict):
        return yaml.safe_dump(job, sort_keys=False)
    return "\n".join(job) + "\n"


def _signal_ranks(pid_dir: str) -> int:
    """SIGTERM every local rank that recorded its pid; returns how many were signalled."""
    n = 0
    for name in os.listdir(pid_dir):
        try:
            with open(os.path.join(pid_dir, name)) as f:
                os.kill(int(f.read().strip()), signal.SIGTERM)
            n += 1
        except (OSError, ValueError):  # already gone, or a half-written file of a rank that is only starting
            pass
    return n


def submit(cluster: ClusterConfig, appdef, stream: bool = True) -> str:
    """Submit, stream the logs of every node to stdout, wait; returns the final state name. Raises on failure.

    SIGTERM while waiting: local ranks are signalled directly and given `cluster.grace_period_s` to save; a
    Kubernetes job is cancelled (its pods then get their own grace period)."""
    from torchx.runner import get_runner
    from torchx.specs import AppState

    local = cluster.scheduler.startswith("local")
    pid_dir = tempfile.mkdtemp(prefix="kubellama-pids-") if local else ""
    if local:
        appdef.roles[0].env[PIDS] = pid_dir
    info, _ = dryrun(cluster, appdef)
    stopping: dict[str, float] = {}
    with get_runner() as runner:
        handle = runner.schedule(info)
        print(f"kubellama: submitted {handle}", flush=True)

        def on_sigterm(signum: int, frame: Any) -> None:
            if stopping:
                return
            stopping["at"] = time.monotonic()
            if local:
                print(f"kubellama: SIGTERM: asked {_signal_ranks(pid_dir)} rank(s) to save and stop", flush=True)
            else:
                runner.cancel(handle)

        # After schedule(): torchx's local scheduler installs its own handler (a 10 s kill) when it is created.
        previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is \
            threading.main_thread() else None
        threads, causes = [], []
        if stream:
            role = appdef.roles[0]
            for k in range(role.num_replicas):
                t = threading.Thread(target=_follow, args=(runner, handle, role.name, k, causes), daemon=True)
                t.start()
                threads.append(t)
        try:
            while True:
                status = runner.status(handle)
                if status is None or status.is_terminal():
                    break
                if stopping and time.monotonic() - stopping["at"] > cluster.grace_period_s:
                    runner.cancel(handle)
                    break
                time.sleep(0.5)
            status = runner.status(handle)
        except KeyboardInterrupt:
            runner.cancel(handle)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if local:
                import shutil

                shutil.rmtree(pid_dir, ignore_errors=True)
        for t in threads:
            t.join(timeout=5)
    state = status.state if status else AppState.UNKNOWN
    if state != AppState.SUCCEEDED:
        if causes:  # a rank's own one-line error (a refused resume names the key) says more than FAILED
            raise KubellamaError(f"{causes[0]} (job {handle} ended {AppState(state).name})")
        detail = f": {status.msg}" if status is not None and status.msg else ""
        raise KubellamaError(f"job {handle} ended {AppState(state).name}{detail}")
    return AppState(state).name


def _follow(runner, handle: str, role: str, k: int, causes: list[str]) -> None:
    try:
        for line in runner.log_lines(handle, role, k, should_tail=True):
            print(f"[{role}/{k}] {line}", end="" if line.endswith("\n") else "\n", flush=True)
            if (cause := rank_error(line)) is not None:
                causes.append(cause)
    except Exception as exc:  # log streaming is best effort; the job's state decides success
        print(f"kubellama: log stream of {role}/{k} ended: {exc}", file=sys.stderr)


# --- the stage launcher ----------------------------------------------------------------------------------------


def in_process(cluster: ClusterConfig) -> bool:
    """One local process: no torchx, no torchrun, train right here."""
    return cluster.scheduler.startswith("local") and cluster.nnodes * cluster.nproc_per_node <= 1


def config_url(cfg: Any, stage: str) -> str:
    return storage.join(cfg[stage].output, "config.yaml")


def job(cfg: Any, stage: str):
    """The torchx AppDef of `stage` for cfg.cluster."""
    name = f"{cfg.run.name}-{stage}".replace("_", "-")
    return app(cfg.cluster, f"kubellama.components.{stage}", ["--config", config_url(cfg, stage)], name=name)


def dryrun_text(cfg: Any, stage: str) -> str:
    if in_process(cfg.cluster):
        section = cfg[stage]
        data = f" on {section.data}" if "data" in section else ""
        steps = f", {section.max_steps} steps" if "max_steps" in section else ""
        return f"in process (cluster.nproc_per_node=1): {stage}{data} -> {section.output}{steps}\n"
    if cfg.cluster.scheduler in kube.SCHEDULERS:
        return render(kube.manifest(cfg, stage))
    _, spec = dryrun(cfg.cluster, job(cfg, stage))
    return render(spec)


def _record_pid() -> None:
    folder = os.environ.get(PIDS)
    if folder and os.path.isdir(folder):
        rank = os.environ.get("RANK", "0")
        tmp = os.path.join(folder, f".{rank}.tmp")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, os.path.join(folder, f"{rank}.pid"))


def run(cfg: Any, stage: str, train: TrainFn) -> dict:
    """Run training stage `stage` wherever cfg.cluster says and return its summary (output URLs, final metrics,
    report). `cfg` is bound (runs.bind). Raises Preempted when SIGTERM stopped it after the save; inside a KFP step
    it exits 143 instead."""
    try:
        return _run(cfg, stage, train)
    except (Preempted, kube.Stopped) as exc:
        if runs.STEP_ENV not in os.environ or dist.under_launcher():
            raise
        # KFP's executor would print a traceback and exit 1, which reads as a crash; 143 says the stage was stopped
        # by SIGTERM after saving, and a retry (or a rerun under the same run id) resumes it.
        print(f"kubellama: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None


def _run(cfg: Any, stage: str, train: TrainFn) -> dict:
    if dist.under_launcher():
        # A torchrun worker: a preempted run still exits 0 here so torchrun does not tear the other ranks down
        # mid-save; the launcher reads the report and decides.
        _record_pid()
        return train(cfg)
    if in_process(cfg.cluster):
        summary = train(cfg)
    else:
        from kubellama.components.core.recipe.config import to_yaml

        def write_config() -> None:
            storage.write_text(config_url(cfg, stage), to_yaml(cfg))

        report = storage.join(cfg[stage].output, "report.json")
        started = time.time()
        try:
            if cfg.cluster.scheduler in kube.SCHEDULERS:
                # The config is written once this launcher holds the output's lease: a refused one leaves it alone.
                kube.launch(cfg, stage, kube.manifest(cfg, stage), write_config)
            else:
                write_config()
                submit(cfg.cluster, job(cfg, stage))
        except kube.Refused:
            raise  # another writer's output: its report is not ours
        except KubellamaError:
            # A job stopped by SIGTERM may end FAILED although its ranks saved: the report says what happened.
            if not (storage.exists(report) and storage.read_json(report).get("ended", 0) >= started):
                raise
        summary = storage.read_json(report)
    if summary.get("status") == "failed":
        raise StageFailed(summary)
    if summary.get("status") == "preempted":
        raise Preempted(f"{stage} was preempted at step {summary['step']}; checkpoint {summary['checkpoint']} is "
                        f"saved: rerun with run.id={cfg.run.id} to resume")
    return summary


def main(stage: str, train: TrainFn, argv: Sequence[str] | None = None, description: str = "") -> int:
    """`kubellama <stage> [--dryrun] [--config URL] [key=value ...]` and `python -m components.<stage>`."""
    from kubellama.components.core.recipe.cli import guarded, parser
    from kubellama.components.core.recipe.config import load_config, load_resolved

    p = parser(stage.replace("_", "-"), description or f"training stage {stage}")
    p.add_argument("--dryrun", action="store_true", help="print the job that would be submitted, run nothing")
    p.add_argument("--config", help="a resolved config YAML (what launched workers receive)")
    args = p.parse_args(argv)

    def go() -> int:
        cfg = load_resolved(args.config, args.overrides) if args.config else load_config(args.overrides)
        cfg = runs.bind(cfg, stage)
        if args.dryrun:
            print(dryrun_text(cfg, stage), end="")
            return 0
        try:
            summary = run(cfg, stage, train)
        except (Preempted, kube.Stopped) as exc:
            print(f"kubellama: {exc}", file=sys.stderr)
            return EXIT_PREEMPTED
        if not dist.under_launcher() or (dist.init().lead and LAUNCHED not in os.environ):
            print(json.dumps(summary, indent=2, default=str))
        dist.shutdown()
        return 0

    return guarded(go)
