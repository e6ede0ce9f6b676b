"""The reward model's math against hand-computed values: margin ranking loss, its gradient, the safety auxiliary
loss, the combined reward at its boundaries, whitening, the metrics of the report."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_trainer_support import spawn

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.rlhf.combined import Whitener, choose, combine, detection, logit
from kubellama.components.core.rlhf.scorer import RewardModel, pad
from kubellama.components.reward.evaluate import accuracy, accuracy_by_rating, calibration
from kubellama.components.reward.loss import margins, pair_loss, ranking_loss, safety_aux_loss
from kubellama.components.reward.stage import schedule
from kubellama.conf.schema.data import RATINGS
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.reward import CombinedRewardConfig, RewardConfig

LOG2 = 0.6931471805599453


def test_schedule_is_one_epoch_with_3_percent_warmup_of_at_least_5():
    p = RewardConfig()  # the recipe: max_steps=0 (one epoch), 512 pairs per batch, micro_batch 4
    # §3.2.2: one epoch, warmup 3% of the steps (minimum 5). 100000 // 512 = 195 steps; 3% = 5.85, rounded up: 6.
    s = schedule(p, 100_000, 8)
    assert (s.max_steps, s.warmup_steps, s.global_batch_tokens) == (195, 6, 512 * p.seq_len)
    assert (p.max_steps, p.warmup_steps) == (0, -1)  # the config itself is left alone
    # 210 steps: 3% = 6.3, rounded up to 7 (a rounding rule would give 6).
    assert schedule(p, 210 * 512 + 511, 1).warmup_steps == 7
    # 100 steps: 3% = 3, so the minimum of 5; 3 steps: never more warmup than steps; fewer pairs than a batch: 1.
    assert (schedule(p, 100 * 512, 4).max_steps, schedule(p, 100 * 512, 4).warmup_steps) == (100, 5)
    assert (schedule(p, 3 * 512, 4).max_steps, schedule(p, 3 * 512, 4).warmup_steps) == (3, 3)
    assert schedule(p, 100, 1).max_steps == 1
    # Given steps and warmup win over the epoch and the 3%.
    fixed = schedule(RewardConfig(max_steps=40, warmup_steps=2), 100_000, 1)
    assert (fixed.max_steps, fixed.warmup_steps) == (40, 2)


@pytest.mark.parametrize("pairs_per_batch,micro_batch,world", [(512, 4, 3), (8, 4, 4)])
def test_schedule_refuses_a_batch_that_ranks_cannot_split_in_one_line(pairs_per_batch, micro_batch, world):
    p = RewardConfig(pairs_per_batch=pairs_per_batch, micro_batch=micro_batch)
    with pytest.raises(ConfigError) as err:
        schedule(p, 100_000, world)
    assert str(err.value) == (f"reward.pairs_per_batch={pairs_per_batch} is not a multiple of micro_batch·world_size "
                              f"= {micro_batch}·{world}")


def test_margin_tables_are_table_27():
    assert margins("small").tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert margins("large").tolist() == [3.0, 2.0, 1.0, 0.0]
    assert margins("none").tolist() == [0.0] * 4
    with pytest.raises(ConfigError, match="reward.margin='huge'"):
        margins("huge")


def test_ranking_loss_hand_computed():
    chosen = torch.tensor([1.0, 3.0, 0.0, 0.5, 10.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, 0.0, 1.0, 0.5, -10.0], dtype=torch.float64)
    # significantly better (small: 1), better (large: 2), negligibly better (0), none (0), far apart (small: 1).
    margin = torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    got = ranking_loss(chosen, rejected, margin).tolist()
    # -log σ(x) = log(1 + e^-x) at x = 0, 1, -1, 0, 19.
    assert got == pytest.approx([LOG2, 0.31326168751822286, 1.3132616875182228, LOG2, 5.602796406145941e-09],
                                rel=1e-12)


def test_ranking_loss_gradient_pushes_chosen_up_more_with_a_larger_margin():
    chosen = torch.tensor([0.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    ranking_loss(chosen, rejected, torch.tensor([0.0, 1.0])).sum().backward()
    # d/d chosen = σ(x) - 1 at x = 0 and x = -1; the rejected side gets the opposite.
    assert chosen.grad.tolist() == pytest.approx([-0.5, -0.7310585786300049])
    assert rejected.grad.tolist() == pytest.approx([0.5, 0.7310585786300049])


def test_safety_aux_loss_hand_computed():
    scores = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    safe = torch.tensor([[1, 0], [1, 0]])
    assert safety_aux_loss(scores, safe).flatten().tolist() == pytest.approx(
        [LOG2, LOG2, 0.12692801104297263, 2.1269280110429727], rel=1e-12)


def _tiny_rm() -> RewardModel:
    torch.manual_seed(0)
    return RewardModel(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64,
                                   max_seq_len=32))


def _batch(seqs: list[list[int]], ratings: list[int], safe: list[list[int]]) -> dict[str, torch.Tensor]:
    tokens, lengths = pad(seqs, torch.device("cpu"))
    B = len(seqs) // 2
    return {"tokens": tokens.view(B, 2, -1), "lengths": lengths.view(B, 2), "rating": torch.tensor(ratings),
            "safe": torch.tensor(safe)}


SEQS = [[1, 5, 9, 2], [1, 5, 7, 7, 3, 2], [1, 11, 2], [1, 11, 12, 13, 2]]


def test_pair_loss_scores_the_last_token_of_each_side_with_the_rating_margin():
    model = _tiny_rm()
    batch = _batch(SEQS, [1, 3], [[1, 0], [1, 1]])
    loss, count = pair_loss("large", aux_weight=0.5)(model, batch)
    # Each sequence alone, unpadded: the score at its last token.
    r = [float(model(torch.tensor([s]))[0].detach()) for s in SEQS]
    want = [math.log1p(math.exp(-(r[0] - r[1] - 2.0))), math.log1p(math.exp(-(r[2] - r[3] - 0.0)))]
    aux = [(math.log1p(math.exp(-r[0])) + math.log1p(math.exp(r[1]))) / 2,
           (math.log1p(math.exp(-r[2])) + math.log1p(math.exp(-r[3]))) / 2]
    assert count.item() == 2
    assert loss.item() == pytest.approx(sum(want) + 0.5 * sum(aux), rel=1e-5)


def test_a_step_on_the_loss_raises_chosen_over_rejected():
    model = _tiny_rm()
    batch = _batch(SEQS, [0, 0], [[1, 1], [1, 1]])

    def gaps() -> list[float]:
        with torch.no_grad():
            s = model(batch["tokens"].view(4, -1), batch["lengths"].view(4)).view(2, 2)
        return (s[:, 0] - s[:, 1]).tolist()

    before = gaps()
    loss, _ = pair_loss("small")(model, batch)
    loss.backward()
    assert model.score.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    assert all(a > b for a, b in zip(gaps(), before))


def test_combined_reward_boundaries():
    r_h = torch.full((6,), 0.9, dtype=torch.float64)
    r_s = torch.tensor([0.15, 0.1499999, 0.1500001, 0.15, 0.9, 0.01], dtype=torch.float64)
    tag = torch.tensor([False, False, False, True, True, False])
    # Exactly 0.15 is not below it: R_h; just below: R_s; just above: R_h; tagged: always R_s.
    assert choose(r_h, r_s, tag, 0.15).tolist() == [0.9, 0.1499999, 0.9, 0.15, 0.9, 0.01]
    # In fp32 too: 0.15 is not below the threshold.
    assert choose(torch.tensor([0.9]), torch.tensor([0.15]), torch.tensor([False]), 0.15).tolist() == \
        pytest.approx([0.9])
    # Tag on with a helpful R_h above R_s: R_s still wins.
    assert choose(torch.tensor([0.99]), torch.tensor([0.5]), torch.tensor([True]), 0.15).tolist() == [0.5]


def test_combined_reward_whitens_the_logits():
    # What PPO runs: the stage's reward function gives combine(...) (components/core/rlhf/reward_models.py combined_reward), the
    # loop whitens it with a Whitener of the same config (components/ppo/experience.py make_rollout).
    cfg = CombinedRewardConfig(whiten="batch")
    r_h = torch.tensor([0.9, 0.5, 0.5, 0.8], dtype=torch.float64)
    r_s = torch.tensor([0.15, 0.14, 0.2, 0.6], dtype=torch.float64)
    tag = torch.tensor([False, False, True, False])
    # R_c = 0.9 (0.15 is not below), 0.14 (below), 0.2 (tagged), 0.8; logit by hand: ln(p / (1 - p)).
    logits = np.array([math.log(9), math.log(0.14 / 0.86), math.log(0.25), math.log(4)])
    raw = combine(r_h, r_s, tag, cfg)
    assert raw.dtype == torch.float64 and raw.tolist() == pytest.approx(logits.tolist(), rel=1e-12)
    want = (logits - logits.mean()) / math.sqrt(logits.var() + 1e-6)
    got = Whitener(cfg.whiten, cfg.eps)(raw)
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-9)
    assert float(got.mean()) == pytest.approx(0.0, abs=1e-12)
    # A saturated RM gives a finite reward.
    assert math.isfinite(float(logit(torch.tensor([1.0]), 1e-6)[0]))


def test_running_whitening_uses_everything_seen():
    rng = np.random.default_rng(0)
    a, b = rng.normal(2.0, 3.0, 7), rng.normal(-1.0, 0.5, 5)
    w = Whitener("running", eps=0.0)
    w(torch.tensor(a))
    got = w(torch.tensor(b))
    both = np.concatenate([a, b])
    assert got.tolist() == pytest.approx(((b - both.mean()) / both.std()).tolist(), rel=1e-10)
    resumed = Whitener("running", eps=0.0)
    resumed.load_state_dict(w.state_dict())
    c = rng.normal(0.0, 1.0, 3)
    all3 = np.concatenate([both, c])
    assert resumed(torch.tensor(c)).tolist() == pytest.approx(((c - all3.mean()) / all3.std()).tolist(), rel=1e-10)
    with pytest.raises(ConfigError, match="reward.combined.whiten='ema'"):
        Whitener("ema")


def _whiten_on_ranks(env, values, out):
    part = torch.tensor(values[env.rank::env.world_size], dtype=torch.float64)
    torch.save(Whitener("batch", eps=0.0)(part), f"{out}/{env.rank}.pt")


def test_batch_whitening_is_over_all_ranks(tmp_path):
    values = [0.5, -2.0, 3.0, 1.0, 7.0, -1.5, 0.0]
    spawn(_whiten_on_ranks, 2, values, str(tmp_path))
    v = np.array(values)
    want = (v - v.mean()) / v.std()
    for rank in (0, 1):
        assert torch.load(tmp_path / f"{rank}.pt").tolist() == pytest.approx(want[rank::2].tolist(), rel=1e-12)


def test_detection_precision_and_recall():
    found = detection(torch.tensor([0.1, 0.2, 0.05, 0.5, 0.15]), torch.tensor([1, 1, 0, 0, 1]), 0.15)
    # Flagged: 0.1 (unsafe) and 0.05 (safe); 0.15 itself is not below. Unsafe: 3.
    assert found == {"threshold": 0.15, "precision": 0.5, "recall": 1 / 3, "flagged": 2, "unsafe": 3,
                     "responses": 5}
    assert detection(torch.tensor([0.9]), torch.tensor([0]), 0.15)["precision"] is None


def test_accuracy_per_rating_and_calibration():
    chosen = torch.tensor([1.0, 2.0, 0.0, 3.0, 1.0])
    rejected = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5])
    ratings = [RATINGS[0], RATINGS[0], RATINGS[1], RATINGS[3], RATINGS[3]]
    assert accuracy(chosen, rejected) == 0.6  # the tie counts as wrong
    assert accuracy_by_rating(chosen, rejected, ratings) == {RATINGS[0]: 0.5, RATINGS[1]: 0.0, RATINGS[2]: None,
                                                             RATINGS[3]: 1.0}
    rows = calibration(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), bins=2)
    # Both orders of each pair: differences -2, -1 (not preferred) and 1, 2 (preferred).
    assert [(r["low"], r["high"], r["observed"], r["n"]) for r in rows] == [(-2.0, -1.0, 0.0, 2), (1.0, 2.0, 1.0, 2)]
    assert rows[1]["predicted"] == pytest.approx((1 / (1 + math.exp(-1)) + 1 / (1 + math.exp(-2))) / 2)
