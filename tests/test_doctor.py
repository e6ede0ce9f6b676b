"""`kubellama doctor` against the tests' fake Kubernetes API and moto's S3: a complete cluster passes, and each missing
piece, planted one at a time, is named in exactly one MISSING line and fails the exit status."""
from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys

import crd
import pytest
import yaml
from fake_k8s import FakeKube

import kubellama.pipelines.doctor as doctor_cli
from kubellama.components.core.recipe.config import load_config
from kubellama.pipelines.cli import main as cli
from kubellama.pipelines.doctor import gpu, outside

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS, RELEASE, SA, SECRET = "llm", "kl", "kl-kubellama", "kubellama-s3"
SECRET_VALUE = "doctor-never-prints-this-9f3c"
TRAINJOB = ["cluster=h100", "cluster.scheduler=trainjob", "cluster.nnodes=2", "cluster.queue=team",
            f"cluster.service_account={SA}", f"cluster.s3_secret={SECRET}", "cluster.network_policy=true"]
VOLCANO = ["cluster=h100", "cluster.scheduler=kubernetes", "cluster.nnodes=2", f"cluster.service_account={SA}",
           f"cluster.s3_secret={SECRET}"]
# Where the fake keeps what the chart renders (kind -> plural), and which of them have no namespace.
PLURALS = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
           "ConfigMap": "configmaps", "NetworkPolicy": "networkpolicies", "Secret": "secrets"}


CONFIGS: dict[tuple[str, ...], object] = {}


@pytest.fixture(autouse=True)
def composed_once(monkeypatch):
    """Hydra's composition is most of a doctor run's time and a pure function of the overrides, which the doctor
    only reads: compose each set once for the whole file."""
    def cached(overrides):
        key = tuple(overrides)
        if key not in CONFIGS:
            CONFIGS[key] = load_config(overrides)
        return CONFIGS[key]

    monkeypatch.setattr(doctor_cli, "load_config", cached)


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fetch_helm.py")], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def chart_objects(helm) -> list[dict]:
    """What `helm template` renders for release kl in llm with the chart's defaults, hooks aside."""
    out = subprocess.run([helm, "template", RELEASE, os.path.join(ROOT, "helm", "kubellama"), "--namespace", NS],
                         check=True, capture_output=True, text=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return [d for d in docs if "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]


def crd_object(plural: str, group: str, version: str, schema: dict | None = None) -> dict:
    v = {"name": version, "served": True, "storage": True}
    if schema is not None:
        v["schema"] = {"openAPIV3Schema": schema}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"}, "spec": {"group": group, "versions": [v]}}


def node(name: str, gpus: int = 8, driver: str = "nvidia.com/cuda.driver-version.major") -> dict:
    """A node as the GPU operator labels it; `driver`: the driver label (older operators: cuda.driver.major)."""
    labels = {"kubernetes.io/hostname": name}
    if gpus:
        labels.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                       driver: "570"})
    return {"metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": "96", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}}}


def complete(fake: FakeKube, chart_objects: list[dict]) -> None:
    """Everything the TrainJob and the Volcano configs ask for, and the chart's objects."""
    for n in (node("gpu-0"), node("gpu-1", driver="nvidia.com/cuda.driver.major"), node("cpu-0", gpus=0)):
        fake.put("nodes", n)
    fake.put("customresourcedefinitions", crd_object("trainjobs", "trainer.kubeflow.org", "v1alpha1",
                                                     crd.load("trainer-v2.3.0/trainjobs")))
    fake.put("clustertrainingruntimes", {"metadata": {"name": "torch-distributed"}})
    fake.put("customresourcedefinitions", crd_object("localqueues", "kueue.x-k8s.io", "v1beta1"))
    fake.put("localqueues", {"metadata": {"name": "team", "namespace": NS}})
    fake.put("customresourcedefinitions", crd_object("jobs", "batch.volcano.sh", "v1alpha1"))
    fake.put("customresourcedefinitions", crd_object("queues", "scheduling.volcano.sh", "v1beta1"))
    fake.put("queues", {"metadata": {"name": "default"}})
    for obj in copy.deepcopy(chart_objects):
        obj["metadata"]["namespace"] = NS
        fake.put(PLURALS[obj["kind"]], obj)
    data = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE}
    fake.put("secrets", {"metadata": {"name": SECRET, "namespace": NS},
                         "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    # The run's service account may do anything, and nobody else may: the reviews must name it.
    fake.authorize = lambda spec: spec.get("user") == f"system:serviceaccount:{NS}:{SA}"


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """One bucket for the file, so the configs repeat (the doctor's probe leaves nothing in it)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="kl-doctor")
    return "s3://kl-doctor"


@pytest.fixture
def cluster(tmp_path, monkeypatch, bucket, helm, chart_objects):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the pod's own service account
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)  # moto takes any; the output must not show it
    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", fake.kubeconfig(str(tmp_path / "kubeconfig")))
        complete(fake, chart_objects)
        fake.bucket = bucket
        yield fake


def doctor(capsys, fake: FakeKube, overrides: list[str], *flags: str) -> tuple[int, list[str]]:
    rc = cli(["doctor", "--namespace", NS, "--release", RELEASE, "--helm", fake.helm, *flags,
              f"run.root={fake.bucket}/runs", *overrides])
    out, err = capsys.readouterr()
    assert SECRET_VALUE not in out + err
    lines = out.splitlines()
    assert lines and all(re.match(r"(ok  |MISSING )\S", line) for line in lines), out
    return rc, lines


@pytest.fixture
def run(cluster, capsys, helm):
    cluster.helm = helm
    return lambda overrides, *flags: doctor(capsys, cluster, overrides, *flags)


def only_missing(rc: int, lines: list[str]) -> str:
    bad = [line for line in lines if not line.startswith("ok  ")]
    assert rc == 1 and len(bad) == 1, "\n".join(lines)
    return bad[0]


@pytest.mark.parametrize("overrides", [TRAINJOB, VOLCANO], ids=["trainjob", "volcano"])
def test_a_complete_cluster_passes(run, cluster, chart_objects, overrides):
    rc, lines = run(overrides)
    assert rc == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "GPU nodes (nvidia.com/gpu.present=true,nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3): 2 with 8" in text
    assert "NVIDIA driver >= 570 for CUDA 12.8 of ghcr.io/kubellama/train:0.1.0" in text
    assert f"kfp-launcher ConfigMap in {NS} (defaultPipelineRoot s3://kubellama/runs/kfp)" in text
    assert f"S3 run root {cluster.bucket}/runs (write, read, delete)" in text
    # Every object the chart renders was looked up (kfp-launcher by its own check).
    assert len(chart_objects) > 4
    assert f"Helm chart objects of release kl in llm: {len(chart_objects) - 1} present (1 more checked above)" in text
    if overrides is TRAINJOB:
        assert "Kubeflow Trainer >= v2.2" in text and "Kueue LocalQueue team in llm" in text
    else:
        assert "Volcano (CRD jobs.batch.volcano.sh serving v1alpha1)" in text and "Volcano queue default" in text
    # The API server's own access reviews, for the run's service account, decided the rights.
    reviews = cluster.find("POST", "/subjectaccessreviews")
    job = "trainjobs" if overrides is TRAINJOB else "jobs"
    asked = {(r["spec"]["resourceAttributes"]["verb"], r["spec"]["resourceAttributes"]["resource"])
             for r in (json.loads(q["body"]) for q in reviews)}
    assert {("create", job), ("delete", job), ("list", "pods"), ("get", "pods"), ("get", "configmaps")} <= asked
    assert not cluster.find("POST", "/selfsubjectaccessreviews")
    import boto3

    left = boto3.client("s3").list_objects_v2(Bucket=cluster.bucket.removeprefix("s3://")).get("KeyCount")
    assert left == 0  # the S3 probe cleans up after itself


def _labels(fake: FakeKube, name: str) -> dict:
    return fake.get("nodes", "", name)["metadata"]["labels"]


def _deny(fake: FakeKube, verb: str, resource: str, sub: str = "") -> None:
    allowed = fake.authorize
    fake.authorize = lambda spec: allowed(spec) and not (
        spec["resourceAttributes"]["verb"] == verb and spec["resourceAttributes"]["resource"] == resource
        and spec["resourceAttributes"].get("subresource", "") == sub)


def _drop(fake: FakeKube, plural: str, ns: str, name: str) -> None:
    del fake.objects[(plural, ns, name)]


def _old_trainer(fake: FakeKube) -> None:
    schema = fake.get("customresourcedefinitions", "", "trainjobs.trainer.kubeflow.org")["spec"]["versions"][0]
    del schema["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["runtimePatches"]


# name -> (what to break, overrides, what the one MISSING line names)
PLANTED = {
    "no-gpu-operator": (lambda f: [_labels(f, n).pop("nvidia.com/gpu.present") for n in ("gpu-0", "gpu-1")],
                        TRAINJOB, "no node carries nvidia.com/gpu.present=true: install the NVIDIA GPU operator"),
    "gpu-product": (lambda f: [_labels(f, n).update({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"})
                               for n in ("gpu-0", "gpu-1")], TRAINJOB, "GPU nodes are NVIDIA-A100-SXM4-80GB"),
    "one-gpu-node": (lambda f: _drop(f, "nodes", "", "gpu-1"), TRAINJOB, "cluster.nnodes=2 needs 2"),
    "gpus-in-use": (lambda f: f.get("nodes", "", "gpu-1")["status"]["allocatable"].update({"nvidia.com/gpu": "4"}),
                    TRAINJOB, "gpu-1 (4)"),
    "old-driver": (lambda f: _labels(f, "gpu-1").update({"nvidia.com/cuda.driver.major": "550"}),
                   TRAINJOB, "NVIDIA driver >= 570 for CUDA 12.8 of ghcr.io/kubellama/train:0.1.0: gpu-1 (550)"),
    "cuda13-image": (lambda f: None, [*TRAINJOB, "cluster.image_train=pytorch/pytorch:2.9.0-cuda13.0-cudnn9-runtime"],
                     "NVIDIA driver >= 580 for CUDA 13.0"),
    "no-driver-label": (lambda f: _labels(f, "gpu-0").pop("nvidia.com/cuda.driver-version.major"), TRAINJOB,
                        "gpu-0 carry no nvidia.com/cuda.driver-version.major label"),
    "no-trainer": (lambda f: _drop(f, "customresourcedefinitions", "", "trainjobs.trainer.kubeflow.org"), TRAINJOB,
                   "Kubeflow Trainer v2 (CRD trainjobs.trainer.kubeflow.org): install Kubeflow Trainer v2.3.0"),
    "old-trainer": (_old_trainer, TRAINJOB, "Kubeflow Trainer >= v2.2"),
    "no-runtime": (lambda f: _drop(f, "clustertrainingruntimes", "", "torch-distributed"), TRAINJOB,
                   "ClusterTrainingRuntime torch-distributed"),
    "no-kueue": (lambda f: _drop(f, "customresourcedefinitions", "", "localqueues.kueue.x-k8s.io"), TRAINJOB,
                 "Kueue (CRD localqueues.kueue.x-k8s.io)"),
    "no-localqueue": (lambda f: _drop(f, "localqueues", NS, "team"), TRAINJOB, "Kueue LocalQueue team in llm"),
    "no-volcano": (lambda f: _drop(f, "customresourcedefinitions", "", "jobs.batch.volcano.sh"), VOLCANO,
                   "Volcano (CRD jobs.batch.volcano.sh"),
    "no-volcano-queue": (lambda f: _drop(f, "queues", "", "default"), VOLCANO, "Volcano queue default"),
    "no-kfp-launcher": (lambda f: _drop(f, "configmaps", NS, "kfp-launcher"), TRAINJOB,
                        "kfp-launcher ConfigMap in llm"),
    "no-s3-secret": (lambda f: _drop(f, "secrets", NS, SECRET), TRAINJOB, f"S3 Secret {SECRET} in llm"),
    "s3-secret-keys": (lambda f: f.get("secrets", NS, SECRET)["data"].pop("AWS_SECRET_ACCESS_KEY"), TRAINJOB,
                       "it lacks AWS_SECRET_ACCESS_KEY"),
    "rbac-trainjobs": (lambda f: _deny(f, "create", "trainjobs"), TRAINJOB,
                       "may create trainjobs.trainer.kubeflow.org in llm (may get, patch, delete)"),
    "rbac-volcano": (lambda f: _deny(f, "delete", "jobs"), VOLCANO, "may delete jobs.batch.volcano.sh in llm"),
    "rbac-pod-logs": (lambda f: _deny(f, "get", "pods", "log"), TRAINJOB, "may get pods/log in llm"),
    "rbac-networkpolicies": (lambda f: _deny(f, "create", "networkpolicies"), TRAINJOB,
                             "may create networkpolicies.networking.k8s.io in llm"),
    "rbac-kfp-launcher": (lambda f: _deny(f, "get", "configmaps"), TRAINJOB, "may get configmaps kfp-launcher"),
    "no-bucket": (lambda f: setattr(f, "bucket", "s3://kl-no-such-bucket"), TRAINJOB, "S3 run root"),
    "chart-role": (lambda f: _drop(f, "roles", NS, SA), TRAINJOB, "Role kl-kubellama absent: helm upgrade --install"),
}


@pytest.mark.parametrize("planted", list(PLANTED))
def test_each_missing_piece_is_named_in_one_line(run, cluster, planted):
    plant, overrides, named = PLANTED[planted]
    plant(cluster)
    line = only_missing(*run(overrides))
    assert line.startswith("MISSING ") and named in line, line


def test_without_a_service_account_it_asks_about_the_current_user(run, cluster):
    cluster.authorize = lambda spec: "user" not in spec and spec["resourceAttributes"]["verb"] != "list"
    line = only_missing(*run([o for o in TRAINJOB if "service_account" not in o]))
    assert line.startswith("MISSING you (no cluster.service_account: the current user) may list pods in llm")
    assert cluster.find("POST", "/selfsubjectaccessreviews")


def test_one_node_needs_no_volcano_or_trainer(run, cluster):
    for name in ("trainjobs.trainer.kubeflow.org", "jobs.batch.volcano.sh"):
        _drop(cluster, "customresourcedefinitions", "", name)
    rc, lines = run(["cluster=h100", f"cluster.service_account={SA}", f"cluster.s3_secret={SECRET}"], "--no-chart")
    assert rc == 0 and any("the step's own pod trains (no Volcano or Trainer needed)" in line for line in lines)
    assert not any("Helm chart" in line for line in lines)


def test_an_unreachable_api_is_one_line(tmp_path, monkeypatch, capsys, bucket):
    with FakeKube() as fake:
        kubeconfig = fake.kubeconfig(str(tmp_path / "kubeconfig"))
    monkeypatch.setenv("KUBECONFIG", kubeconfig)  # the server is gone: connection refused
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc = cli(["doctor", *TRAINJOB, f"run.root={bucket}/runs"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1 and lines[0].startswith("MISSING Kubernetes API: cannot reach the Kubernetes API at")
    assert lines[1:] == [f"ok  S3 run root {bucket}/runs (write, read, delete)"]


def test_the_driver_table_and_the_image_cuda():
    assert gpu.min_driver((12, 8)) == 570 and gpu.min_driver((13, 0)) == 580
    assert gpu.min_driver((12, 7)) == 560  # no 12.7 release: the newest before it
    assert gpu.min_driver((14, 0)) is None
    with open(os.path.join(ROOT, "images", "docker-bake.hcl")) as f:
        base = re.search(r'variable "TRAIN_BASE" \{ default = "([^"]+)" \}', f.read())[1]
    # The training image's CUDA, as the preflight assumes it, is the one its base image is built for.
    assert gpu.image_cuda(base) == gpu.TRAIN_CUDA
    assert gpu.image_cuda("ghcr.io/kubellama/train:0.1.0") == gpu.TRAIN_CUDA
    assert gpu.image_cuda("registry:5000/team/train:cuda12.4-v1") == (12, 4)
    assert gpu.image_cuda("nvcr.io/nvidia/pytorch:25.01-py3") is None


def test_error_messages_lose_the_keys(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")  # too short to be a key: masking it would garble the message
    assert outside.scrub(f"denied for\n{SECRET_VALUE} at a bucket") == "denied for *** at a bucket"
