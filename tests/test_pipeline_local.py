"""The whole pipeline on this machine: `kubellama run` through kfp.local with the real stages on tiny data."""
from __future__ import annotations

import glob
import json
import math
import os
import random
import re

from kubellama.components.core.io import storage
from kubellama.pipelines import run

TINY = ["data.workers=1", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden=64", "model.vocab_size=300", "model.max_seq_len=32", "pretrain.max_steps=3",
        "pretrain.warmup_steps=1", "pretrain.global_batch_tokens=64", "pretrain.micro_batch=2",
        "pretrain.ckpt_every=2", "pretrain.log_every=1", "pipeline.stages.sft=false", "pipeline.stages.gatt=false",
        "pipeline.stages.reward=false", "pipeline.stages.rejection_sampling=false", "pipeline.stages.ppo=false"]


def corpus(path: str, docs: int = 150) -> str:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    with open(path, "w") as f:
        for i in range(docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(40, 100)))
            f.write(json.dumps({"text": f"{text}. Document {i} ends here."}) + "\n")
    return path


def executor_output(kfp_root: str, task: str) -> dict:
    (path,) = glob.glob(os.path.join(kfp_root, "kubellama-llama2-*", task, "executor_output.json"))
    with open(path) as f:
        return json.load(f)


def test_run_data_prep_and_pretrain_through_kfp_local(tmp_path, capfd):
    root = str(tmp_path / "run")
    src = corpus(str(tmp_path / "corpus.jsonl"))
    assert run.run_main([f"run.root={root}", f"data.sources=[{{name:t,path:'{src}'}}]", *TINY]) == 0
    out = capfd.readouterr().out

    # The console is for people: each step's start, end and duration, and progress; kfp.local's executor-input
    # dumps go to the run's log file instead.
    for step in ("data-prep", "pretrain"):
        assert f"  {step}: running\n" in out
        assert re.search(rf"^  {step}: success in \d+ s$", out, re.MULTILINE), out
    assert re.search(r"^    step \d+ loss ", out, re.MULTILINE), out
    assert "Got executor_input" not in out and '"parameterValues"' not in out
    (log,) = [f for f in os.listdir(os.path.join(root, "kfp")) if f.startswith("run-") and f.endswith(".log")]
    assert '"parameterValues"' in open(os.path.join(root, "kfp", log)).read()

    # The stages wrote their real outputs where the config says: data content-addressed, training per run.
    data = outputs(out)["data_prep"]
    assert os.path.dirname(data) == os.path.join(root, "data") and storage.is_complete(data)
    train_out = outputs(out)["pretrain"]
    run_id = os.path.basename(os.path.dirname(train_out))
    assert train_out == os.path.join(root, run_id, "pretrain") and os.readlink(os.path.join(root, "latest")) == run_id
    hf = os.path.join(train_out, "hf")
    assert os.path.exists(os.path.join(hf, "config.json"))
    for report in (os.path.join(data, "report.md"), os.path.join(train_out, "report.md")):
        assert f"  {report}\n" in out

    # KFP artifacts stay small and point at the data: lineage data-prep -> pretrain through the Dataset's URL.
    kfp_root = os.path.join(root, "kfp")
    prep = executor_output(kfp_root, "data-prep")
    (dataset,) = prep["artifacts"]["dataset"]["artifacts"]
    assert dataset["metadata"]["url"] == data
    assert dataset["metadata"]["pretrain"] == os.path.join(data, "pretrain")
    (metrics,) = prep["artifacts"]["metrics"]["artifacts"]
    assert metrics["metadata"]["pretrain_tokens"] > 0

    train = executor_output(kfp_root, "pretrain")
    (model,) = train["artifacts"]["model"]["artifacts"]
    assert model["metadata"]["url"] == train_out
    assert model["metadata"]["hf"] == hf and model["metadata"]["status"] == "completed"
    (metrics,) = train["artifacts"]["metrics"]["artifacts"]
    assert metrics["metadata"]["step"] == 3 and math.isfinite(metrics["metadata"]["final_loss"])
    (report,) = glob.glob(os.path.join(kfp_root, "kubellama-llama2-*", "pretrain", "report"))
    with open(report) as f, open(os.path.join(train_out, "report.md")) as g:
        assert f.read() == g.read()
    with open(os.path.join(train_out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]

    # A second run with another training key: data prep finds its content-addressed output and skips the work;
    # pretraining starts from step 0 in its own folder.
    assert run.run_main([f"run.root={root}", f"data.sources=[{{name:t,path:'{src}'}}]", *TINY,
                         "pretrain.lr=1e-3"]) == 0
    again = outputs(capfd.readouterr().out)
    assert again["data_prep"] == data and again["pretrain"] != train_out
    assert json.loads(open(os.path.join(again["pretrain"], "report.json")).read())["start_step"] == 0


def outputs(console: str) -> dict[str, str]:
    """The `  <stage>: <output>` lines `kubellama run` prints at the end."""
    found = {}
    for line in console.splitlines():
        name, _, url = line.strip().partition(": ")
        if name in ("data_prep", "pretrain") and url:
            found[name] = url
    return found


def test_run_with_stages_on_s3(tmp_path, s3_bucket, monkeypatch, capsys):
    """run.root on S3 (moto): the stages read and write s3:// themselves; kfp.local keeps its artifacts locally."""
    monkeypatch.chdir(tmp_path)
    src = corpus(str(tmp_path / "corpus.jsonl"), docs=80)
    with open(src, "rb") as f:
        storage.write_bytes(f"{s3_bucket}/in/corpus.jsonl", f.read())
    root = f"{s3_bucket}/run"
    overrides = [f"run.root={root}", f"data.sources=[{{name:t,path:'{s3_bucket}/in/corpus.jsonl'}}]", *TINY,
                 "pretrain.max_steps=2", "run.name=s3demo"]
    assert run.run_main([*overrides, "run.id=s3"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert storage.is_complete(outputs(out)["data_prep"]) and outputs(out)["data_prep"].startswith(f"{root}/data/")
    assert storage.exists(f"{root}/s3/pretrain/hf/config.json")
    assert f"  {root}/s3/pretrain/report.md" in out
    model = executor_output(str(tmp_path / "runs" / "s3demo" / "kfp"), "pretrain")["artifacts"]["model"]
    assert model["artifacts"][0]["metadata"]["url"] == f"{root}/s3/pretrain"


def test_failed_step_is_one_line_error(tmp_path, capsys):
    root = str(tmp_path / "run")
    missing = str(tmp_path / "nope.jsonl")
    assert run.run_main([f"run.root={root}", f"data.sources=[{{name:t,path:'{missing}'}}]", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kubellama: error: pipeline failed:") and "data-prep" in err
    assert not os.path.exists(os.path.join(root, "pretrain"))


def test_demo_needs_samples(tmp_path, capsys):
    assert run.run_main(["--demo", "--samples", str(tmp_path / "empty"), "--dry-run"]) == 2
    assert "kubellama data fetch-samples --dest" in capsys.readouterr().err


def test_kfp_local_keeps_a_config_path_under_site_packages(monkeypatch):
    """kfp.local points each step at this Python by rewriting `python3` in the step's arguments; the executor input
    carries the config, whose paths into an installed package (`.../lib/python3.11/site-packages/...`, the demo's
    safety fixtures after `pip install .`) must come through unchanged."""
    from kfp.local import subprocess_task_handler as handler

    monkeypatch.setattr(handler, "replace_python_executable", handler.replace_python_executable)
    run._python_as_a_word()
    config = json.dumps({"safety_eval": {"truthfulqa": {"path": "/v/lib/python3.11/site-packages/kubellama/f"}}})
    command = ["sh", "-c", 'python3 -m pip --version && exec python3 "$program_path/ephemeral_component.py" "$@"',
               "import sys  # python3 in the component's own source stays", "--executor_input", config]
    out = handler.replace_python_executable(command, "/venv/bin/python3.11")
    assert out[2] == ('/venv/bin/python3.11 -m pip --version && exec /venv/bin/python3.11 '
                      '"$program_path/ephemeral_component.py" "$@"')
    assert out[3] == command[3] and out[5] == config and json.loads(out[5]) == json.loads(config)
