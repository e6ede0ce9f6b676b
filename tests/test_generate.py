"""generate(): every FSDP rank steps until all ranks are done; requests past max_seq_len are refused."""
from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch

from components.core import dist
from components.core.errors import KubellamaError
from components.core.generate import generate
from components.core.model import Llama
from components.core.trainer import shard
from test_trainer_support import _entry, model_cfg, train_cfg

MAX_NEW = 8
# Rank 0's prompt is cut short by EOS; rank 1's two prompts run to MAX_NEW.
PROMPTS = {0: [[1, 5, 9]], 1: [[1, 7], [1, 3, 4, 6]]}
# A second call where the ranks ask for different lengths.
SHORT = {0: 2, 1: 6}


def tiny() -> Llama:
    torch.manual_seed(0)
    return Llama(model_cfg()).eval()


def ranked(env: dist.Env, eos: int, dump: str) -> None:
    model = shard(tiny(), train_cfg(), env)
    result: dict = {"long": generate(model, PROMPTS[env.rank], MAX_NEW, eos_id=eos),
                    "short": generate(model, PROMPTS[env.rank], SHORT[env.rank], eos_id=None)}
    # Rank 1 asks for too much: both ranks must raise rather than rank 0 waiting in the next collective.
    too_long = [[1] * 12] if env.rank == 1 else [[1, 2]]
    try:
        generate(model, too_long, MAX_NEW)
    except KubellamaError as exc:
        result["refused"] = str(exc)
    torch.save(result, f"{dump}.{env.rank}")


def spawn_within(seconds: float, fn, world: int, *args) -> None:
    """Like test_trainer_support.spawn, but a hang fails the test instead of blocking it."""
    fd, path = tempfile.mkstemp(prefix="kl-rdzv-")
    os.close(fd)
    os.remove(path)
    ctx = torch.multiprocessing.spawn(_entry, args=(world, f"file://{path}", fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {seconds} s: generate() deadlocked")


def test_ranks_finishing_at_different_steps_all_complete_and_match_one_process(tmp_path):
    ref = tiny()
    free = {r: generate(ref, PROMPTS[r], MAX_NEW, eos_id=None) for r in PROMPTS}
    # An EOS that rank 0 samples at its 2nd step and rank 1 never does.
    eos = free[0][0][1]
    assert all(eos not in out for out in free[1]), "pick other prompts: rank 1 would stop too"

    spawn_within(120, ranked, 2, eos, str(tmp_path / "out"))
    got = {r: torch.load(tmp_path / f"out.{r}") for r in PROMPTS}

    for r in PROMPTS:
        assert got[r]["long"] == generate(ref, PROMPTS[r], MAX_NEW, eos_id=eos)
        assert got[r]["short"] == generate(ref, PROMPTS[r], SHORT[r], eos_id=None)
    assert got[0]["long"] == [free[0][0][:2]]
    assert all(len(o) == MAX_NEW for o in got[1]["long"])
    assert "max_seq_len=17" in got[1]["refused"] and "another rank" in got[0]["refused"]


def test_length_past_max_seq_len_is_refused_in_one_line():
    model = tiny()
    limit = model.cfg.max_seq_len
    with pytest.raises(KubellamaError) as err:
        generate(model, [[1, 2], [1] * 10], limit - 9)
    assert str(err.value) == (f"prompt 1 has 10 tokens + max_new_tokens={limit - 9} = {limit + 1}, "
                              f"beyond the model's max_seq_len={limit}")
    # Exactly filling the context is allowed.
    assert len(generate(model, [[1] * 10], limit - 10, eos_id=None)[0]) == limit - 10
