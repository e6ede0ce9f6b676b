"""The pretrain stage end to end: outputs and report, exact resume after SIGKILL, clean stop on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_trainer_support import OVERRIDES, write_shards

from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import load_config
from kubellama.pipelines.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


RUN = "t"  # a fixed run id, so outputs are at <root>/t/pretrain and a rerun continues the run


def overrides(root, *more: str, data=None) -> list[str]:
    keys = {m.split("=", 1)[0] for m in more}
    base = [f"run.id={RUN}"] if "run.id" not in keys else []
    return [*OVERRIDES, f"run.root={root}", f"data.output={data or os.path.join(str(root), 'data')}", *base, *more]


def out_dir(root):
    return os.path.join(str(root), RUN, "pretrain")


def start(root, *more: str, data=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "kubellama.pipelines.cli", "pretrain", *overrides(root, *more, data=data)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"never printed {text!r}:\n{''.join(seen)}")


def losses(root) -> list[float]:
    lines = storage.read_text(os.path.join(out_dir(root), "metrics.jsonl")).splitlines()
    return [json.loads(x)["loss"] for x in lines]


def test_stage_writes_checkpoints_metrics_report_and_hf(tmp_path, capsys):
    write_shards(str(tmp_path / "data" / "pretrain"))
    assert cli(["pretrain", *overrides(tmp_path, "pretrain.max_steps=4", "pretrain.ckpt_every=2")]) == 0
    out = tmp_path / RUN / "pretrain"
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(out) and summary["start_step"] == 0
    assert summary["status"] == "completed" and summary["step"] == 4 and summary["world_size"] == 1
    assert summary["hf"] == str(out / "hf") and storage.is_complete(summary["hf"])
    report = json.loads((out / "report.json").read_text())
    assert report["final_loss"] == summary["final_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](" not in (out / "report.md").read_text()  # no image links: the KFP UI cannot resolve them
    assert "data:image/png;base64," in (out / "report.html").read_text()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # On CPU the MFU is taken against the matmul rate measured on this machine at the model's shapes.
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["lr"] > 0 for r in records)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    assert (out / "config.yaml").exists() is False  # in-process: no job, no config hand-off

    # The consolidated HF weights are exactly the last DCP checkpoint's and load in transformers.
    import torch.distributed.checkpoint as dcp
    from transformers import LlamaForCausalLM

    cfg = load_config(overrides(tmp_path))
    from kubellama.components.core.model.llama import Llama

    state = {"model": Llama(cfg.model).state_dict()}
    dcp.load(state, checkpoint_id=summary["checkpoint"])
    hf = load_file(str(out / "hf" / "model.safetensors"))
    assert all(torch.equal(hf[k if k.startswith("lm_head") else f"model.{k}"], v) for k, v in state["model"].items())
    model = LlamaForCausalLM.from_pretrained(str(out / "hf"))
    assert torch.equal(model.lm_head.weight, state["model"]["lm_head.weight"])


def test_sigkill_after_checkpoint_then_restart_is_bit_identical(tmp_path):
    write_shards(str(tmp_path / "data" / "pretrain"))
    more = ("pretrain.max_steps=30", "pretrain.ckpt_every=5", "pretrain.keep_last=2")
    data = str(tmp_path / "data")
    ref = start(tmp_path / "ref", *more, data=data)
    killed = start(tmp_path / "run", *more, data=data)
    wait_for(killed, "checkpoint step 5 ")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert ref.wait() == 0, ref.stderr.read()
    done, _ = __import__("kubellama.components.core.train.checkpoint", fromlist=["steps"]).steps(
        os.path.join(out_dir(tmp_path / "run"), "checkpoints"))
    assert done and done[-1] < 30, "the kill came too late to test anything"

    restart = start(tmp_path / "run", *more, data=data)
    _out, err = restart.communicate()
    assert restart.returncode == 0, err
    assert f"resumed from {os.path.join(out_dir(tmp_path / 'run'), 'checkpoints')}" in err
    # Every logged loss, before and after the kill, and the final weights are bit-identical to the uninterrupted run.
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    assert len(losses(tmp_path / "ref")) == 30
    assert open(os.path.join(out_dir(tmp_path / "run"), "hf", "model.safetensors"), "rb").read() == \
        open(os.path.join(out_dir(tmp_path / "ref"), "hf", "model.safetensors"), "rb").read()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    write_shards(str(tmp_path / "data" / "pretrain"))
    proc = start(tmp_path, "pretrain.max_steps=100000", "pretrain.ckpt_every=100000")
    wait_for(proc, "step 3 ")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    root = tmp_path / RUN / "pretrain" / "checkpoints"
    (step_dir,) = os.listdir(root)
    step = int(step_dir.split("_")[1])
    assert step >= 3 and storage.is_complete(str(root / step_dir))
    assert f"pretrain was preempted at step {step}" in err and f"run.id={RUN}" in err
    report = json.loads((tmp_path / RUN / "pretrain" / "report.json").read_text())
    assert report["status"] == "preempted" and report["step"] == step
    assert not (tmp_path / RUN / "pretrain" / "hf").exists()


def test_plain_torchrun_two_ranks_checkpoint_on_preemption(tmp_path):
    """`torchrun -m kubellama.components.pretrain`: SIGTERM to the agent (what Kubernetes sends) reaches both ranks, which
    drop the unfinished step, save the last finished one together, and stop; a rerun resumes from it."""
    write_shards(str(tmp_path / "data" / "pretrain"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kubellama.components.pretrain",
           *overrides(tmp_path, "pretrain.max_steps=100000", "pretrain.ckpt_every=100000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(proc, "step 3 ")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun itself reports the signal it got
    root = tmp_path / RUN / "pretrain" / "checkpoints"
    (step_dir,) = os.listdir(root)
    step = int(step_dir.split("_")[1])
    # ckpt_every is out of reach: this checkpoint can only come from the SIGTERM path. (Its log line may be cut:
    # torchrun exits once its workers have, and takes the pipe with it.)
    assert 3 <= step < 100000, err
    meta = json.loads((root / step_dir / "trainer.json").read_text())
    assert meta["world_size"] == 2 and storage.is_complete(str(root / step_dir))
    assert sorted(f for f in os.listdir(root / step_dir) if f.startswith("rng_")) == ["rng_0.pt", "rng_1.pt"]
    # The data position of both ranks moved together: 2 rows per rank per step.
    assert meta["data"]["position"] == 2 * step
