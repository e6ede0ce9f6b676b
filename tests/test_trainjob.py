"""Multi-node jobs on Kubernetes: the TrainJob (dry run, checked against the Trainer v2.3.0 CRD) and the launcher
against a fake Kubernetes API, for TrainJobs and Volcano Jobs alike: one job per run and stage, adopted on retry,
deleted on SIGTERM and timeout, one writer per output."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import crd
import pytest
import yaml
from fake_k8s import FakeKube

from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.launch import kube, lease, manifests, pods, trainjob
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import load_config
from kubellama.pipelines.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINJOB = ["cluster=h100", "cluster.nnodes=2", "cluster.scheduler=trainjob"]


@pytest.fixture(scope="module")
def schema() -> dict:
    return crd.load("trainer-v2.3.0/trainjobs")


def dryrun(capsys, *overrides: str) -> dict:
    assert cli(["pretrain", *overrides, "--dryrun"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_dryrun_prints_a_trainjob_valid_against_the_crd(capsys, schema):
    job = dryrun(capsys, *TRAINJOB, "run.root=s3://bucket/p")
    assert crd.validate(job, schema) == []
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]  # no queue named, no Kueue label
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    t = spec["trainer"]
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 8
    assert t["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1000Gi"}
    # torchrun takes nodes, rank and master from the runtime's PET_* variables; none of those may be set here.
    assert t["command"][:3] == ["python", "-m", "torch.distributed.run"] and "--nnodes" not in t["command"]
    assert not [e for e in t["env"] if e["name"].startswith("PET_")]
    assert t["command"][-2:] == ["--config", f"s3://bucket/p/{t['command'][-1].split('/')[-3]}/pretrain/config.yaml"]
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "kubellama.io/launcher"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true",
                                           "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["spec"]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]
    assert pod["spec"]["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm",
                                                                           "mountPath": "/dev/shm"}]}]
    assert pod["metadata"]["labels"][manifests.JOB_LABEL] == job["metadata"]["name"]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_trainjob_carries_every_cluster_setting(capsys, schema):
    job = dryrun(capsys, *TRAINJOB, "run.root=s3://bucket/p", "run.id=r1", "cluster.queue=team-gpus",
                 "cluster.namespace=ml", "cluster.service_account=trainer", "cluster.s3_secret=s3-creds",
                 "cluster.s3_endpoint=http://minio:9000", "cluster.image_pull_secrets=[regcred]",
                 "cluster.timeout_s=7200", "cluster.grace_period_s=90", "cluster.runtime=kl-torch",
                 "cluster.runtime_kind=TrainingRuntime",
                 "cluster.tolerations=[{key: dedicated, operator: Equal, value: llm, effect: NoSchedule}]")
    assert crd.validate(job, schema) == []
    assert job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "kl-torch" and spec["runtimeRef"]["kind"] == "TrainingRuntime"
    assert spec["activeDeadlineSeconds"] == 7200
    env = {e["name"]: e for e in spec["trainer"]["env"]}
    assert env["AWS_ENDPOINT_URL"] == {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds",
                                                                          "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_REGION"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "--shutdown_timeout" in spec["trainer"]["command"]
    assert spec["trainer"]["command"][spec["trainer"]["command"].index("--shutdown_timeout") + 1] == "85"
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    podspec = pod["template"]["spec"]["template"]["spec"]
    assert podspec["serviceAccountName"] == "trainer" and podspec["imagePullSecrets"] == [{"name": "regcred"}]
    assert podspec["terminationGracePeriodSeconds"] == 90
    assert {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"} in podspec["tolerations"]
    # No queue, no Kueue label.
    assert "kueue.x-k8s.io/queue-name" not in dryrun(capsys, *TRAINJOB, "run.root=s3://b/p", "cluster.queue=")[
        "metadata"]["labels"]


def test_the_crd_check_refuses_what_the_api_server_would(capsys, schema):
    """The validator is not a rubber stamp: the 2.0/2.1 field names, a string numProcPerNode, a bad name, a
    duplicate patch manager and a stray field are each reported."""
    job = dryrun(capsys, *TRAINJOB, "run.root=s3://bucket/p")
    cases = {
        "podSpecOverrides": lambda j: j["spec"].update(podSpecOverrides=[]),
        "podTemplateOverrides": lambda j: j["spec"].update(podTemplateOverrides=[]),
        "numProcPerNode": lambda j: j["spec"]["trainer"].update(numProcPerNode="auto"),
        "RFC 1035": lambda j: j["metadata"].update(name="9-" + j["metadata"]["name"]),
        "63 characters": lambda j: j["metadata"].update(name="a" * 64),
        "duplicate entries": lambda j: j["spec"]["runtimePatches"].append(j["spec"]["runtimePatches"][0]),
        "'labels' was unexpected": lambda j: j["spec"].update(labels={"a": "b"}),
        "invalid label": lambda j: j["metadata"]["labels"].update({"kueue.x-k8s.io/queue-name": "a b"}),
    }
    for expect, change in cases.items():
        bad = copy.deepcopy(job)
        change(bad)
        errors = crd.validate(bad, schema)
        assert any(expect in e for e in errors), (expect, errors)


def test_job_names_are_one_per_run_and_stage():
    def cfg(*extra: str):
        return runs.bind(load_config([*TRAINJOB, "run.root=s3://b/p", *extra]), "pretrain")

    a, again, other = cfg("run.id=a"), cfg("run.id=a"), cfg("run.id=b")
    name = manifests.job_name(a, "pretrain")
    assert name == manifests.job_name(again, "pretrain") != manifests.job_name(other, "pretrain")
    assert name.startswith("kl-pretrain-") and len(name) <= 40
    # The same spec under the same name: what a retried step compares before adopting.
    assert manifests.manifest(a, "pretrain") == manifests.manifest(again, "pretrain")
    changed = manifests.manifest(cfg("run.id=a", "cluster.nproc_per_node=4"), "pretrain")
    assert changed["metadata"]["name"] == name
    assert changed["metadata"]["annotations"] != manifests.manifest(a, "pretrain")["metadata"]["annotations"]
    with pytest.raises(ConfigError, match="local path, which pods on Kubernetes cannot share"):
        manifests.manifest(runs.bind(load_config([*TRAINJOB, "run.root=/tmp/x"]), "pretrain"), "pretrain")
    with pytest.raises(ConfigError, match="cluster.runtime_kind='Runtime'"):
        manifests.manifest(cfg("run.id=a", "cluster.runtime_kind=Runtime"), "pretrain")


def test_volcano_job_gets_the_deterministic_name_everywhere(capsys):
    job = dryrun(capsys, "cluster=h100", "cluster.nnodes=2", "run.root=s3://bucket/p", "run.id=r1")
    name = job["metadata"]["name"]
    cfg = runs.bind(load_config(["cluster=h100", "cluster.nnodes=2", "run.root=s3://bucket/p", "run.id=r1"]),
                    "pretrain")
    assert name == manifests.job_name(cfg, "pretrain")
    for task in job["spec"]["tasks"]:
        labels = task["template"]["metadata"]["labels"]
        assert labels[manifests.JOB_LABEL] == name and labels["app.kubernetes.io/instance"] == name
        assert f"--rdzv_id {name}" in task["template"]["spec"]["containers"][0]["command"][-1]


# --- the launcher against a fake API ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """A multi-node engine as the launcher drives it: its overrides, the job's plural and kind, and how a failed
    job of it looks and is reported."""
    overrides: tuple[str, ...]
    plural: str
    kind: str
    failed: dict
    failure: str


ENGINES = {
    "trainjob": Engine(tuple(TRAINJOB), trainjob.PLURAL, trainjob.KIND,
                       {"conditions": [{"type": "Failed", "status": "True", "reason": "x", "message": "y"}]},
                       "failed: BackoffLimitExceeded: node 1 exited 1"),
    "volcano": Engine(("cluster=h100", "cluster.nnodes=2", "cluster.scheduler=kubernetes"), "jobs", "Job",
                      {"state": {"phase": "Failed"}}, "failed: Failed"),
}


@pytest.fixture(params=list(ENGINES))
def engine(request) -> Engine:
    return ENGINES[request.param]


@pytest.fixture
def api(tmp_path, monkeypatch, schema):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube, "POLL_S", 0.05)
    monkeypatch.setattr(lease, "LEASE_SETTLE_S", 0.05)
    # TrainJobs are checked against the Trainer v2.3.0 CRD as the API server would (fields it lacks are dropped,
    # or refused under fieldValidation=Strict).
    with FakeKube(schemas={trainjob.PLURAL: schema}) as fake:
        monkeypatch.setenv("KUBECONFIG", fake.kubeconfig(str(tmp_path / "kubeconfig")))
        yield fake


def bound(root: str, *extra: str, engine: Engine = ENGINES["trainjob"]):
    return runs.bind(load_config([*engine.overrides, f"run.root={root}", "cluster.namespace=ml", *extra]),
                     "pretrain")


def finish_with_report(cfg, ok: bool = True):
    """The fake controller: two pods that log, then the job ends and rank 0's report is in the output."""
    def on_create(fake: FakeKube, job: dict) -> None:
        pods = fake.start_pods(job, 2)

        def later():
            time.sleep(0.3)
            for p in pods:
                fake.log("ml", p, f"hello from {p}")
            storage.write_json(storage.join(cfg.pretrain.output, "report.json"),
                               {"status": "done", "ended": time.time(), "step": 3})
            fake.finish(manifests.kind_of(job).plural, "ml", job["metadata"]["name"], ok)

        threading.Thread(target=later, daemon=True).start()

    return on_create


def test_launch_creates_owns_streams_and_cleans_up(api, engine, s3_bucket, monkeypatch, capsys):
    cfg = bound(f"{s3_bucket}/runs", "run.id=k1", "cluster.network_policy=true", engine=engine)
    monkeypatch.setenv("KFP_POD_NAME", "step-pod")
    monkeypatch.setenv("KFP_POD_UID", "uid-1")
    monkeypatch.setenv("NAMESPACE", "ml")
    api.on_create = finish_with_report(cfg)
    summary = launch.run(cfg, "pretrain", train=None)
    assert summary["status"] == "done"
    (create,) = api.find("POST", f"/{engine.plural}")
    # Strict for TrainJobs only: an older Trainer refuses rather than drop runtimePatches.
    assert create["query"].get("fieldValidation") == (["Strict"] if engine.plural == trainjob.PLURAL else None)
    job = yaml.safe_load(create["body"])
    name = manifests.job_name(cfg, "pretrain")
    assert job["metadata"]["name"] == name and job["kind"] == engine.kind
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "step-pod",
                                                   "uid": "uid-1"}]
    (policy,) = api.find("POST", "/networkpolicies")
    body = yaml.safe_load(policy["body"])
    assert body["spec"]["podSelector"] == {"matchLabels": {manifests.JOB_LABEL: name}}
    assert body["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {manifests.JOB_LABEL: name}}}]}]
    (owner,) = body["metadata"]["ownerReferences"]
    assert owner["kind"] == engine.kind and owner["name"] == name
    assert body["metadata"]["name"] == f"{name}-{owner['uid'].split('-')[0]}"
    out = capsys.readouterr().out
    assert "hello from" in out and f"submitted {engine.plural} ml/{name}" in out
    assert api.find("DELETE", f"/{engine.plural}/{name}") and api.get(engine.plural, "ml", name) is None
    assert not storage.exists(storage.join(cfg.pretrain.output, lease.LEASE))
    # Every pod request was a list by the job's label; logs were read per pod (what the Role allows: list, log).
    assert all(r["query"].get("labelSelector") == [f"{manifests.JOB_LABEL}={name}"]
               for r in api.find("GET", "/pods") if not r["path"].endswith("/log"))


def test_a_retried_step_attaches_to_its_running_job(api, engine, s3_bucket, monkeypatch, capsys):
    cfg = bound(f"{s3_bucket}/runs", "run.id=k2", engine=engine)
    job = manifests.manifest(cfg, "pretrain")
    name = job["metadata"]["name"]
    api.put(engine.plural, copy.deepcopy(job))  # the first attempt's job, still running
    config = pods.config_url(cfg, "pretrain")
    storage.write_text(config, "the first attempt's config")
    finish_with_report(cfg)(api, job)
    monkeypatch.setenv("KFP_POD_NAME", "step-pod-retry")
    monkeypatch.setenv("KFP_POD_UID", "uid-2")
    monkeypatch.setenv("NAMESPACE", "ml")
    assert launch.run(cfg, "pretrain", train=None)["status"] == "done"
    assert not api.find("POST", f"/{engine.plural}")  # no second job
    (patch,) = api.find("PATCH", f"/{engine.plural}/{name}")
    assert yaml.safe_load(patch["body"])["metadata"]["ownerReferences"][0]["uid"] == "uid-2"
    assert f"attached to {engine.plural} ml/{name}" in capsys.readouterr().out
    assert storage.read_text(config) == "the first attempt's config"  # what the running job read stays


def test_existing_jobs_are_refused_or_replaced(api, engine, s3_bucket):
    cfg = bound(f"{s3_bucket}/runs", "run.id=k3", engine=engine)
    job = manifests.manifest(cfg, "pretrain")
    name = job["metadata"]["name"]
    other = copy.deepcopy(job)
    other["metadata"]["annotations"][manifests.SPEC_HASH] = "0000"
    api.put(engine.plural, other)
    with pytest.raises(lease.Refused, match="already exists with another spec"):
        kube.launch(cfg, "pretrain", copy.deepcopy(job), start=lambda: pytest.fail("started a refused job"))
    assert api.get(engine.plural, "ml", name) is not None and not api.find("DELETE")  # not ours: left alone
    # A failed earlier attempt is deleted and started again.
    failed = copy.deepcopy(job)
    failed["status"] = engine.failed
    api.put(engine.plural, failed)
    api.on_create = finish_with_report(cfg)
    started = []
    assert kube.launch(cfg, "pretrain", copy.deepcopy(job), start=lambda: started.append(1)) == "succeeded"
    assert started == [1]
    assert len(api.find("DELETE", f"/{engine.plural}/{name}")) == 2 and len(api.find("POST", f"/{engine.plural}")) == 1


def test_a_replaced_job_gets_its_own_network_policy(api, engine, s3_bucket):
    """The policy of a failed job lives on until the garbage collector deletes it with that job, after the job that
    replaces it (same name) has started: the new job's pods must have a policy of their own."""
    cfg = bound(f"{s3_bucket}/runs", "run.id=k8", "cluster.network_policy=true", engine=engine)
    job = manifests.manifest(cfg, "pretrain")
    failed = api.put(engine.plural, {**copy.deepcopy(job), "status": engine.failed})
    meta = failed["metadata"]
    api.put("networkpolicies", {"metadata": {"name": manifests.policy_name(failed), "namespace": "ml",
                                             "ownerReferences": [{"apiVersion": job["apiVersion"], "kind": job["kind"],
                                                                  "name": meta["name"], "uid": meta["uid"]}]}})
    finish = finish_with_report(cfg)
    policies: list[dict] = []

    def on_create(fake: FakeKube, obj: dict) -> None:
        def later():
            deadline = time.monotonic() + 10
            while not fake.owned_by("networkpolicies", obj["metadata"]["uid"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            fake.collect()  # the failed job's dependents go now, while the new job runs
            policies.extend(fake.owned_by("networkpolicies", obj["metadata"]["uid"]))
            finish(fake, obj)

        threading.Thread(target=later, daemon=True).start()

    api.on_create = on_create
    assert kube.launch(cfg, "pretrain", copy.deepcopy(job)) == "succeeded"
    (policy,) = policies
    assert policy["spec"]["podSelector"] == {"matchLabels": {manifests.JOB_LABEL: meta["name"]}}
    assert api.get("networkpolicies", "ml", manifests.policy_name(failed)) is None  # collected with the failed job


def test_an_api_outage_does_not_cost_the_job(api, s3_bucket, capsys):
    cfg = bound(f"{s3_bucket}/runs", "run.id=k7")
    finish = finish_with_report(cfg)

    def on_create(fake: FakeKube, job: dict) -> None:
        fake.outages = 4  # the next requests fail while the job runs
        finish(fake, job)

    api.on_create = on_create
    assert kube.launch(cfg, "pretrain", manifests.manifest(cfg, "pretrain")) == "succeeded"
    assert len(api.find("DELETE", "/trainjobs")) == 1 and "retrying after" in capsys.readouterr().err


def test_failure_and_timeout_delete_the_job(api, engine, s3_bucket):
    cfg = bound(f"{s3_bucket}/runs", "run.id=k4", engine=engine)
    api.on_create = finish_with_report(cfg, ok=False)
    with pytest.raises(KubellamaError, match=engine.failure):
        kube.launch(cfg, "pretrain", manifests.manifest(cfg, "pretrain"))
    cfg = bound(f"{s3_bucket}/runs", "run.id=k5", "cluster.timeout_s=1", "cluster.grace_period_s=1", engine=engine)
    api.on_create = lambda fake, job: fake.start_pods(job, 1)  # never ends
    started = time.monotonic()
    with pytest.raises(kube.Stopped, match="cluster.timeout_s=1 passed"):
        kube.launch(cfg, "pretrain", manifests.manifest(cfg, "pretrain"))
    assert time.monotonic() - started < 10
    assert api.get(engine.plural, "ml", manifests.job_name(cfg, "pretrain")) is None
    assert not storage.exists(storage.join(cfg.pretrain.output, lease.LEASE))


def test_an_older_trainer_refuses_the_trainjob(api, schema, s3_bucket):
    """Trainer before 2.2 has no runtimePatches: without strict field validation its API server would drop them and
    run the job without its GPU node selector, /dev/shm and S3 keys."""
    older = copy.deepcopy(schema)
    del older["properties"]["spec"]["properties"]["runtimePatches"]
    api.schemas[trainjob.PLURAL] = older
    cfg = bound(f"{s3_bucket}/runs", "run.id=k9", "cluster.timeout_s=2", "cluster.grace_period_s=1")
    with pytest.raises(KubellamaError, match='unknown field "spec.runtimePatches".*older than the release') as exc:
        kube.launch(cfg, "pretrain", manifests.manifest(cfg, "pretrain"))
    assert "\n" not in str(exc.value) and api.get(trainjob.PLURAL, "ml", manifests.job_name(cfg, "pretrain")) is None


def test_a_refused_launcher_leaves_the_holders_config_and_report(api, engine, s3_bucket):
    """A second launcher for an output another job is writing is refused in one line before it writes there, and
    does not take the holder's report for its own."""
    shared = f"{s3_bucket}/shared/pretrain"
    first = bound(f"{s3_bucket}/runs", f"pretrain.output={shared}", "run.id=first", engine=engine)
    second = bound(f"{s3_bucket}/runs", f"pretrain.output={shared}", "run.id=second", engine=engine)
    api.on_create = lambda fake, job: fake.start_pods(job, 1)  # runs until finished below
    result: dict = {}
    holder = threading.Thread(target=lambda: result.update(launch.run(first, "pretrain", train=None)), daemon=True)
    holder.start()
    deadline = time.monotonic() + 60
    while not api.find("POST", f"/{engine.plural}") and time.monotonic() < deadline:
        time.sleep(0.05)
    config = pods.config_url(first, "pretrain")
    assert config == pods.config_url(second, "pretrain") and "first" in storage.read_text(config)
    written = storage.read_text(config)
    # The holder's rank 0 has written its report (the job has not ended yet), later than the second launcher starts.
    report = storage.join(shared, "report.json")
    storage.write_json(report, {"status": "done", "ended": time.time() + 60, "step": 3})
    held_by = manifests.job_name(first, "pretrain")
    with pytest.raises(lease.Refused, match=f"being written by {engine.kind} ml/{held_by}") as refused:
        launch.run(second, "pretrain", train=None)
    assert "\n" not in str(refused.value)
    assert storage.read_text(config) == written and len(api.find("POST", f"/{engine.plural}")) == 1
    api.finish(engine.plural, "ml", manifests.job_name(first, "pretrain"))
    holder.join(timeout=30)
    assert result["status"] == "done"


def test_sigterm_deletes_the_job_and_the_lease_refuses_a_second_writer(api, engine, s3_bucket, tmp_path):
    """A launcher process (the KFP step) is killed with SIGTERM: its job is deleted and it exits 143. While it runs,
    a launcher of another run pointed at the same output is refused, naming the job."""
    shared = f"{s3_bucket}/shared/pretrain"
    overrides = [*engine.overrides, f"run.root={s3_bucket}/runs", "cluster.namespace=ml", f"pretrain.output={shared}",
                 "cluster.grace_period_s=2"]
    api.on_create = lambda fake, job: fake.start_pods(job, 2)  # runs until deleted
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kubellama.pipelines.cli", "pretrain", *overrides, "run.id=first"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not api.find("POST", f"/{engine.plural}") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api.find("POST", f"/{engine.plural}"), proc.communicate(timeout=5)
        first = manifests.job_name(
            bound(f"{s3_bucket}/runs", f"pretrain.output={shared}", "run.id=first", engine=engine), "pretrain")
        assert api.get(engine.plural, "ml", first) is not None

        second = bound(f"{s3_bucket}/runs", f"pretrain.output={shared}", "run.id=second", engine=engine)
        with pytest.raises(lease.Refused, match=f"being written by {engine.kind} ml/{first}") as refused:
            kube.launch(second, "pretrain", manifests.manifest(second, "pretrain"))
        assert "one writer per output" in str(refused.value) and "\n" not in str(refused.value)
        assert len(api.find("POST", f"/{engine.plural}")) == 1

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out + err
    assert api.find("DELETE", f"/{engine.plural}/{first}") and api.get(engine.plural, "ml", first) is None
    assert f"SIGTERM: deleted {engine.plural}" in out
    assert not storage.exists(storage.join(shared, lease.LEASE))


def test_a_stale_lease_of_a_vanished_job_is_taken_over(api, s3_bucket, monkeypatch):
    cfg = bound(f"{s3_bucket}/runs", "run.id=k6")
    stale = {"job": "kl-pretrain-gone", "namespace": "ml", "apiVersion": trainjob.API_VERSION, "kind": trainjob.KIND,
             "holder": "old-pod", "nonce": "n", "renewed": time.time() - lease.LEASE_TTL_S - 1}
    storage.write_json(storage.join(cfg.pretrain.output, lease.LEASE), stale)
    api.on_create = finish_with_report(cfg)
    assert kube.launch(cfg, "pretrain", manifests.manifest(cfg, "pretrain")) == "succeeded"
    # The same stale lease whose job still exists is not taken over.
    storage.write_json(storage.join(cfg.pretrain.output, lease.LEASE), stale)
    api.put("trainjobs", {"metadata": {"name": "kl-pretrain-gone", "namespace": "ml"}})
    with pytest.raises(KubellamaError, match="being written by TrainJob ml/kl-pretrain-gone"):
        kube.launch(cfg, "pretrain", manifests.manifest(cfg, "pretrain"))


def test_a_multi_node_trainjob_step_is_a_small_launcher_pod():
    from kubellama.pipelines import run

    overrides = [*TRAINJOB, "cluster.nnodes=4", "run.root=s3://bucket/p"]
    text = run.dag_text(run.resolve(overrides), overrides)
    line = next(line for line in text.splitlines() if line.strip().startswith("pretrain"))
    assert "launches a Kubeflow TrainJob of 4 x 8 GPUs" in line and "gpus=" not in line
    one = [*TRAINJOB, "cluster.nnodes=1", "run.root=s3://bucket/p"]
    line = next(line for line in run.dag_text(run.resolve(one), one).splitlines()
                if line.strip().startswith("pretrain"))
    assert "gpus=8" in line and "launches" not in line  # one node: torchrun in the step's own pod


def test_a_retry_attaches_only_to_a_job_of_the_same_config(engine, s3_bucket):
    """Same run and stage, another config: same job name, another spec hash, so the launcher refuses to attach."""
    a = manifests.manifest(bound(f"{s3_bucket}/runs", "run.id=k9", engine=engine), "pretrain")
    b = manifests.manifest(bound(f"{s3_bucket}/runs", "run.id=k9", "pretrain.lr=1e-4", engine=engine), "pretrain")
    again = manifests.manifest(bound(f"{s3_bucket}/runs", "run.id=k9", engine=engine), "pretrain")
    assert a["metadata"]["name"] == b["metadata"]["name"]
    assert a["metadata"]["annotations"][manifests.SPEC_HASH] != b["metadata"]["annotations"][manifests.SPEC_HASH]
    assert a["metadata"]["annotations"][manifests.SPEC_HASH] == again["metadata"]["annotations"][manifests.SPEC_HASH]
