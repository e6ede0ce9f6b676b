"""The SFT stage: data prep's SFT output, epochs with a seeded order, held-out loss falling on the tiny model, init
from another run, and SIGKILL then rerun ending with the same weights."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_sft_support import make_data, sft_overrides

from kubellama.components.core.data.chat import chain
from kubellama.components.core.data.epochs import EpochReader
from kubellama.components.core.data.shards import ShardReader, ShardWriter
from kubellama.components.core.data.tokenizer import IGNORE, Tokenizer
from kubellama.components.core.io import storage
from kubellama.components.core.train import checkpoint
from kubellama.pipelines.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "t"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_data(str(tmp_path_factory.mktemp("sft")))


def overrides(root, data: str, *more: str) -> list[str]:
    return [*sft_overrides(), f"sft.data={data}", f"run.root={root}", f"run.id={RUN}", *more]


def test_data_prep_splits_dialogs_and_marks_turns(data):
    rep = storage.read_json(os.path.join(data, "report.json"))["sft"]
    # Only single-turn sources: multi-turn dialogs are chained from them, in both splits.
    assert rep["multi_turn"] == 0 and rep["chained"] > 0 and rep["eval"]["examples"] > 0
    dialogs = {s: [json.loads(x) for x in storage.read_text(os.path.join(data, "sft", "dialogs", f"{s}.jsonl"))
                   .splitlines()] for s in ("train", "eval")}
    ids = [d["id"] for s in dialogs.values() for d in s]
    assert len(ids) == len(set(ids)) == rep["examples"]
    chained = [d for d in dialogs["train"] if d["source"] == "chained"]
    assert chained and all(2 <= sum(m["role"] == "assistant" for m in d["messages"]) <= 4 for d in chained)
    tok = Tokenizer(os.path.join(data, "tokenizer.model"))
    reader = ShardReader(os.path.join(data, "sft", "train"))
    assert reader.total_rows == rep["train"]["rows"]
    for i in range(reader.total_rows):
        row = reader.row(i)
        for seg in set(row["segments"].tolist()) - {-1}:
            at = row["segments"] == seg
            turns, labels, tokens = row["turns"][at], row["labels"][at], row["tokens"][at]
            # Turns count down to 0 (the last), each starting at a BOS; answers are trained on every turn.
            starts = np.flatnonzero(tokens == tok.bos_id)
            assert starts[0] == 0 and list(turns[starts]) == list(range(len(starts) - 1, -1, -1))
            assert all(labels[turns == t].max() != IGNORE for t in set(turns.tolist()) if t >= 0) or \
                len(tokens) == reader.seq_len  # (a truncated dialog may lose its last answers)
        assert np.all(row["turns"][row["segments"] == -1] == -1)


def test_chain_joins_consecutive_single_turns():
    one = [[{"role": "system", "content": f"s{i}"}, {"role": "user", "content": f"u{i}"},
            {"role": "assistant", "content": f"a{i}"}] for i in range(11)]
    chains = chain(one, 3, seed=0)
    users = [m["content"] for c in chains for m in c if m["role"] == "user"]
    assert users == sorted(users, key=lambda u: int(u[1:]))[:len(users)] and len(users) >= 9
    assert all(c[0]["role"] == "system" and sum(m["role"] == "system" for m in c) == 1 for c in chains)
    assert all(2 <= sum(m["role"] == "assistant" for m in c) <= 3 for c in chains)


def test_epoch_order_is_seeded_per_epoch_and_the_same_on_any_number_of_ranks(tmp_path):
    url = str(tmp_path / "rows")
    w = ShardWriter(url, seq_len=4, vocab_size=100, shard_rows=7)
    w.add(np.arange(23 * 4).reshape(23, 4) % 100)
    w.close()

    def rows_by_step(world: int, steps: int, rows_per_step: int = 4) -> list[set[int]]:
        readers = [EpochReader(url, r, world, block=2, seed=5) for r in range(world)]
        per_epoch = [r.plan(rows_per_step // world) for r in readers][0]  # noqa: RUF015 (every reader plans)
        out = []
        for _ in range(steps):
            seen = set()
            for r in readers:
                for _ in range(rows_per_step // world // 2):
                    seen |= {int(x) // 4 for x in r.next_batch(2)["tokens"][:, 0]}
            out.append(seen)
        assert per_epoch == 23 // 4 and readers[0].epoch == steps // per_epoch
        return out

    one, two = rows_by_step(1, 10), rows_by_step(2, 10)
    assert one == two
    # Each epoch reads 20 distinct rows of 23, in an order of its own.
    first, second = set().union(*one[:5]), set().union(*one[5:])
    assert len(first) == len(second) == 20 and one[:5] != one[5:]
    # The state resumes mid-epoch to the same rows, even on another world size.
    a = EpochReader(url, 0, 1, block=2, seed=5)
    a.plan(4)
    for _ in range(7):
        a.next_batch(2)
    b = EpochReader(url, 0, 1, block=2, seed=5)
    b.plan(4)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"epoch": 0, "position": 14, "world_size": 1, "seed": 5}
    assert np.array_equal(a.next_batch(2)["tokens"], b.next_batch(2)["tokens"])
    a.next_batch(2)
    assert a.state_dict()["epoch"] == 0
    a.next_batch(2)  # the 20th row of a 20-row epoch: the reader wraps with this batch
    assert a.state_dict() == {"epoch": 1, "position": 0, "world_size": 1, "seed": 5}


def test_sft_lowers_heldout_loss_checkpoints_each_epoch_and_exports(tmp_path, data, capsys):
    assert cli(["sft", *overrides(tmp_path, data, "sft.epochs=2", "sft.ckpt_every=1000")]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / RUN / "sft"
    report = json.loads((out / "report.json").read_text())
    per_epoch = report["steps_per_epoch"]
    assert report["status"] == "completed" and report["step"] == summary["step"] == 2 * per_epoch
    # Held-out loss at the start and after each epoch, falling.
    assert [r["step"] for r in report["heldout"]] == [0, per_epoch, 2 * per_epoch]
    assert report["heldout_loss_end"] < report["heldout_loss_start"] - 1.0
    assert report["heldout_loss_start"] == report["heldout"][0]["loss"]
    assert report["heldout_ppl_end"] == pytest.approx(np.exp(report["heldout_loss_end"]))
    md = (out / "report.md").read_text()
    assert f"{report['heldout_loss_start']:.4f} → {report['heldout_loss_end']:.4f}" in md
    # A checkpoint at each epoch end (ckpt_every is out of reach), and the HF export with the tokenizer.
    assert checkpoint.steps(str(out / "checkpoints"))[0] == [per_epoch, 2 * per_epoch]
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(out / "hf"))
    assert model.config.vocab_size == 640 and (out / "hf" / "tokenizer.model").exists()


def test_init_from_another_run_starts_from_its_weights(tmp_path, data, capsys):
    """`sft.init` = a stage output folder or an HF folder: the held-out loss at the start is the other run's at its
    end."""
    assert cli(["sft", *overrides(tmp_path / "a", data, "sft.max_steps=6")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli(["sft", *overrides(tmp_path / "b", data, "sft.max_steps=2", f"sft.init={first['output']}")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["heldout"][0]["step"] == 0 and first["heldout"][-1]["step"] == 6
    assert second["heldout_loss_start"] == pytest.approx(first["heldout_loss_end"], abs=1e-6)
    assert second["lineage"]["parent"].endswith("step_0000006")
    # Its HF export is the same weights, read through the Hugging Face path.
    assert cli(["sft", *overrides(tmp_path / "c", data, "sft.max_steps=1", f"sft.init={first['hf']}")]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["heldout_loss_start"] == pytest.approx(first["heldout_loss_end"], abs=1e-6)
    assert third["lineage"]["parent"] == first["hf"]


def start(root, data: str, *more: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "kubellama.pipelines.cli", "sft", *overrides(root, data, *more)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_rerun_ends_with_the_same_weights(tmp_path, data):
    more = ("sft.epochs=2", "sft.ckpt_every=4")
    ref = start(tmp_path / "ref", data, *more)
    killed = start(tmp_path / "run", data, *more)
    for line in killed.stderr:
        if "checkpoint step 4 " in line:
            break
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert ref.wait() == 0, ref.stderr.read()
    ckpts = os.path.join(str(tmp_path / "run"), RUN, "sft", "checkpoints")
    done, _ = checkpoint.steps(ckpts)
    per_epoch = storage.read_json(os.path.join(str(tmp_path / "ref"), RUN, "sft", "report.json"))["steps_per_epoch"]
    assert done and done[-1] < per_epoch, "the kill must land inside the first epoch"
    rerun = start(tmp_path / "run", data, *more)
    _, err = rerun.communicate()
    assert rerun.returncode == 0, err
    assert f"resumed from {ckpts}" in err

    def outputs(root) -> tuple:
        out = os.path.join(str(root), RUN, "sft")
        losses = [json.loads(x)["loss"] for x in storage.read_text(os.path.join(out, "metrics.jsonl")).splitlines()]
        with open(os.path.join(out, "hf", "model.safetensors"), "rb") as f:
            return losses, storage.read_json(os.path.join(out, "heldout.json")), f.read()

    got, want = outputs(tmp_path / "run"), outputs(tmp_path / "ref")
    assert got[0] == want[0] and len(got[0]) == 2 * per_epoch
    assert got[1] == want[1]
    assert got[2] == want[2]


def test_bad_loss_turns_is_one_line(tmp_path, data, capsys):
    assert cli(["sft", *overrides(tmp_path, data, "sft.loss_turns=first")]) == 2
    assert "loss_turns='first': expected one of all, last" in capsys.readouterr().err


def test_last_turn_loss_scores_fewer_answer_tokens(tmp_path, data, capsys):
    tokens = {}
    for turns in ("all", "last"):
        assert cli(["sft", *overrides(tmp_path / turns, data, "sft.max_steps=1", f"sft.loss_turns={turns}")]) == 0
        tokens[turns] = json.loads(capsys.readouterr().out)["heldout"][0]["tokens"]
    # The held-out set holds chained multi-turn dialogs: their earlier answers drop out.
    assert 0 < tokens["last"] < tokens["all"]
