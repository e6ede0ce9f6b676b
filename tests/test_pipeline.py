"""Compile the pipelines and check the KFP IR: DAG shape, GPU placement, secrets, caching, parameter defaults."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import yaml
from kfp import components

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.recipe import runform
from kubellama.components.core.recipe.config import load_config
from kubellama.pipelines import llama2, run

# The first step: the run form's overrides applied to the compiled config, each step's config slice out.
FIRST = "resolve-config"

GPU = ["cluster.gpus_per_node=8", "cluster.gpu_product=NVIDIA-H100-80GB-HBM3", "cluster.shm_size=32Gi",
       "cluster.nproc_per_node=8", "run.root=s3://bucket/runs"]


def compile_docs(tmp_path, overrides, pipeline="llama2"):
    path = str(tmp_path / f"{pipeline}.yaml")
    cfg = run.resolve(overrides)
    run.compile_pipeline(cfg, overrides, path, pipeline)
    with open(path) as f:
        docs = list(yaml.safe_load_all(f))
    return path, docs


def step_configs(spec) -> dict[str, str]:
    """What each step's `config` input is in a run with an empty form: the first step's outputs."""
    params = spec["root"]["dag"]["tasks"][FIRST]["inputs"]["parameters"]
    form = spec["root"]["inputDefinitions"]["parameters"]
    return runform.resolve(params["defaults"]["runtimeValue"]["constant"], form["overrides"]["defaultValue"],
                           form["run_root"]["defaultValue"], params["steps"]["runtimeValue"]["constant"])


def executor(spec, task):
    comp = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    return spec["components"][comp]["executorLabel"]


def test_default_pipeline_shape_and_config_parameter(tmp_path):
    path, docs = compile_docs(tmp_path, ["pretrain.lr=0.0002"])
    spec = docs[0]
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == ["data-prep", "gatt", "ppo", "pretrain", "rejection-sampling", FIRST,
                             "reward-helpfulness", "reward-safety", "safety-eval", "sft"]
    # Rejection sampling starts from GAtt's model, PPO from rejection sampling's; both read both reward models.
    assert tasks["rejection-sampling"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"] == "gatt"
    assert tasks["ppo"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"] == "rejection-sampling"
    assert tasks["ppo"]["inputs"]["artifacts"]["reward_safety"]["taskOutputArtifact"]["producerTask"] == \
        "reward-safety"
    assert sorted(tasks["pretrain"]["dependentTasks"]) == ["data-prep", FIRST]
    # SFT starts from pretraining's model, GAtt from SFT's; both read data prep's output.
    assert sorted(tasks["sft"]["dependentTasks"]) == ["data-prep", "pretrain", FIRST]
    assert tasks["sft"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"] == {
        "outputArtifactKey": "model", "producerTask": "pretrain"}
    assert tasks["gatt"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"] == {
        "outputArtifactKey": "model", "producerTask": "sft"}
    # The reward models start from the newest model (GAtt's); safety eval gates the last (PPO's) and reads data
    # prep's prompts.
    for t in ("reward-helpfulness", "reward-safety"):
        assert tasks[t]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"] == "gatt"
    assert tasks["safety-eval"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == {
        "outputArtifactKey": "model", "producerTask": "ppo"}
    assert tasks["safety-eval"]["inputs"]["artifacts"]["data"]["taskOutputArtifact"]["producerTask"] == "data-prep"
    assert tasks["pretrain"]["inputs"]["artifacts"]["data"]["taskOutputArtifact"] == {
        "outputArtifactKey": "dataset", "producerTask": "data-prep"}
    configs = step_configs(spec)
    config = json.loads(configs["pretrain"])
    assert sorted(config) == ["cluster", "model", "pretrain", "run"]  # the sections pretraining reads, no more
    assert config["pretrain"]["lr"] == 0.0002
    assert config["run"]["root"].startswith("/")  # made absolute: steps may run elsewhere
    assert config["run"]["id"] == ""  # each pipeline run gets its own: the KFP run id
    assert tasks["pretrain"]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # The compile-time overrides are in the compiled config: a run's form starts empty (tests/test_run_form.py).
    assert spec["root"]["inputDefinitions"]["parameters"]["overrides"]["defaultValue"] == []
    prep = json.loads(configs["data_prep"])
    assert list(prep) == ["data"] and prep["data"]["output"].startswith(config["run"]["root"] + "/data/")
    # Every step takes its config sections as an input (the first step's output), so they are part of its cache key.
    for name, task in tasks.items():
        assert task["cachingOptions"] == {"enableCache": True}
        if name != FIRST:
            assert task["inputs"]["parameters"]["config"] == {"taskOutputParameter": {
                "outputParameterKey": name.replace("-", "_"), "producerTask": FIRST}}
    execs = spec["deploymentSpec"]["executors"]
    assert execs[executor(spec, "data-prep")]["container"]["image"] == "ghcr.io/kubellama/cpu:0.1.0"
    assert execs[executor(spec, "pretrain")]["container"]["image"] == "ghcr.io/kubellama/train:0.1.0"
    # Nothing pip-installs at run time: the images carry the package and kfp.
    assert all("pip install" not in json.dumps(e) for e in execs.values())
    # No GPU on the local preset; kfp's own loader reads the file back.
    assert "accelerator" not in json.dumps(execs)
    loaded = components.load_component_from_file(path)
    assert loaded.name == "kubellama-llama2"
    assert set(loaded.component_spec.inputs) == {"overrides", "run_root"}


def _step_inputs(docs, task: str) -> tuple:
    """What decides a step's KFP cache key: its component spec, executor, and the values its inputs resolve to (in
    a run with an empty form)."""
    spec = docs[0]
    t = spec["root"]["dag"]["tasks"][task]
    configs = step_configs(spec)
    values = {k: configs[v["taskOutputParameter"]["outputParameterKey"]] if "taskOutputParameter" in v else v
              for k, v in t["inputs"]["parameters"].items()}
    comp = spec["components"][t["componentRef"]["name"]]
    return json.dumps([t, values, comp, spec["deploymentSpec"]["executors"][comp["executorLabel"]]], sort_keys=True)


def test_changed_training_key_leaves_data_prep_cacheable(tmp_path):
    _, a = compile_docs(tmp_path, ["pretrain.lr=0.0002"])
    _, b = compile_docs(tmp_path, ["pretrain.lr=0.0003"])
    # Byte-identical spec and input values: KFP reuses the cached data prep step.
    assert _step_inputs(a, "data-prep") == _step_inputs(b, "data-prep")
    assert _step_inputs(a, "pretrain") != _step_inputs(b, "pretrain")
    # A data key changes the data prep step (and where it writes).
    _, c = compile_docs(tmp_path, ["data.clean.min_chars=10"])
    assert _step_inputs(a, "data-prep") != _step_inputs(c, "data-prep")


def test_gpu_cluster_training_step(tmp_path):
    extra = ["cluster.s3_secret=s3-creds", "cluster.image_pull_secrets=[regcred]", "cluster.timeout_s=7200",
             "cluster.retries=2", "cluster.s3_endpoint=http://minio.minio:9000",
             "cluster.tolerations=[{key: dedicated, operator: Equal, value: llm, effect: NoSchedule}]"]
    _, (spec, platform) = compile_docs(tmp_path, GPU + extra)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train, prep = executor(spec, "pretrain"), executor(spec, "data-prep")
    res = spec["deploymentSpec"]["executors"][train]["container"]["resources"]["accelerator"]
    assert res["resourceType"] == "nvidia.com/gpu" and res["resourceCount"] == "8"
    assert k8s[train]["nodeSelector"]["labels"] == {
        "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[train]["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"} in \
        k8s[train]["tolerations"]
    assert k8s[train]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "32Gi", "volumeName": "dshm"}]
    for ex in (train, prep):
        keys, extra = k8s[ex]["secretAsEnv"]
        assert keys["secretName"] == extra["secretName"] == "s3-creds"
        assert {e["envVar"] for e in keys["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert not keys.get("optional")
        # Endpoint and region may sit in the Secret too (as torchx pods see them through envFrom); optional.
        assert {e["envVar"] for e in extra["keyToEnv"]} == {"AWS_ENDPOINT_URL", "AWS_REGION"} and extra["optional"]
        assert k8s[ex]["imagePullSecret"][0]["secretName"] == "regcred"
        assert k8s[ex]["activeDeadlineSeconds"] == "7200"
        assert k8s[ex]["podMetadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        env = spec["deploymentSpec"]["executors"][ex]["container"]["env"]
        assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.minio:9000"} in env
    for task in spec["root"]["dag"]["tasks"].values():
        assert task["retryPolicy"]["maxRetryCount"] == 2
    # Data prep is a CPU step: no GPU, no GPU node pool.
    assert "accelerator" not in spec["deploymentSpec"]["executors"][prep]["container"].get("resources", {})
    assert "nodeSelector" not in k8s[prep] and "tolerations" not in k8s[prep]
    # The credentials themselves never appear in the manifest.
    assert "AWS_SECRET_ACCESS_KEY=" not in json.dumps(spec)


def test_h100_preset_trains_in_the_step_pod(tmp_path, capsys):
    """`kubellama compile model=llama2_7b cluster=h100`: one 8-GPU node, so the step's own pod gets the GPUs."""
    out = tmp_path / "llama2.yaml"
    assert run.compile_main(["model=llama2_7b", "cluster=h100", "-o", str(out)]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    cluster = load_config(["cluster=h100"]).cluster
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train, prep = executor(spec, "pretrain"), executor(spec, "data-prep")
    res = spec["deploymentSpec"]["executors"][train]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert res["accelerator"]["resourceCount"] == str(cluster.gpus_per_node)
    assert res["resourceCpuLimit"] == cluster.cpu and res["resourceMemoryLimit"] == cluster.memory
    assert k8s[train]["nodeSelector"]["labels"]["nvidia.com/gpu.product"] == cluster.gpu_product
    assert k8s[train]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert k8s[train]["emptyDirMounts"][0]["sizeLimit"] == cluster.shm_size
    task = spec["root"]["dag"]["tasks"]["pretrain"]
    assert task["inputs"]["parameters"]["in_pod"] == {"runtimeValue": {"constant": True}}
    # The CPU step does not inherit the training node's size: it gets data prep's own (data.cpu, data.memory).
    prep_res = spec["deploymentSpec"]["executors"][prep]["container"]["resources"]
    assert "accelerator" not in prep_res and prep_res["resourceCpuLimit"] == load_config([]).data.cpu != cluster.cpu
    config = json.loads(step_configs(spec)["pretrain"])
    assert config["model"]["dim"] == 4096 and config["cluster"]["name"] == "h100"


def test_multi_node_training_launches_job_from_a_cpu_pod(tmp_path):
    overrides = GPU + ["cluster.scheduler=kubernetes", "cluster.nnodes=4"]
    _, (spec, platform) = compile_docs(tmp_path, overrides)
    train = executor(spec, "pretrain")
    assert "accelerator" not in spec["deploymentSpec"]["executors"][train]["container"].get("resources", {})
    assert "emptyDirMounts" not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][train]
    task = spec["root"]["dag"]["tasks"]["pretrain"]
    assert task["inputs"]["parameters"]["in_pod"] == {"runtimeValue": {"constant": False}}
    assert "launches a torchx kubernetes job of 4 x 8 GPUs" in run.dag_text(run.resolve(overrides), overrides)


def test_skipped_stages_start_from_config(tmp_path):
    overrides = ["pipeline.stages.data_prep=false", "pretrain.data=s3://b/shards", "pipeline.stages.reward=false",
                 "pipeline.stages.rejection_sampling=false", "pipeline.stages.ppo=false"]
    assert "importer                     after: -                    import s3://b/shards" in run.dag_text(
        run.resolve(overrides), overrides)
    _, docs = compile_docs(tmp_path, overrides)
    spec = docs[0]
    tasks = spec["root"]["dag"]["tasks"]
    # The later stages import their own `data` (data prep's output for this config): one importer per URL.
    assert sorted(tasks) == ["gatt", "importer", "importer-2", "pretrain", FIRST, "safety-eval", "sft"]
    imp = spec["deploymentSpec"]["executors"][executor(spec, "importer")]["importer"]
    assert imp["artifactUri"]["constant"] == "s3://b/shards"
    assert imp["typeSchema"]["schemaTitle"] == "system.Dataset"
    assert tasks["pretrain"]["inputs"]["artifacts"]["data"]["taskOutputArtifact"]["producerTask"] == "importer"

    _, docs = compile_docs(tmp_path, ["pipeline.stages.pretrain=false", "pipeline.init_checkpoint=s3://b/hf/7b",
                                      "pipeline.stages.rejection_sampling=false", "pipeline.stages.ppo=false"])
    spec = docs[0]
    # SFT starts from the imported checkpoint instead; the reward models and safety eval from GAtt's model.
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == ["data-prep", "gatt", "importer", FIRST, "reward-helpfulness", "reward-safety",
                             "safety-eval", "sft"]
    imp = spec["deploymentSpec"]["executors"][executor(spec, "importer")]["importer"]
    assert imp["artifactUri"]["constant"] == "s3://b/hf/7b" and imp["typeSchema"]["schemaTitle"] == "system.Model"
    assert tasks["sft"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"] == "importer"
    assert {tasks[t]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]["producerTask"]
            for t in ("reward-helpfulness", "reward-safety")} == {"gatt"}
    assert tasks["safety-eval"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "gatt"


def test_single_stage_pipelines(tmp_path):
    _, docs = compile_docs(tmp_path, [], "data_prep")
    assert docs[0]["pipelineInfo"]["name"] == "kubellama-llama2-data-prep"
    assert sorted(docs[0]["root"]["dag"]["tasks"]) == ["data-prep", FIRST]
    _, docs = compile_docs(tmp_path, ["pipeline.stages.data_prep=false"], "pretrain")
    assert sorted(docs[0]["root"]["dag"]["tasks"]) == ["importer", "pretrain", FIRST]


def test_bad_switches_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="every stage off"):
        compile_docs(tmp_path, ["pipeline.stages.data_prep=false", "pipeline.stages.pretrain=false",
                                "pipeline.stages.safety_eval=false",
                                "pipeline.stages.sft=false", "pipeline.stages.gatt=false",
                                "pipeline.stages.reward=false", "pipeline.stages.rejection_sampling=false",
                                "pipeline.stages.ppo=false"])
    with pytest.raises(ConfigError, match="'pipeline.stages.pretrian'"):
        compile_docs(tmp_path, ["pipeline.stages.pretrian=false"])
    # Without data prep, pretraining reads what data prep would write for this config.
    _, docs = compile_docs(tmp_path, ["pipeline.stages.data_prep=false"])
    imp = docs[0]["deploymentSpec"]["executors"][executor(docs[0], "importer")]["importer"]
    assert "/data/" in imp["artifactUri"]["constant"]


def test_cli_compile_and_dry_run(tmp_path, capsys):
    out = tmp_path / "llama2.yaml"
    assert run.compile_main(["-o", str(out), *GPU]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(list(yaml.safe_load_all(out.read_text()))) == 2
    assert run.run_main(["--dry-run", *GPU]) == 0
    text = capsys.readouterr().out
    assert "pretrain" in text and "after: data-prep" in text and "gpus=8" in text
    assert load_config(GPU).cluster.shm_size in text  # the resolved config follows the DAG
    assert run.compile_main(["-o", str(out), "pretrain.nope=1"]) == 2
    assert "unknown config key 'pretrain.nope'" in capsys.readouterr().err


def test_publish_records_urls_metrics_and_report(tmp_path):
    """What a component hands KFP: the URL and other strings as metadata, finite numbers as metrics, the report."""
    from types import SimpleNamespace

    from kubellama.components.core.kfp.publish import publish

    class Metrics(dict):
        def log_metric(self, name, value):
            self[name] = value

    out = tmp_path / "stage"
    out.mkdir()
    (out / "report.md").write_text("# Stage report\n")
    art = SimpleNamespace(metadata={}, path=str(tmp_path / "artifact"))
    report = SimpleNamespace(path=str(tmp_path / "report"))
    html = SimpleNamespace(path=str(tmp_path / "html"))
    metrics = Metrics()
    summary = {"hf": f"{out}/hf", "step": 3, "loss": float("nan"), "done": True, "tokens": {"total": 10, "kept": 9}}
    assert publish(summary, str(out), art, metrics, report, html) == str(out)
    assert art.metadata == {"url": str(out), "hf": f"{out}/hf"}
    assert metrics == {"step": 3.0, "tokens.total": 10.0, "tokens.kept": 9.0}
    assert (tmp_path / "report").read_text() == "# Stage report\n"
    assert json.loads((tmp_path / "artifact").read_text())["summary"]["step"] == 3
    (out / "report.md").unlink()  # a stage without a Markdown report: the summary stands in
    publish({"step": 1}, str(out), art, metrics, report, html)
    assert '"step": 1' in (tmp_path / "report").read_text()


# etcd stores no object over 1.5 MiB, and KFP v2 turns the IR into an Argo Workflow about 2.85x its size (measured
# against kfp 2.16.1), which then grows with each node's status as the run goes on and retries. A run whose
# Workflow outgrows etcd fails or cannot be retried, so the IR's Workflow must fill under a third of the limit, and
# the IR is held to a budget (with one per step, so each stage's share is held as stages are added).
ETCD_LIMIT = 1.5 * 2**20
ARGO_EXPANSION = 2.85
IR_BUDGET = 150_000
# Steps the budget is sized for: the full recipe's nine (data prep, pretrain, SFT, GAtt, two reward models,
# rejection sampling, PPO, safety eval) and one to spare.
RECIPE_STEPS = 10


@pytest.mark.parametrize("nodes", ["1", "8"], ids=["in-pod", "launcher"])
def test_full_recipe_ir_fits_argo(tmp_path, nodes):
    from kubellama.components.core.recipe import stages

    overrides = ["model=llama2_70b", "cluster=h100", f"cluster.nnodes={nodes}", "cluster.scheduler=trainjob",
                 "run.root=s3://bucket/llama2-70b", "cluster.s3_secret=s3", "cluster.timeout_s=86400"]
    cfg = run.resolve(overrides)
    names = llama2.selected(cfg)
    assert names == [s.name for s in stages.STAGES]  # every registered stage is on
    path = run.compile_pipeline(cfg, overrides, str(tmp_path / "llama2.yaml"))
    size = os.path.getsize(path)
    assert size * ARGO_EXPANSION < ETCD_LIMIT / 3, f"IR is {size} bytes: its Workflow would fill a third of etcd's"
    assert size <= IR_BUDGET, f"IR is {size} bytes, budget {IR_BUDGET}"
    assert size / len(names) <= IR_BUDGET / RECIPE_STEPS, f"{size / len(names):.0f} bytes per step"
    with open(path) as f:
        spec = next(yaml.safe_load_all(f))
    # One program per stage, different for every stage. KFP 2.16 compiles one component and one executor per task,
    # so a stage with variants (the reward models) carries its program once per variant, and nothing else repeats.
    execs = {label: e for label, e in spec["deploymentSpec"]["executors"].items() if label != executor(spec, FIRST)}
    program = {step: json.dumps(execs[executor(spec, step.replace("_", "-"))]["container"]["command"])
               for name in names for step, _ in stages.get(name).steps()}
    by_stage = {name: {program[step] for step, _ in stages.get(name).steps()} for name in names}
    assert all(len(p) == 1 for p in by_stage.values()) and len(set(program.values())) == len(names)
    counts = Counter(json.dumps(e["container"]["command"]) for e in execs.values())
    assert sorted(counts.values()) == sorted(len(stages.get(name).steps()) for name in names)
    assert sum(n - 1 for n in counts.values()) == 1  # the second reward model's copy, and only it
    # The IR holds the config once, as the first step's input; each step gets only the sections it reads from it.
    whole = llama2.config_json(cfg)
    constants = [p["runtimeValue"]["constant"] for t in spec["root"]["dag"]["tasks"].values()
                 for p in t.get("inputs", {}).get("parameters", {}).values() if "runtimeValue" in p]
    assert constants.count(whole) == 1 and set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "overrides", "run_root"}
    assert all(len(c) < len(whole) for c in step_configs(spec).values())
