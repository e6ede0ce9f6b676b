"""The run form of a compiled pipeline (issue 23): its parameters are `overrides` and `run_root`; a first, cheap step
applies them to the compiled config and hands each step only its own slice, refusing with one line an unknown key
or one that only compile time can honour. Run through kfp.local on a pipeline of that step and data prep."""
from __future__ import annotations

import glob
import json

import pytest
import yaml
from kfp import components, local
from test_pipeline_local import TINY, corpus
from test_submit import FakeKfp, _uploaded_yaml

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.kfp import component as run_form
from kubellama.components.core.recipe import runform, stages
from kubellama.components.core.recipe.runs import step_config
from kubellama.pipelines import llama2, run, submit

FIRST = "resolve-config"


def test_the_form_holds_overrides_and_run_root_and_every_step_reads_the_first(tmp_path, capsys):
    out = tmp_path / "llama2.yaml"
    compiled = ["model=llama2_7b", "cluster=h100", "run.root=s3://b/r", "ppo.beta=0.03"]
    assert run.compile_main([*compiled, "-o", str(out)]) == 0, capsys.readouterr().err
    spec, platform = yaml.safe_load_all(out.read_text())
    # What the KFP UI's "Create run" form shows: an empty list of overrides and where the run writes.
    assert spec["root"]["inputDefinitions"]["parameters"] == {
        "overrides": {"defaultValue": [], "isOptional": True, "parameterType": "LIST"},
        "run_root": {"defaultValue": "s3://b/r", "isOptional": True, "parameterType": "STRING"}}
    assert set(components.load_component_from_file(str(out)).component_spec.inputs) == {"overrides", "run_root"}

    tasks = spec["root"]["dag"]["tasks"]
    first = tasks[FIRST]
    assert "dependentTasks" not in first
    assert first["inputs"]["parameters"]["overrides"] == {"componentInputParameter": "overrides"}
    assert first["inputs"]["parameters"]["run_root"] == {"componentInputParameter": "run_root"}
    # The compile-time overrides are in the compiled config, the first step's constant input.
    cfg = run.resolve(compiled)
    defaults = first["inputs"]["parameters"]["defaults"]["runtimeValue"]["constant"]
    assert defaults == llama2.config_json(cfg) and json.loads(defaults)["ppo"]["beta"] == 0.03
    # It asks for no GPU, and every step waits for it: a bad override fails before any GPU is asked for.
    executors = spec["deploymentSpec"]["executors"]
    label = spec["components"][first["componentRef"]["name"]]["executorLabel"]
    assert "accelerator" not in executors[label]["container"].get("resources", {})
    assert executors[label]["container"]["image"] == cfg.cluster.image_cpu
    assert "nodeSelector" not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]
    for step in runform.steps_of(llama2.selected(cfg)):
        task = tasks[step.replace("_", "-")]
        assert task["inputs"]["parameters"]["config"] == {
            "taskOutputParameter": {"outputParameterKey": step, "producerTask": FIRST}}
        assert FIRST in task["dependentTasks"]
    # An empty form gives each step what it read before the form existed: its sections of the compiled config.
    got = runform.resolve(defaults, [], "s3://b/r")
    assert got == runform.slices(cfg)
    assert all(sorted(json.loads(got[step])) == sorted(stages.producer(step).reads) for step in runform.STEPS)


@pytest.fixture
def data_prep_pipeline(tmp_path):
    """The compiled `data_prep` pipeline (the first step and data prep) on a tiny corpus, and its config."""
    src = corpus(str(tmp_path / "corpus.jsonl"), docs=60)
    overrides = [f"run.root={tmp_path / 'run'}", f"data.sources=[{{name:t,path:'{src}'}}]", *TINY]
    cfg = run.resolve(overrides)
    path = run.compile_pipeline(cfg, overrides, str(tmp_path / "data_prep.yaml"), "data_prep")
    run._python_as_a_word()
    return components.load_component_from_file(path), cfg, overrides


def _local(root) -> None:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)


def test_the_overrides_parameter_takes_effect_at_run_time(data_prep_pipeline, tmp_path):
    pipeline, cfg, overrides = data_prep_pipeline
    other = str(tmp_path / "other")
    _local(tmp_path / "kfp")
    pipeline(overrides=["data.clean.min_chars=40"], run_root=other)
    # Data prep ran with the run's data key and root: its output is that config's content address, not the
    # compiled one.
    want = run.resolve([*overrides, "data.clean.min_chars=40", f"run.root={other}"]).data.output
    assert want != cfg.data.output and want.startswith(f"{other}/data/")
    assert storage.is_complete(want) and not storage.exists(cfg.data.output)
    (prep,) = glob.glob(str(tmp_path / "kfp" / "*" / "data-prep" / "executor_output.json"))
    (dataset,) = json.load(open(prep))["artifacts"]["dataset"]["artifacts"]
    assert dataset["metadata"]["url"] == want


@pytest.mark.parametrize("override,says", [
    ("data.clean.min_charz=40", ("unknown config key 'data.clean.min_charz' in run-time override "
                                 "'data.clean.min_charz=40' (did you mean 'data.clean.min_chars'?)")),
    ("data.parallelism=4", ("override 'data.parallelism=4' only applies when compiling (sets how many pods data "
                            "prep fans out to): recompile the pipeline with it")),
], ids=["unknown", "compile-only"])
def test_a_bad_override_fails_the_first_step_with_one_line(data_prep_pipeline, tmp_path, capfd, override, says):
    pipeline, cfg, _ = data_prep_pipeline
    _local(tmp_path / "kfp")
    with pytest.raises(RuntimeError, match=FIRST):
        pipeline(overrides=[override])
    log = capfd.readouterr()
    lines = [line.strip() for line in (log.out + log.err).splitlines() if "kubellama: error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"kubellama: error: {says}"), lines
    assert "Traceback" not in log.out + log.err
    # Nothing after the first step ran.
    assert not glob.glob(str(tmp_path / "kfp" / "*" / "data-prep")) and not storage.exists(cfg.data.output)


def test_a_ppo_override_changes_the_ppo_step_alone(tmp_path):
    cfg = run.resolve([f"run.root={tmp_path}"])
    before = runform.slices(cfg)
    # The first step on its own through kfp.local, as a run of the whole recipe starts.
    _local(tmp_path / "kfp")
    task = run_form.op(cfg.cluster.image_cpu)(defaults=llama2.config_json(cfg), overrides=["ppo.beta=0.02"],
                                              run_root="", steps=list(runform.STEPS))
    after = {step: task.outputs[step] for step in runform.STEPS}
    # Byte-identical inputs for every other step (data prep's included): KFP's cache still serves them.
    assert [s for s in runform.STEPS if after[s] != before[s]] == ["ppo"]
    assert json.loads(after["ppo"])["ppo"]["beta"] == 0.02 != json.loads(before["ppo"])["ppo"]["beta"]
    # And the PPO step trains with it: its component reads the slice so.
    assert step_config(after["ppo"], "ppo", "r").ppo.beta == 0.02
    # A variant's own key reaches that variant's step alone.
    changed = runform.resolve(llama2.config_json(cfg), ["reward.safety.lr=3e-5"])
    assert [s for s in runform.STEPS if changed[s] != before[s]] == ["reward_safety"]


@pytest.mark.parametrize("override,says", [
    ("model=llama2_7b", "only applies when compiling (picks a preset"),
    ("cluster=h100", "only applies when compiling (picks a preset"),
    ("cluster.gpus_per_node=8", "only applies when compiling (shapes the pods"),
    ("pipeline.stages.ppo=false", "only applies when compiling (chooses the pipeline's steps"),
    ("data.memory=64Gi", "only applies when compiling (sizes data prep's pods"),
    ("ppo.init=s3://b/m", "only applies when compiling (is a step input"),
    ("reward.kind=safety", "only applies when compiling (picks the step, and the pipeline runs one per kind"),
    ("+ppo.nope=1", "only applies when compiling (adds or deletes a key"),
    ("data={parallelism: 3}", "sets data.parallelism, which only applies when compiling"),
    ("ppo.betta=1", "unknown config key 'ppo.betta' in run-time override 'ppo.betta=1' (did you mean 'ppo.beta'?)"),
    ("ppo.beta=high", "bad value for config key 'ppo.beta' in run-time override 'ppo.beta=high': Value 'high'"),
    ("ppo.beta=0.1,0.2", "is a sweep"),
    ("ppo={beta: 0.1}", "sets the whole 'ppo' section"),
    ("generate.max_new_tokens=4", "would change nothing: no step of this pipeline reads 'generate'"),
])
def test_refused_overrides_name_the_key_in_one_line(override, says):
    cfg = run.resolve(["run.root=s3://b/r"])
    with pytest.raises(ConfigError) as err:
        runform.apply(cfg, ["ppo.lr=1e-6", override])  # a good one first: nothing is applied before all pass
    assert says in str(err.value) and "\n" not in str(err.value)
    if "only applies when compiling (" in says:
        assert runform.split([override]) == ([override], [])  # `kubellama submit` compiles it in instead


def test_an_override_of_a_stage_the_pipeline_skips_is_refused():
    cfg = run.resolve(["run.root=s3://b/r"])
    steps = runform.steps_of(["data_prep", "pretrain"])
    with pytest.raises(ConfigError, match=r"would change nothing: no step of this pipeline reads 'ppo': recompile "
                                          r"with pipeline.stages.ppo=true"):
        runform.apply(cfg, ["ppo.beta=0.02"], steps=steps)
    assert runform.apply(cfg, ["pretrain.lr=1e-4"], steps=steps).pretrain.lr == 1e-4


def test_run_root_moves_the_derived_data_output_and_keeps_a_named_one():
    cfg = run.resolve(["run.root=s3://b/r"])
    moved = runform.apply(cfg, ["data.clean.min_chars=10"], run_root="s3://c/x")
    assert moved.run.root == "s3://c/x"
    assert moved.data.output == run.resolve(["run.root=s3://c/x", "data.clean.min_chars=10"]).data.output
    assert moved.pretrain.data == moved.data.output and cfg.data.output.startswith("s3://b/r/data/")
    named = run.resolve(["run.root=s3://b/r", "data.output=s3://b/shared/corpus"])
    assert runform.apply(named, [], run_root="s3://c/x").data.output == "s3://b/shared/corpus"


def test_submit_sends_run_time_overrides_in_the_form_and_checks_them_first(capsys):
    with FakeKfp() as kfp_api:
        assert submit.main(["--host", kfp_api.url, "cluster.gpus_per_node=8", "run.root=s3://b/r",
                            "ppo.beta=0.02"]) == 0, capsys.readouterr().err
        (upload,) = kfp_api.find("POST", "/pipelines/upload")
        (run_,) = kfp_api.runs
        assert submit.main(["--host", kfp_api.url, "run.root=s3://b/r", "ppo.betta=0.02"]) == 2
        assert len(kfp_api.find("POST", "/pipelines/upload_version")) == 0  # refused before uploading
    assert "unknown config key 'ppo.betta'" in capsys.readouterr().err
    # The pipeline compiled with the compile-time part; the run carries the rest in its form.
    assert run_["runtime_config"]["parameters"] == {"overrides": ["ppo.beta=0.02"], "run_root": "s3://b/r"}
    assert upload["query"]["description"][0] == "kubellama cluster.gpus_per_node=8 run.root=s3://b/r"
    spec, _ = _uploaded_yaml(upload)
    defaults = json.loads(spec["root"]["dag"]["tasks"][FIRST]["inputs"]["parameters"]["defaults"]["runtimeValue"]
                          ["constant"])
    assert defaults["cluster"]["gpus_per_node"] == 8 and defaults["ppo"]["beta"] == run.resolve([]).ppo.beta != 0.02
