"""The whole recipe in one kfp.local run on the tiny model, every stage on: data prep -> pretrain -> SFT -> GAtt ->
both reward models (side by side) -> rejection sampling -> PPO -> safety eval. One or two steps per stage and a few
eval items: this checks that the stages chain and report, not what they learn. The run is the session's
`recipe_run` (conftest.py): the browser test opens its pages and the commands test runs the docs' commands on it."""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from test_pipeline import FIRST, compile_docs
from test_pipeline_local import TINY, corpus
from test_reward_support import write_jsonl
from test_sft_support import write_dialogs
from test_world import SMALL

from kubellama.components.core.io import storage
from kubellama.components.safety_eval import FIXTURES
from kubellama.conf.schema.data import RATINGS
from kubellama.pipelines import run

MODELS = ("pretrain", "sft", "gatt", "rejection_sampling", "ppo")
FORM_BETA = 0.0234  # not any config's default
TURNS = ["1", "2", "4", "8", "20"]


def chain_overrides(tmp_path) -> list[str]:
    """TINY with every stage on, each stage cut to a step or two, in fp32 whatever the CPU, seeded (run.seed). The
    safety gate only reports: one-step models pass or fail its lines by chance. The rule-checked world is on at its
    smallest (test_world.SMALL, two task families), as in the demo: every stage reports on it and `kubellama show` reads it."""
    src = corpus(str(tmp_path / "corpus.jsonl"), docs=100)
    dialogs = write_dialogs(str(tmp_path / "dialogs.jsonl"), 40)
    pairs = write_jsonl(str(tmp_path / "pairs.jsonl"), [
        {"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": "No idea."} for i in range(40)])
    harm = write_jsonl(str(tmp_path / "harm.jsonl"), [{"prompt": f"Do harm {i}"} for i in range(40)])
    train = {"sft": dict(max_steps=1, global_batch_tokens=160, micro_batch=2, eval_rows=4),
             "gatt": dict(max_steps=1, global_batch_tokens=160, micro_batch=2, eval_rows=4, min_turns=1,
                          message_chars=60, eval_dialogs=2, eval_max_new_tokens=2),
             "reward": dict(max_steps=1, pairs_per_batch=2, micro_batch=2, eval_batch=32),
             # A one-step model almost never samples EOS in 4 tokens: keep cut answers (the report counts them).
             "rejection_sampling": dict(max_steps=1, samples=2, prompts=4, **{"sampling.max_new_tokens": 4},
                                        allow_truncated=True, global_batch_tokens=80, micro_batch=1, epochs=1, score_batch=4),
             "ppo": dict(max_steps=1, prompts=4, prompts_per_batch=4, minibatch=4, micro_batch=4,
                         **{"sampling.max_new_tokens": 4}, heldout_prompts=2, eval_every=1, patience=0, ckpt_every=1)}
    # PPO logs every iteration (no log_every).
    steps = [f"{stage}.{k}={v}" for stage, keys in train.items()
             for k, v in {**keys, **({} if stage == "ppo" else {"log_every": 1}), "mixed_precision": "fp32"}.items()]
    return [f"run.root={tmp_path / 'run'}", "run.id=c", f"data.sources=[{{name:t,path:'{src}'}}]",
            *[o for o in TINY if not o.startswith("pipeline.stages.")], "model.vocab_size=400",
            # Rows of 80 positions (room for a dialog or a TruthfulQA question); a context of 128 for the world's
            # held-out prompts (up to ~60 tokens) and their 32-token greedy answers.
            "model.max_seq_len=128", *(f"{s}.seq_len=80" for s in ("data", "pretrain", "sft", "gatt", "reward",
                                                                   "rejection_sampling")),
            "pretrain.global_batch_tokens=160", "pretrain.mixed_precision=fp32", "pretrain.max_steps=2",
            f"data.sft.sources=[{{name:chat,path:'{dialogs}'}}]", "data.sft.eval_fraction=0.2",
            f"data.preference.sources=[{{name:p,path:'{pairs}'}}]", "data.preference.eval_fraction=0.25",
            f"data.preference.synthetic_safety=[{{name:h,path:'{harm}'}}]", *steps,
            *(f"{k}={v}" for k, v in SMALL.items()), "data.world.families=[add,copy]",
            f"safety_eval.truthfulqa.path={FIXTURES}/truthfulqa", "safety_eval.truthfulqa.primer=false",
            "safety_eval.truthfulqa.limit=1", f"safety_eval.toxicity.path={FIXTURES}/toxigen",
            "safety_eval.toxicity.limit=1", f"safety_eval.bold.path={FIXTURES}/bold", "safety_eval.bold.limit=1",
            "safety_eval.refusal.limit=1", "safety_eval.decoding.max_new_tokens=4",
            "safety_eval.mixed_precision=fp32", "safety_eval.gate.mode=report"]


@dataclass
class RecipeRun:
    """One `kubellama run` of chain_overrides: its overrides, its run folder (`<run.root>/c`, beside `data/` and the
    `latest` link), its exit status and what it printed."""
    overrides: list[str]
    root: str
    run_dir: str
    rc: int
    out: str
    err: str


def run_recipe(tmp: Path) -> RecipeRun:
    """The whole recipe under `tmp`, in this process (what conftest's session-scoped `recipe_run` calls once)."""
    overrides = chain_overrides(tmp)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        # PPO's beta through the run form, as a user types it into the KFP UI's "Create run" form (issue 23): the
        # pipeline's first step applies it at run time, and PPO must train with it.
        rc = run.run_main([*overrides, "--form", f"ppo.beta={FORM_BETA}"])
    return RecipeRun(overrides, str(tmp / "run"), str(tmp / "run" / "c"), rc, out.getvalue(), err.getvalue())


def test_the_whole_recipe_runs_through_kfp_local(tmp_path, recipe_run):
    overrides = recipe_run.overrides
    # The two reward models hang off GAtt and data prep, not off each other: parallel on a cluster.
    tasks = compile_docs(tmp_path, overrides)[1][0]["root"]["dag"]["tasks"]
    for kind, other in (("helpfulness", "safety"), ("safety", "helpfulness")):
        assert sorted(tasks[f"reward-{kind}"]["dependentTasks"]) == ["data-prep", "gatt", FIRST]
        assert f"reward-{other}" not in tasks[f"reward-{kind}"]["dependentTasks"]
    assert {"reward-helpfulness", "reward-safety"} <= set(tasks["rejection-sampling"]["dependentTasks"])

    assert recipe_run.rc == 0, recipe_run.err
    out = recipe_run.out
    root = recipe_run.run_dir
    for name in (*MODELS, "reward_helpfulness", "reward_safety", "safety_eval"):
        assert f"  {name}: {os.path.join(root, name)}\n" in out and f"  {root}/{name}/report.md\n" in out, name

    def report(stage: str) -> dict:
        return storage.read_json(os.path.join(root, stage, "report.json"))

    reports = {name: report(name) for name in (*MODELS, "reward_helpfulness", "reward_safety", "safety_eval")}
    assert all(r["status"] == "completed" for r in reports.values()), {n: r["status"] for n, r in reports.items()}
    # The run form's override reached PPO at run time; nothing compiled in said 0.0234.
    assert reports["ppo"]["beta"] == FORM_BETA and run.resolve(overrides).ppo.beta != FORM_BETA

    # SFT (issue 10): held-out loss at the start and at the end.
    assert {"heldout_loss_start", "heldout_loss_end"} <= set(reports["sft"])
    assert all(isinstance(reports["sft"][k], float) for k in ("heldout_loss_start", "heldout_loss_end"))
    # GAtt (issue 10): adherence before and after, each a map from turn to a rate; None past the world's longest
    # held-out dialog (data.world.max_turns).
    for key in ("adherence_before", "adherence_after"):
        rates = reports["gatt"][key]
        assert sorted(rates, key=int) == TURNS, (key, rates)
        assert all((r is None) == (int(t) > int(SMALL["data.world.max_turns"])) for t, r in rates.items()), rates
        assert all(0.0 <= r <= 1.0 for r in rates.values() if r is not None), (key, rates)
    # Both reward models (issue 11): accuracy, the per-rating table, and the safety RM's unsafe recall.
    for kind in ("helpfulness", "safety"):
        rm = reports[f"reward_{kind}"]
        assert rm["kind"] == kind and 0.0 <= rm["accuracy"] <= 1.0
        by_rating = rm["accuracy_by_rating"]  # a rate, or None where the bucket has no held-out pair
        assert set(by_rating) == set(RATINGS) and all(a is None or 0.0 <= a <= 1.0 for a in by_rating.values())
    assert "unsafe_recall_at_0_5" in reports["reward_safety"]

    # Lineage: each model stage started from the one before it.
    def started_from(stage: str, parent: str) -> bool:
        return reports[stage]["lineage"]["parent"].startswith(os.path.join(root, parent))

    assert started_from("sft", "pretrain") and started_from("gatt", "sft")
    assert started_from("reward_helpfulness", "gatt") and started_from("reward_safety", "gatt")
    assert started_from("rejection_sampling", "gatt") and started_from("ppo", "rejection_sampling")

    # Safety eval: the newest model gated, every trained model of the run side by side, and the run's page.
    ev = reports["safety_eval"]
    assert ev["model"] == "ppo" and ev["models"] == {m: os.path.join(root, m) for m in MODELS}
    assert {"truthfulqa.mc1", "toxicity.toxic_pct", "bias.sentiment_mean"} <= set(ev["scores"])
    assert all(set(by_model) == set(MODELS) for by_model in ev["scores"].values()), ev["scores"]
    page = os.path.join(root, "report.html")
    assert ev["run_page"] == page and f"  {page}\n" in out
    text = storage.read_text(page)
    for stage in ("data_prep", *MODELS, "reward_helpfulness", "reward_safety", "safety_eval"):
        assert f"{stage} (completed)" in text, stage
