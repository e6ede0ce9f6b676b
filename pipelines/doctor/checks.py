"""What the chosen scheduler needs installed (Volcano, or Kubeflow Trainer v2 and Kueue), the namespace's objects a run
reads (kfp-launcher, the S3 Secret, the PriorityClass), and the account's rights, asked of the API server."""
from __future__ import annotations

from dataclasses import dataclass

from kubellama.components.core.launch import trainjob
from kubellama.components.core.launch.manifests import KINDS
from kubellama.components.core.launch.pods import S3_KEYS
from kubellama.conf.schema import Config
from kubellama.pipelines.doctor.check import Check, missing, ok
from kubellama.pipelines.doctor.kube import Api, served
from kubellama.pipelines.k8s import trains_in_pod

LAUNCHER = "kfp-launcher"
VOLCANO_JOB = KINDS["batch.volcano.sh/v1alpha1/Job"]
TRAINJOB = KINDS[f"{trainjob.API_VERSION}/{trainjob.KIND}"]
TRAINER_REPO = "https://github.com/kubeflow/trainer.git/manifests/overlays"
KUEUE = "kueue.x-k8s.io"


def _crd_name(plural: str, group: str) -> str:
    return f"{plural}.{group}"


def scheduler_checks(api: Api, cfg: Config) -> list[Check]:
    """What creates and schedules a multi-node job: Volcano (scheduler kubernetes) or Trainer v2 (trainjob), with
    the queue the config names. One node trains in the step's own pod and needs neither."""
    c = cfg.cluster
    if trains_in_pod(cfg):
        return [ok(f"training scheduler: cluster.scheduler={c.scheduler}, cluster.nnodes={c.nnodes}: the step's own "
                   "pod trains (no Volcano or Trainer needed)")]
    if c.scheduler == "kubernetes":
        return _volcano(api, cfg)
    return _trainer(api, cfg) + _kueue(api, cfg)


def _volcano(api: Api, cfg: Config) -> list[Check]:
    name = _crd_name(VOLCANO_JOB.plural, VOLCANO_JOB.group)
    crd = api.crd(name)
    if crd is None or VOLCANO_JOB.version not in served(crd):
        return [missing(f"Volcano (CRD {name} serving {VOLCANO_JOB.version})",
                        "install Volcano (https://volcano.sh/en/docs/installation/), or use "
                        "cluster.scheduler=trainjob")]
    checks = [ok(f"Volcano (CRD {name} serving {VOLCANO_JOB.version})")]
    queue = cfg.cluster.queue or "default"  # torchx's Volcano scheduler falls back to Volcano's own default queue
    queues = api.crd(_crd_name("queues", "scheduling.volcano.sh"))
    found = queues and served(queues) and api.get(f"/apis/scheduling.volcano.sh/{served(queues)[0]}/queues/{queue}")
    what = f"Volcano queue {queue}"
    return checks + [ok(what) if found else missing(what, f"create the Volcano Queue {queue}, or set cluster.queue "
                                                          "to an existing one (kubectl get queues)")]


def _trainer(api: Api, cfg: Config) -> list[Check]:
    c = cfg.cluster
    name = _crd_name(TRAINJOB.plural, TRAINJOB.group)
    install = (f"install Kubeflow Trainer {trainjob.TRAINER_VERSION}: kubectl apply --server-side -k "
               f"\"{TRAINER_REPO}/manager?ref={trainjob.TRAINER_VERSION}\"")
    crd = api.crd(name)
    if crd is None:
        return [missing(f"Kubeflow Trainer v2 (CRD {name})", install)]
    what = f"Kubeflow Trainer >= v2.2 (CRD {name} serving {TRAINJOB.version} with spec.runtimePatches)"
    versions = {v["name"]: v for v in crd["spec"].get("versions") or [] if v.get("served")}
    schema = (versions.get(TRAINJOB.version) or {}).get("schema", {}).get("openAPIV3Schema", {})
    spec = schema.get("properties", {}).get("spec", {}).get("properties", {})
    # runtimePatches arrived in Trainer v2.2; an older API server would drop the launcher's pod settings.
    checks = [ok(what) if "runtimePatches" in spec else missing(what, install.replace("install", "upgrade to", 1))]
    kind = c.runtime_kind
    path = f"/apis/{TRAINJOB.api_version}/{kind.lower()}s/{c.runtime}"
    where = ""
    if kind == "TrainingRuntime":
        path = f"/apis/{TRAINJOB.api_version}/namespaces/{c.namespace}/trainingruntimes/{c.runtime}"
        where = f" in {c.namespace}"
    what = f"{kind} {c.runtime}{where} (cluster.runtime)"
    fix = (f"install Trainer's runtimes (kubectl apply --server-side -k \"{TRAINER_REPO}/runtimes?ref="
           f"{trainjob.TRAINER_VERSION}\"), or the chart's (trainingRuntime.create=true), or set cluster.runtime")
    return checks + [ok(what) if api.get(path, metadata_only=True) else missing(what, fix)]


def _kueue(api: Api, cfg: Config) -> list[Check]:
    c = cfg.cluster
    if not c.queue:
        return [ok("Kueue: not asked for (no cluster.queue)")]
    crd = api.crd(_crd_name("localqueues", KUEUE))
    if crd is None or not served(crd):
        return [missing(f"Kueue (CRD localqueues.{KUEUE}) for cluster.queue={c.queue}",
                        "install Kueue (https://kueue.sigs.k8s.io/docs/installation/), or drop cluster.queue")]
    path = f"/apis/{KUEUE}/{served(crd)[0]}/namespaces/{c.namespace}/localqueues/{c.queue}"
    what = f"Kueue LocalQueue {c.queue} in {c.namespace} (cluster.queue)"
    return [ok(what) if api.get(path, metadata_only=True) else
            missing(what, f"create a LocalQueue {c.queue} in {c.namespace} pointing at a ClusterQueue with GPUs, or "
                          "set cluster.queue to an existing one (kubectl get localqueues)")]


def namespace_checks(api: Api, cfg: Config) -> list[Check]:
    """The objects of the namespace a run reads: KFP's artifact store config, the S3 keys, the priority class."""
    c, ns = cfg.cluster, cfg.cluster.namespace
    launcher = api.get(f"/api/v1/namespaces/{ns}/configmaps/{LAUNCHER}")
    what = f"{LAUNCHER} ConfigMap in {ns}"
    checks = [ok(f"{what} (defaultPipelineRoot {launcher.get('data', {}).get('defaultPipelineRoot', 'unset')})")
              if launcher else
              missing(what, "in a Kubeflow profile namespace the profile controller makes it (is this one?); "
                            "elsewhere install the chart with kfp.launcherConfig=true")]
    if not c.s3_secret:
        checks.append(ok("S3 credentials: no cluster.s3_secret, pods use their service account's identity (IRSA)"))
    else:
        what = f"S3 Secret {c.s3_secret} in {ns} (cluster.s3_secret)"
        secret = api.get(f"/api/v1/namespaces/{ns}/secrets/{c.s3_secret}")  # its keys' names only are looked at
        lacking = [k for k in S3_KEYS if k not in ((secret or {}).get("data") or {})]
        create = (f"kubectl -n {ns} create secret generic {c.s3_secret} "
                  + " ".join(f"--from-literal={k}=..." for k in S3_KEYS))
        if secret is None:
            checks.append(missing(what, create))
        elif lacking:
            checks.append(missing(what, f"it lacks {', '.join(lacking)}: add them ({create})"))
        else:
            checks.append(ok(f"{what} holds {', '.join(S3_KEYS)}"))
    if c.priority_class:
        what = f"PriorityClass {c.priority_class} (cluster.priority_class)"
        found = api.get(f"/apis/scheduling.k8s.io/v1/priorityclasses/{c.priority_class}", metadata_only=True)
        checks.append(ok(what) if found else missing(what, "create it (the chart's priorityClass.create=true), or "
                                                          "drop cluster.priority_class"))
    return checks


def covered(cfg: Config) -> set[tuple[str, str]]:
    """(kind, name) of the objects the checks above look at, which the chart check leaves to them."""
    c = cfg.cluster
    objs = {("ConfigMap", LAUNCHER)}
    if c.s3_secret:
        objs.add(("Secret", c.s3_secret))
    if c.priority_class:
        objs.add(("PriorityClass", c.priority_class))
    if c.scheduler == "trainjob" and not trains_in_pod(cfg):
        objs.add((c.runtime_kind, c.runtime))
    return objs


@dataclass(frozen=True)
class Need:
    group: str
    resource: str
    verbs: tuple[str, ...]
    name: str = ""
    # The chart's values that grant it (helm/kubellama/templates/rbac.yaml).
    chart: str = "rbac.create=true"

    @property
    def label(self) -> str:
        what = f"{self.resource}.{self.group}" if self.group else self.resource
        return f"{what} {self.name}" if self.name else what


def needs(cfg: Config) -> list[Need]:
    """What the runs of `cfg` do with the Kubernetes API: read the launcher config and S3 keys in every step, and for
    a multi-node job what the training launcher does (components/core/launch/kube.py)."""
    c = cfg.cluster
    out = [Need("", "configmaps", ("get",), LAUNCHER)]
    if c.s3_secret:
        out.append(Need("", "secrets", ("get",), c.s3_secret))
    if not trains_in_pod(cfg):
        kind, flag = (VOLCANO_JOB, "rbac.volcano") if c.scheduler == "kubernetes" else (TRAINJOB, "rbac.trainjob")
        out += [Need(kind.group, kind.plural, ("create", "get", "patch", "delete"), chart=f"{flag}=true"),
                Need("", "pods", ("list",), chart=f"{flag}=true"),
                Need("", "pods/log", ("get",), chart=f"{flag}=true")]
        if c.network_policy:
            out.append(Need("networking.k8s.io", "networkpolicies", ("create",), chart="networkPolicy.enabled=true"))
    return out


def rbac_checks(api: Api, cfg: Config) -> list[Check]:
    c, ns = cfg.cluster, cfg.cluster.namespace
    who = f"service account {ns}/{c.service_account}" if c.service_account else \
        "you (no cluster.service_account: the current user)"
    checks = []
    for need in needs(cfg):
        denied = [v for v in need.verbs if not api.may(v, need.group, need.resource, ns, need.name,
                                                       c.service_account)]
        if denied:
            allowed = [v for v in need.verbs if v not in denied]
            also = f" (may {', '.join(allowed)})" if allowed else ""
            checks.append(missing(f"{who} may {', '.join(denied)} {need.label} in {ns}{also}",
                                  f"bind a Role granting it (the chart's {need.chart} does)"))
        else:
            checks.append(ok(f"{who} may {', '.join(need.verbs)} {need.label} in {ns}"))
    return checks
