"""torchx launch: the Kubernetes job a GPU cluster gets (dry run, schema-checked) and a real 2-process local run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from test_trainer_support import OVERRIDES, write_shards

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import load_config
from kubellama.pipelines.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kubernetes_dryrun_is_a_gpu_gang_job_with_a_valid_pod(capsys):
    argv = ["pretrain", "cluster=h100", "cluster.nnodes=2", "run.root=s3://bucket/runs/a", "cluster.queue=train",
            "cluster.namespace=ml", "cluster.service_account=trainer", "cluster.priority_class=high", "run.id=r1",
            "cluster.grace_period_s=90", "cluster.s3_secret=s3-creds", "cluster.s3_endpoint=http://minio:9000",
            "cluster.tolerations=[{key: dedicated, operator: Equal, value: llm, effect: NoSchedule}]", "--dryrun"]
    assert cli(argv) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "Job" and job["apiVersion"] == "batch.volcano.sh/v1alpha1"
    assert job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["schedulerName"] == "volcano" and spec["queue"] == "train" and spec["priorityClassName"] == "high"
    assert len(spec["tasks"]) == 2  # one task per node
    for task in spec["tasks"]:
        pod = task["template"]
        podspec = pod["spec"]
        (c,) = podspec["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"mountPath": "/dev/shm", "name": "dshm"} in c["volumeMounts"]
        shm = next(v for v in podspec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        assert podspec["nodeSelector"] == {"nvidia.com/gpu.present": "true",
                                           "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert podspec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}]
        assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"} in c["env"]
        assert c["imagePullPolicy"] == "IfNotPresent"
        assert podspec["serviceAccountName"] == "trainer"
        assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        cmd = c["command"][-1]
        assert "--nnodes 2 --nproc_per_node 8" in cmd
        assert "-m kubellama.components.pretrain --config s3://bucket/runs/a/r1/pretrain/config.yaml" in cmd
        # torchrun is the container's process (SIGTERM reaches it) and waits the grace period for the save.
        assert cmd.startswith("exec ") and "--shutdown_timeout 85" in cmd
        assert podspec["terminationGracePeriodSeconds"] == 90
        # The pod template is what Volcano creates: it must be a valid Pod for Kubernetes 1.30.
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": task["name"]},
                                      "spec": podspec}, "1.30.0", strict=True)
    # Node 1 finds node 0 through the variable Volcano sets (a valid shell name: no '-').
    assert "${VC_PRETRAIN_0_HOSTS:=localhost}:29500" in spec["tasks"][1]["template"]["spec"]["containers"][0]["command"][-1]


def test_kubernetes_needs_shared_storage_and_a_known_scheduler():
    with pytest.raises(ConfigError, match="local path, which pods on Kubernetes cannot share"):
        launch.dryrun_text(runs.bind(load_config(["cluster=h100", "run.root=/tmp/x"]), "pretrain"), "pretrain")
    with pytest.raises(ConfigError, match="cluster.scheduler='slurm'"):
        launch.dryrun_text(runs.bind(load_config(["cluster.scheduler=slurm", "cluster.nproc_per_node=2"]),
                                     "pretrain"), "pretrain")


def test_torchx_local_cwd_runs_two_ranks(tmp_path):
    write_shards(str(tmp_path / "data" / "pretrain"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "kubellama.pipelines.cli", "pretrain", *OVERRIDES, f"run.root={tmp_path}",
                           f"data.output={tmp_path / 'data'}", "pretrain.max_steps=2", "cluster.nproc_per_node=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted local_cwd://" in proc.stdout
    assert "[pretrain/0] step 2 loss" in proc.stdout  # the workers' log lines are streamed through
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["step"] == 2
    out = summary["output"]
    assert out.startswith(str(tmp_path)) and summary["report_md"] == os.path.join(out, "report.md")
    # The workers got the launcher's resolved config, run id included (a fresh one: time stamp + config hash).
    cfg = yaml.safe_load(open(os.path.join(out, "config.yaml")).read())
    assert cfg["run"]["id"] and out == os.path.join(str(tmp_path), cfg["run"]["id"], "pretrain")
    assert cfg["cluster"]["nproc_per_node"] == 2 and cfg["model"]["dim"] == 32
    assert os.path.exists(os.path.join(summary["hf"], "model.safetensors"))


def test_mig_profile_is_requested_as_its_own_resource(capsys):
    assert cli(["pretrain", "cluster=h100", "run.root=s3://b/r", "cluster.gpu_resource=nvidia.com/mig-1g.10gb",
                "cluster.gpus_per_node=1", "cluster.nproc_per_node=1", "--dryrun"]) == 0
    pod = yaml.safe_load(capsys.readouterr().out)["spec"]["tasks"][0]["template"]
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == "1" and "nvidia.com/gpu" not in limits
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod["spec"]},
                                 "1.30.0", strict=True)


def test_a_preempted_kfp_step_exits_143_in_one_line(tmp_path, monkeypatch, capsys):
    """Inside a KFP step (step_config marks it) a stage stopped by SIGTERM after saving ends with exit 143 and one
    line, not the executor's traceback and exit 1; outside a step the CLI gets the Preempted error to report."""
    from kubellama.pipelines import llama2

    monkeypatch.setenv(runs.STEP_ENV, "")  # so that teardown removes what step_config sets
    monkeypatch.delenv(runs.STEP_ENV)
    cfg = runs.bind(load_config([f"run.root={tmp_path}", "run.id=r"]), "pretrain")
    stopped = {"status": "preempted", "step": 3, "checkpoint": "ckpt/step_0000003"}
    with pytest.raises(launch.Preempted):
        launch.run(cfg, "pretrain", lambda c: stopped)
    step_cfg = runs.step_config(llama2.stage_config(cfg, "pretrain"), "pretrain", "run-1")
    assert os.environ[runs.STEP_ENV] == "pretrain"
    with pytest.raises(SystemExit) as exc:
        launch.run(step_cfg, "pretrain", lambda c: stopped)
    assert exc.value.code == 143
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kubellama: pretrain was preempted at step 3") and "run.id=r " in line
