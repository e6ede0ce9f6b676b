"""The base every stage stands on: run identity, the stage registry, starting from a checkpoint, preemption in
seconds on the one-node torchx path, content-addressed data prep, and the README's cluster commands."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_support import OVERRIDES, SEQ, model_cfg, spawn, train_cfg, write_shards

from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.model.hf import save_hf
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.recipe import runform, runs, stages
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.train.trainer import Trainer
from kubellama.pipelines import cli, llama2
from kubellama.pipelines import run as local_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def pretrain(root, *more: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "kubellama.pipelines.cli", "pretrain", *OVERRIDES, f"run.root={root}",
            f"data.output={root}/data", "pretrain.mixed_precision=fp32", *more]
    done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def summary_of(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_a_changed_hyperparameter_never_continues_another_run(tmp_path):
    write_shards(str(tmp_path / "data" / "pretrain"))
    first = summary_of(pretrain(tmp_path, "pretrain.max_steps=3", "pretrain.ckpt_every=2"))
    run_id = first["run_id"]
    assert first["output"] == os.path.join(str(tmp_path), run_id, "pretrain") and first["start_step"] == 0

    # Same run.root, new lr, no run.id: a new run in its own folder, from step 0.
    second = summary_of(pretrain(tmp_path, "pretrain.max_steps=3", "pretrain.lr=1e-3"))
    assert second["run_id"] != run_id and second["output"] != first["output"] and second["start_step"] == 0

    # Naming the first run with another lr: refused in one line naming the key; nothing retrained or re-exported.
    hf = os.path.join(first["output"], "hf", "model.safetensors")
    before = os.stat(hf).st_mtime_ns
    refused = pretrain(tmp_path, f"run.id={run_id}", "pretrain.max_steps=3", "pretrain.lr=1e-3", check=False)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "pretrain.lr=0.003" in line and "pretrain.lr=0.001" in line and "run.id" in line
    assert os.stat(hf).st_mtime_ns == before

    # The same refusal from a 2-rank torchx launch: the launcher's last line is the ranks' own, naming the key,
    # not the scheduler's bare FAILED.
    two = pretrain(tmp_path, f"run.id={run_id}", "pretrain.max_steps=3", "pretrain.lr=1e-3",
                   "cluster.nproc_per_node=2", check=False)
    assert two.returncode == 2
    last = two.stderr.strip().splitlines()[-1]
    assert last.startswith("kubellama: error: run ") and "pretrain.lr=0.001" in last and "ended FAILED" in last
    assert os.stat(hf).st_mtime_ns == before

    # The same config under its run id: finished, so nothing trains and the export is left as it was. Keys that do
    # not change what a run computes (log_every) may differ.
    again = summary_of(pretrain(tmp_path, f"run.id={run_id}", "pretrain.max_steps=3", "pretrain.log_every=7"))
    assert again["start_step"] == 3 and again["step"] == 3 and os.stat(hf).st_mtime_ns == before
    lineage = json.loads(open(os.path.join(first["output"], "hf", "kubellama.json")).read())
    assert lineage["config_hash"] == first["lineage"]["config_hash"] and lineage["data_hash"]
    report = json.loads(open(first["report_json"]).read())
    assert report["lineage"]["data_hash"] == lineage["data_hash"] and report["lineage"]["parent"] is None


def _hf_source(path: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    model = Llama(model_cfg())
    save_hf(model.state_dict(), model_cfg(), path)
    return load_file(os.path.join(path, "model.safetensors"))


def _train_from(env: dist.Env, data: str, init: str, out: str) -> None:
    reader = ShardReader(data, rank=env.rank, world_size=env.world_size)
    cfg = train_cfg(lr=0.0, max_steps=2, ckpt_every=100, mixed_precision="fp32",
                    global_batch_tokens=2 * env.world_size * SEQ)
    trainer = Trainer(cfg, model_cfg(), out, reader, env=env, init=init, seed=99)
    assert trainer.fit()["step"] == 2
    trainer.export_hf(os.path.join(out, "hf"))


@pytest.mark.parametrize("world", [1, 2])
def test_training_from_hf_weights_with_lr_0_exports_them_unchanged(tmp_path, world):
    data = write_shards(str(tmp_path / "data"))
    source = _hf_source(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    if world == 1:
        _train_from(dist.init(), data, str(tmp_path / "src"), out)
    else:
        spawn(_train_from, 2, data, str(tmp_path / "src"), out)
    exported = load_file(os.path.join(out, "hf", "model.safetensors"))
    assert exported.keys() == source.keys()
    for k, v in source.items():
        assert exported[k].numpy().tobytes() == v.numpy().tobytes(), k
    # The training checkpoint names its parent; a DCP checkpoint is an init source too (on another world size).
    assert json.loads(open(os.path.join(out, "hf", "kubellama.json")).read())["parent"] == str(tmp_path / "src")
    again = str(tmp_path / "again")
    _train_from(dist.init(), data, out, again)  # the stage output folder: its newest checkpoint
    assert load_file(os.path.join(again, "hf", "model.safetensors"))["lm_head.weight"].equal(source["lm_head.weight"])


def test_init_that_does_not_fit_is_one_line(tmp_path):
    write_shards(str(tmp_path / "data" / "pretrain"))
    _hf_source(str(tmp_path / "src"))
    done = pretrain(tmp_path, "pretrain.max_steps=1", f"pretrain.init={tmp_path / 'src'}", "model.dim=64",
                    check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "shape" in done.stderr and str(tmp_path / "src") in done.stderr
    done = pretrain(tmp_path, "pretrain.max_steps=1", f"pretrain.init={tmp_path / 'nothing'}", check=False)
    assert done.returncode == 2 and "neither a Hugging Face Llama directory" in done.stderr


def _losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_sigterm_on_the_torchx_path_saves_within_seconds_and_the_rerun_matches(tmp_path):
    """Two local ranks under torchx local_cwd, 8 micro-batches per step: SIGTERM to the launcher stops the ranks at
    the next micro-batch, they save the last finished step, and the launcher exits 143 within 5 s; the rerun of the
    same run ends with the losses of an uninterrupted run."""
    write_shards(str(tmp_path / "data" / "pretrain"), rows=512)
    more = ["cluster.nproc_per_node=2", "pretrain.micro_batch=1", f"pretrain.global_batch_tokens={16 * SEQ}",
            "pretrain.max_steps=12", "pretrain.ckpt_every=1000", "pretrain.warmup_steps=2"]
    argv = [sys.executable, "-m", "kubellama.pipelines.cli", "pretrain", *OVERRIDES, f"run.root={tmp_path}",
            f"data.output={tmp_path}/data", "pretrain.mixed_precision=fp32", *more]
    proc = subprocess.Popen([*argv, "run.id=cut"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[pretrain/0] step 3 " in line:
            break
    else:
        raise AssertionError("".join(seen))
    out = os.path.join(str(tmp_path), "cut", "pretrain")
    ckpts = os.path.join(out, "checkpoints")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while not checkpoint.steps(ckpts)[0] and time.monotonic() - sent < 30:
        time.sleep(0.05)
    took = time.monotonic() - sent
    rest = proc.communicate(timeout=60)[0]
    log = "".join(seen) + rest
    assert took < 5.0, f"a complete checkpoint only after {took:.1f}s\n{log}"
    assert proc.returncode == 143, log
    assert "Traceback" not in log
    done, partial = checkpoint.steps(ckpts)
    assert len(done) == 1 and not partial and 3 <= done[0] < 12, log
    meta = checkpoint.meta(checkpoint.folder(os.path.join(out, "checkpoints"), done[0]))
    # The dropped step's rows were given back: each rank consumed 8 rows per finished step.
    assert meta["world_size"] == 2 and meta["data"]["position"] == 8 * done[0]

    rerun = subprocess.run([*argv, "run.id=cut"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    ref = subprocess.run([*argv, "run.id=ref"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    cut, whole = _losses(out), _losses(os.path.join(str(tmp_path), "ref", "pretrain"))
    assert sorted(whole) == list(range(1, 13)) and set(cut) == set(whole)
    assert all(abs(cut[s] - whole[s]) < 1e-6 for s in whole), (cut, whole)


def test_the_registry_drives_cli_pipeline_and_reports(tmp_path):
    names = [s.name for s in stages.STAGES]
    assert names[:2] == ["data_prep", "pretrain"]
    for s in stages.STAGES:
        assert cli.COMMANDS[s.command][0] == f"kubellama.components.{s.name}.stage:main"
        # The run form's first step hands each step its config: one output per step.
        assert s.name in llama2.PIPELINES and all(step in runform.Slices._fields for step, _ in s.steps())
    cfg = local_run.resolve([f"run.root={tmp_path}", "run.id=x"])
    assert list(local_run.local_outputs(cfg, names)) == [step for s in stages.STAGES for step, _ in s.steps()]
    assert list(load_config().pipeline.stages) == names
    # Each step's parameter holds just the sections the registry says it reads.
    for s in stages.STAGES:
        assert sorted(json.loads(llama2.stage_config(cfg, s.name))) == sorted(s.reads)


def test_data_prep_is_content_addressed(tmp_path):
    from test_pipeline_local import corpus

    from kubellama.components.data_prep import stage as data_prep

    src = corpus(str(tmp_path / "c.jsonl"), docs=60)
    over = [f"run.root={tmp_path}", f"data.sources=[{{name:t,path:'{src}'}}]", "data.workers=1",
            "model.vocab_size=300", "model.max_seq_len=32"]
    first = data_prep.run(load_config(over))
    assert os.path.dirname(first["output"]) == os.path.join(str(tmp_path), "data") and "reused" not in first
    # Another run, another run id, a training key changed: the same data config finds the finished output.
    again = data_prep.run(load_config([*over, "run.id=other", "pretrain.lr=1"]))
    assert again["output"] == first["output"] and again["reused"] is True
    assert data_prep.run(load_config([*over, "data.clean.min_chars=10"]))["output"] != first["output"]


def _readme_commands(pattern: str) -> list[list[str]]:
    """`kubellama <pattern> ...` commands of the README: inline code and lines of shell blocks (no usage lines)."""
    text = open(os.path.join(REPO, "README.md")).read().replace("\\\n", " ")
    found = [" ".join(m.split()) for m in re.findall(rf"`(kubellama (?:{pattern})\b[^`]*)`", text)]
    found += re.findall(rf"^\s*(kubellama (?:{pattern})\b[^#\n]*)", text, re.MULTILINE)
    return [shlex.split(c)[1:] for c in found if "[" not in c and "URL" not in c]


def test_readme_cluster_examples_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = [c for c in _readme_commands("pretrain|compile") if "--dryrun" in c or c[0] == "compile"]
    assert len(commands) >= 2
    for argv in commands:
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)


def test_a_data_key_edited_after_compile_moves_the_output_to_its_own_address(tmp_path):
    """The compiled pipeline fixes data.output; a data key edited in the UI must not write into that folder."""
    compiled = local_run.resolve([f"run.root={tmp_path}", "run.id=x"])
    fixed = compiled.data.output
    assert fixed == os.path.join(str(tmp_path), "data", runs.data_hash(compiled))
    edited = load_config([f"run.root={tmp_path}", f"data.output={fixed}", "data.seq_len=64"])
    bound = runs.bind(edited, "data_prep")
    assert bound.data.output == os.path.join(str(tmp_path), "data", runs.data_hash(edited)) != fixed
    # The unedited config keeps its address, and a folder the user named is left alone.
    assert runs.bind(load_config([f"data.output={fixed}"]), "data_prep").data.output == fixed
    assert runs.bind(load_config([f"data.output={tmp_path}/mine"]), "data_prep").data.output == f"{tmp_path}/mine"


def test_run_ids_never_repeat_and_torchrun_ranks_agree(monkeypatch):
    cfg = load_config()
    assert runs.new_id(cfg) != runs.new_id(cfg)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2a")
    assert runs.new_id(cfg) == runs.new_id(cfg)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match="run.id is empty under torchrun without a rendezvous id"):
        runs.new_id(cfg)


def test_a_resume_takes_the_init_folder_under_any_of_its_names(tmp_path, monkeypatch):
    """`<stage>.init=runs/demo/latest/pretrain` and the run folder that link points at (or a relative and an absolute
    spelling) are one input: a resume under the other name continues; another folder is still refused."""
    run_dir = tmp_path / "demo" / "20261207-x" / "pretrain"
    run_dir.mkdir(parents=True)
    (tmp_path / "demo" / "latest").symlink_to(tmp_path / "demo" / "20261207-x")
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"sft.init": str(tmp_path / "demo" / "latest" / "pretrain"), "sft.lr": 1e-5, "init": "demo/latest/pretrain"}
    runs.check(saved, {**saved, "sft.init": str(run_dir), "init": str(run_dir)}, "ckpt", "r1")
    with pytest.raises(ConfigError, match="sft.init"):
        runs.check(saved, {**saved, "sft.init": str(other)}, "ckpt", "r1")
    with pytest.raises(ConfigError, match="sft.lr"):
        runs.check(saved, {**saved, "sft.lr": 2e-5}, "ckpt", "r1")
    with pytest.raises(ConfigError, match="sft.init"):  # an S3 URL is compared as written
        runs.check({**saved, "sft.init": "s3://b/a/../pretrain"}, {**saved, "sft.init": "s3://b/pretrain"}, "c", "r")
