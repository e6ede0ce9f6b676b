"""Multi-rank FSDP2 on CPU (gloo): 2 ranks take the same steps as 1, and a 2-rank checkpoint resumes on 1 rank."""
from __future__ import annotations

import json
import os
import shutil

import torch
from test_trainer_support import model_cfg, spawn, train_cfg, write_shards

from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.io import storage
from kubellama.components.core.train import dist
from kubellama.components.core.train.trainer import Trainer

STEPS = 5


def run(env: dist.Env, data: str, out: str, dump: str | None) -> None:
    reader = ShardReader(data, rank=env.rank, world_size=env.world_size)
    trainer = Trainer(train_cfg(max_steps=STEPS, ckpt_every=2, keep_last=5), model_cfg(), out, reader, env=env)
    summary = trainer.fit()
    state = trainer.full_state_dict()
    if env.lead and dump:
        torch.save({"params": state, "start_step": summary["start_step"]}, dump)


def losses(out: str) -> dict[int, float]:
    lines = storage.read_text(os.path.join(out, "metrics.jsonl")).splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


def test_two_ranks_match_one_and_resume_on_one(tmp_path):
    data = write_shards(str(tmp_path / "data"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the spawned ranks: the comparison is tight
    try:
        check(tmp_path, data)
    finally:
        torch.set_num_threads(threads)


def check(tmp_path, data: str) -> None:

    spawn(run, 2, data, str(tmp_path / "two"), str(tmp_path / "two.pt"))
    run(dist.init(), data, str(tmp_path / "one"), str(tmp_path / "one.pt"))
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")

    # Same global batch (4 rows: 2 ranks × 2, or 1 rank × 2 micro-batches of 2) -> the same training.
    assert_close(two["params"], one["params"], 1e-5)
    l1, l2 = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert sorted(l1) == list(range(1, STEPS + 1))
    assert all(abs(l1[s] - l2[s]) < 1e-5 for s in l1)
    # ... and it did train: the weights moved away from the shared initialisation.
    assert one["params"]["layers.0.mlp.up_proj.weight"].abs().sum() > 0
    assert l1[STEPS] < l1[1]

    # The 2-rank checkpoint of step 2 continues on 1 rank and ends where the 1-rank run ended.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    meta = json.loads((resumed / "checkpoints" / "step_0000002" / "trainer.json").read_text())
    assert meta["world_size"] == 2
    run(dist.init(), data, str(resumed), str(tmp_path / "resumed.pt"))
    res = torch.load(tmp_path / "resumed.pt")
    assert res["start_step"] == 2
    assert_close(res["params"], one["params"], 1e-5)
    lr = losses(str(resumed))
    assert sorted(lr) == [3, 4, 5]
    assert all(abs(lr[s] - l1[s]) < 1e-5 for s in lr)
