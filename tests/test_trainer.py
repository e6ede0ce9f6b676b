"""Trainer core in one process: schedule, loss masking and packing, activation checkpointing, checkpoints
(keep-last, interrupted saves, S3), and the non-finite-loss stop."""
from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from test_trainer_support import SEQ, VOCAB, model_cfg, train_cfg, write_shards

from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.train.loss import causal_lm_loss, segment_positions
from kubellama.components.core.train.optim import lr_factor, param_groups
from kubellama.components.core.train.trainer import NonFiniteLoss, Trainer


def trainer(data: str, out: str, **kw) -> Trainer:
    loss_fn = kw.pop("loss_fn", causal_lm_loss)
    return Trainer(train_cfg(**kw), model_cfg(), out, ShardReader(data), loss_fn=loss_fn, env=dist.init())


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(b > a for a, b in itertools.pairwise(f[:10]))
    assert all(b <= a for a, b in itertools.pairwise(f[10:]))
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_not_norms_or_embedding():
    model = Llama(model_cfg())
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert "lm_head.weight" in decayed and "layers.1.self_attn.q_proj.weight" in decayed
    assert kept == {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}


def test_segment_positions_restart_per_example():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_labels_mask_the_loss_and_segments_isolate_packed_examples():
    torch.manual_seed(0)
    model = Llama(model_cfg())
    a, b = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 10))
    tokens = torch.cat([a, b], 1)
    segments = torch.tensor([[0] * 7 + [1] * 10])
    labels = tokens.clone()
    labels[:, :9] = -100  # only the second example's answer after its first two tokens is trained
    loss, n = causal_lm_loss(model, {"tokens": tokens, "labels": labels, "segments": segments})
    # Reference: the second example alone, as if it were never packed (fresh positions, no view of the first).
    logits_b = model(b[:, :-1])
    targets = b[:, 1:].clone()
    targets[:, :1] = -100
    ref = torch.nn.functional.cross_entropy(logits_b[0], targets[0], ignore_index=-100, reduction="sum")
    assert n.item() == 8
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    data = write_shards(str(tmp_path / "data"))
    ref = trainer(data, str(tmp_path / "none"), max_steps=2)
    ref.fit()
    full = trainer(data, str(tmp_path / "full"), max_steps=2, activation_checkpointing="full")
    full.fit()
    every = trainer(data, str(tmp_path / "k"), max_steps=2, activation_checkpointing="every_k", ac_every=2)
    every.fit()
    a, b, c = ref.full_state_dict(), full.full_state_dict(), every.full_state_dict()
    # Checkpoint keys keep the plain (HF) parameter names whatever the wrapping.
    assert a.keys() == b.keys() == c.keys() == set(Llama(model_cfg()).state_dict())
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6) and torch.allclose(a[k], c[k], atol=1e-6), k


def test_keep_last_and_interrupted_saves_are_never_resumed(tmp_path):
    data = write_shards(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    trainer(data, out, max_steps=5, ckpt_every=1, keep_last=2).fit()
    root = os.path.join(out, "checkpoints")
    assert checkpoint.steps(root) == ([4, 5], [])
    # A save cut short (no _COMPLETE) at a later step must not be picked.
    os.makedirs(os.path.join(root, "step_0000009"))
    with open(os.path.join(root, "step_0000009", "__0_0.distcp"), "wb") as f:
        f.write(b"partial")
    t = trainer(data, out, max_steps=6, ckpt_every=1, keep_last=2)
    summary = t.fit()
    assert summary["start_step"] == 5 and summary["step"] == 6
    # max_steps changed, so the schedule differs, but the position in the data carried over.
    assert t.data.position == 6 * 4
    # The partial folder is only dropped once older than the newest complete save; step 9 > 6 stays ignored.
    assert checkpoint.steps(root) == ([5, 6], [9])
    assert checkpoint.latest(root).endswith("step_0000006")


def test_batch_that_does_not_divide_is_a_config_error(tmp_path):
    data = write_shards(str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="global_batch_tokens=50 is not a multiple"):
        trainer(data, str(tmp_path / "o"), global_batch_tokens=50)
    with pytest.raises(ConfigError, match="seq_len=33 but the training rows hold 17"):
        trainer(data, str(tmp_path / "o"), seq_len=33)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_shards(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    calls = {"n": 0}

    def poisoned(model, batch):
        # 2 micro-batches per step: the 6th call is inside step 3, after the step-2 checkpoint.
        calls["n"] += 1
        loss, n = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] >= 6 else loss), n

    t = trainer(data, out, max_steps=6, ckpt_every=2, loss_fn=poisoned)
    with pytest.raises(NonFiniteLoss, match=r"at step 3 is not finite.*last good checkpoint is .*step_0000002"):
        t.fit()
    root = os.path.join(out, "checkpoints")
    assert checkpoint.steps(root) == ([2], [])
    # The optimizer never stepped on the NaN gradients: the weights are still finite, and the checkpoint resumes.
    assert all(torch.isfinite(v).all() for v in t.full_state_dict().values())
    resumed = trainer(data, out, max_steps=3)
    assert resumed.fit()["start_step"] == 2


def test_checkpoints_round_trip_through_s3(tmp_path, s3_bucket):
    data = write_shards(str(tmp_path / "data"))
    remote = f"{s3_bucket}/pretrain"
    local = str(tmp_path / "local")
    ref = trainer(data, local, max_steps=4, ckpt_every=4).fit()

    first = trainer(data, remote, max_steps=4, ckpt_every=2, keep_last=1)
    first.fit()
    url = checkpoint.latest(f"{remote}/checkpoints")
    assert url == f"{remote}/checkpoints/step_0000004" and storage.is_complete(url)
    assert checkpoint.steps(f"{remote}/checkpoints") == ([4], [])
    assert storage.exists(f"{remote}/metrics.jsonl")
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{remote}/tb"))
    # Resume from S3 into a fresh trainer: state identical to what was saved, trajectory identical to a local run.
    again = trainer(data, remote, max_steps=4)
    again.resume()
    assert again.step == 4 and again.data.position == 16
    saved, loaded = first.full_state_dict(), again.full_state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    remote_losses = [json.loads(x)["loss"] for x in storage.read_text(f"{remote}/metrics.jsonl").splitlines()]
    assert remote_losses == [r["loss"] for r in ref["records"]]
    assert np.isfinite(remote_losses).all()


def test_side_arrays_reach_the_loss_for_sft_style_shards(tmp_path):
    rows = 32
    labels = np.random.default_rng(1).integers(0, VOCAB, size=(rows, SEQ))
    labels[:, : SEQ // 2] = -100  # prompt halves carry no loss
    segments = np.repeat(np.arange(rows)[:, None], SEQ, 1)
    segments[:, SEQ // 3:] += 1000  # two examples packed per row
    data = write_shards(str(tmp_path / "data"), rows=rows, labels=labels, segments=segments)
    seen = []

    def spy(model, batch):
        seen.append({k: (v.dtype, tuple(v.shape)) for k, v in batch.items()})
        loss, n = causal_lm_loss(model, batch)
        seen[-1]["count"] = int(n)
        return loss, n

    summary = trainer(data, str(tmp_path / "run"), max_steps=2, loss_fn=spy).fit()
    assert summary["status"] == "completed" and np.isfinite(summary["final_loss"])
    assert seen[0]["tokens"] == seen[0]["labels"] == seen[0]["segments"] == (torch.int64, (2, SEQ))
    # Targets are labels[1:]: SEQ - 1 positions per row, of which those before SEQ // 2 are masked.
    assert all(s["count"] == 2 * (SEQ - SEQ // 2) for s in seen)


def test_sigterm_mid_step_drops_the_step_and_saves_the_last_finished_one(tmp_path):
    """8 micro-batches per step; SIGTERM arrives during micro-batch 4 of step 3. The run stops before micro-batch 5,
    saves step 2 with the data position where step 2 ended, and its weights are step 2's."""
    import signal

    data = write_shards(str(tmp_path / "data"), rows=64)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 8 + 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return causal_lm_loss(model, batch)

    big = dict(max_steps=4, ckpt_every=100, micro_batch=1, global_batch_tokens=8 * SEQ)
    t = trainer(data, str(tmp_path / "cut"), loss_fn=loss_fn, **big)
    summary = t.fit()
    assert summary["status"] == "preempted" and t.step == 2 and calls["n"] == 2 * 8 + 4
    ckpt = checkpoint.folder(str(tmp_path / "cut" / "checkpoints"), 2)
    assert storage.is_complete(ckpt)
    assert checkpoint.meta(ckpt)["data"] == ShardReader(data).state_dict() | {"position": 2 * 8}
    ref = trainer(data, str(tmp_path / "ref"), **{**big, "max_steps": 2})
    ref.fit()
    got, want = t.full_state_dict(), ref.full_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_periodic_saves_are_written_in_the_background_and_marked_last(tmp_path, monkeypatch):
    """Saves inside the run go through DCP's async_save; `_COMPLETE` is written only once its writes have finished."""
    real_save, real_mark = checkpoint.dcp.async_save, checkpoint.storage.mark_complete
    futures, marked = [], []

    def spy_save(state, **kw):
        futures.append(real_save(state, **kw))
        return futures[-1]

    def spy_mark(url, info=None):
        marked.append((os.path.basename(url), all(f.done() for f in futures)))
        return real_mark(url, info)

    monkeypatch.setattr(checkpoint.dcp, "async_save", spy_save)
    monkeypatch.setattr(checkpoint.storage, "mark_complete", spy_mark)
    data = write_shards(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    trainer(data, out, max_steps=4, ckpt_every=1, keep_last=5).fit()
    # Steps 1-3 in the background; the final step 4 is saved in the foreground before the run returns.
    assert len(futures) == 3
    steps = [(m, done) for m, done in marked if m.startswith("step_")]
    assert [m for m, _ in steps] == [f"step_000000{i}" for i in range(1, 5)] and all(done for _, done in steps)
    assert checkpoint.steps(os.path.join(out, "checkpoints")) == ([1, 2, 3, 4], [])
