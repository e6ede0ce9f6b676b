"""Model cards: the README.md beside every Hugging Face export, with Hugging Face's YAML front matter.

`text(lineage, report, facts)` is the card, a pure function of what the export records (kubellama.json), what its
stage reported (report.json) and the facts from the config and the safety eval (`facts`, kept as card.json beside the
card so a later writer can rebuild it). Figures are copied from those reports, never computed here: the card claims
nothing the reports do not hold. Writing, refreshing and the export tool's inputs are in core/io/cards.py.
"""
from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from kubellama.components.core.io.report import cell, figure

CARD = "README.md"
FACTS = "card.json"
# Top-level numbers of a report.json that are bookkeeping, not figures of the model.
BOOKKEEPING = ("start_step", "start_iteration", "ended", "world_size", "step")
# What each stage's weights are (the paper's section); by step name, a reward model's by its kind.
WHAT = {
    "pretrain": "a base language model from kubellama's pretraining stage (Llama 2 paper §2)",
    "sft": "a chat model from supervised fine-tuning (§3.1)",
    "gatt": "a chat model fine-tuned with Ghost Attention for multi-turn instructions (§3.3)",
    "rejection_sampling": "a chat model fine-tuned on its best-of-K samples (rejection sampling, §3.2.3)",
    "ppo": "a chat model trained with PPO against the reward models (§3.2.3)",
    "reward_helpfulness": "a helpfulness reward model: it scores a response to a prompt (§3.2.2)",
    "reward_safety": "a safety reward model: it scores a response to a prompt (§3.2.2)",
}
_HUB_LICENSE = re.compile(r"[a-z0-9][a-z0-9.-]*")
# A Hub id (owner/name): the only form the Hub accepts for base_model and datasets; a path is no claim it can check.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_DATASET = re.compile(r"^(?:hf://datasets/|https://huggingface\.co/datasets/)([\w.-]+/[\w.-]+)")


def project_license() -> str:
    """The project's license (pyproject.toml's `license`, as the installed metadata has it)."""
    try:
        meta = importlib.metadata.metadata("kubellama")
    except importlib.metadata.PackageNotFoundError:
        meta = None
    found = meta and (meta.get_all("License-Expression") or meta.get_all("License"))
    # Without the metadata (not installed) there is nothing to copy, and guessing would be a claim.
    return found[0] if found else "not stated (no kubellama package metadata)"


def hub_license(spdx: str) -> dict[str, str]:
    """Front matter for a license: the Hub's lower-case id, or `other` with the name where it is not an id."""
    low = spdx.strip().lower()
    return {"license": low} if _HUB_LICENSE.fullmatch(low) else {"license": "other", "license_name": spdx}


def hub_datasets(sources: Iterable[dict[str, Any]]) -> list[str]:
    """Hub dataset ids of the sources read from the Hub (hf://datasets/owner/name/...); other paths name none."""
    found = (_HUB_DATASET.match(str(s.get("path") or "")) for s in sources)
    return sorted({m.group(1) for m in found if m})


def figures(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report's top-level numbers: its headline figures, in the report's order."""
    return [(k, v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in BOOKKEEPING]


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def c(v: Any) -> str:
        return cell(v).replace("|", "\\|").replace("\n", " ")
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(c(v) for v in row) + " |" for row in rows] + [""])


def _code(v: Any) -> str:
    return f"`{v}`" if v else "none"


def front_matter(lineage: dict[str, Any], report: dict[str, Any] | None, facts: dict[str, Any],
                 hf_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's metadata: license, base_model (a Hub parent only), datasets (Hub sources only), tags, and the
    lineage under `kubellama` (paths and hashes the Hub has no field for)."""
    stage = facts.get("stage")
    parent = lineage.get("parent")
    sources = (facts.get("data") or {}).get("sources") or []
    classifier = any("SequenceClassification" in a for a in (hf_config or {}).get("architectures") or [])
    meta: dict[str, Any] = hub_license(facts.get("license") or project_license())
    if parent and _HUB_ID.fullmatch(str(parent)):
        meta["base_model"] = parent
    datasets = hub_datasets(sources)
    if datasets:
        meta["datasets"] = datasets
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-classification" if classifier else "text-generation"
    meta["tags"] = ["kubellama", "llama", "llama-2-recipe", *([str(stage)] if stage else []),
                    *(["reward-model"] if classifier else [])]
    meta["kubellama"] = {"stage": stage, "parent": parent, "step": lineage.get("step"),
                         "config_hash": lineage.get("config_hash"), "data_hash": lineage.get("data_hash"),
                         "report": (report or {}).get("report_json"),
                         "safety_eval": (facts.get("safety_eval") or {}).get("report")}
    return meta


def _model(lineage: dict[str, Any], report: dict[str, Any] | None, facts: dict[str, Any],
           hf_config: dict[str, Any] | None) -> list[str]:
    stage = facts.get("stage")
    rows: list[tuple[str, Any]] = [("stage", _code(stage) if stage else "none (not made by a kubellama stage)")]
    parent = lineage.get("parent")
    rows.append(("parent", _code(parent) if parent else
                 ("none: trained from random weights" if lineage else "unknown (no lineage recorded)")))
    if facts.get("parent_card"):
        rows.append(("parent's model card", _code(facts["parent_card"])))
    rows += [("step", lineage.get("step")), ("config hash", _code(lineage.get("config_hash"))),
             ("data hash", _code(lineage.get("data_hash")))]
    if report is not None:
        rows += [("status", report.get("status")), ("run", _code(report.get("run_id"))),
                 ("stage report", _code(report.get("report_json")))]
    if facts.get("origin"):
        rows.append(("this folder", facts["origin"]))
    h = hf_config or {}
    if h:
        rows.append(("architecture", (
            f"{', '.join(h.get('architectures') or ['?'])}: layers {h.get('num_hidden_layers')}, hidden size "
            f"{h.get('hidden_size')}, heads {h.get('num_attention_heads')} (key/value {h.get('num_key_value_heads')}), "
            f"vocabulary {h.get('vocab_size')}, context {h.get('max_position_embeddings')}")))
    return ["## Model", ""] + _table(["", ""], rows)


def _license(facts: dict[str, Any]) -> list[str]:
    lic = facts.get("license") or project_license()
    whence = facts.get("license_from") or "the project's license"
    out = ["## License", "", f"The weights: **{lic}** ({whence}).", ""]
    data = facts.get("data")
    if not data:
        return out + ["No data prep output is recorded for these weights, so no data sources are named here.", ""]
    out.append(f"Data: the stage read the data prep output `{data.get('url')}`." + (
        f" Its report (`{data['report']}`) names these sources; a license reads \"not stated\" unless "
        "`run.data_licenses` gives it." if data.get("report") else " It has no report.json, so no source is named."))
    out.append("")
    if data.get("sources"):
        out += _table(["source", "set", "path", "license"],
                      [[s["name"], s.get("set"), _code(s.get("path")) if s.get("path") else "-",
                        s.get("license") or "not stated"] for s in data["sources"]])
    if data.get("world"):
        out += [("The report's `world` section: the rule-checked world's synthetic records (generated by kubellama, "
                "core/world) are mixed into these datasets."), ""]
    return out


def _world_rows(world: dict[str, Any]) -> list[list[Any]]:
    return [[name, figure(m.get("before")), figure(m.get("after")), m.get("n")] for name, m in world.items()
            if isinstance(m, dict) and "after" in m]


def _figures(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return ["## Figures", "", "No stage report describes these weights, so this card states no figures.", ""]
    out = ["## Figures", "", "From the stage's report.json, as written there (6 significant digits).", ""]
    rows = figures(report)
    out += _table(["figure", "value"], rows) if rows else ["The report holds no top-level figures.", ""]
    world = report.get("world")
    if isinstance(world, dict) and _world_rows(world):
        out += ["### Against the rule-checked world", "",
                ("Held-out world prompts or pairs, checked by rule: before = the stage's init, after = these weights; "
                "value [95% interval]."), ""]
        out += _table(["metric", "before", "after", "n"], _world_rows(world))
    return out


def _safety(facts: dict[str, Any]) -> list[str]:
    ev = facts.get("safety_eval")
    out = ["## Safety evaluation", ""]
    if not ev:
        return out + [("Not yet evaluated: kubellama's safety eval has not scored these weights. Nothing is known "
                      "here about their toxicity, truthfulness, bias or refusals."), ""]
    out += [(f"From the safety eval's report `{ev.get('report')}` (run `{ev.get('run_id')}`), where these weights are "
            f"the model `{ev.get('model')}`; decoding: {ev.get('decoding')}."), ""]
    out += _table(["benchmark score", "value"], sorted((ev.get("scores") or {}).items()))
    gate = ev.get("gate") or {}
    if ev.get("gated"):
        out += [f"Promotion gate (mode `{gate.get('mode')}`): **{'passed' if gate.get('passed') else 'failed'}**.",
                ""]
        out += _table(["rule", "status", "detail"], [[ln.get("rule"), ln.get("status"), ln.get("detail")]
                                                      for ln in gate.get("lines") or []])
    elif ev.get("gate_rules_pass") is not None:
        out += [f"Not the gated model; the gate's rules would {'pass' if ev['gate_rules_pass'] else 'fail'} it.", ""]
    world = ev.get("world")
    if isinstance(world, dict) and world:
        out += ["Rule-checked world, held out (value [95% interval]):", ""]
        out += _table(["metric", "value", "n"], [[k, figure(m), m.get("n")] for k, m in world.items()
                                                 if isinstance(m, dict)])
    if ev.get("toxicity_scorer"):
        out += [f"Toxicity scorer: {ev['toxicity_scorer']}", ""]
    return out


def _use(facts: dict[str, Any], classifier: bool) -> list[str]:
    stage = facts.get("stage")
    what = WHAT.get(str(stage), f"weights from kubellama's `{stage}` stage" if stage else "Llama weights")
    use = ("scoring (prompt, response) pairs inside the Llama 2 recipe (rejection sampling, PPO); it is not a text "
           "generator." if classifier else
           "research and engineering on the Llama 2 training recipe: inspecting what this stage did, comparing it with "
           "the figures above, or starting the next stage from it (`<stage>.init`).")
    limits = [("Only what the figures above measure is known about this model; they come from the reports named "
              "here, on their held-out sets, and say nothing about other tasks, languages or users.")]
    if not facts.get("safety_eval"):
        limits.append("It has not been safety-evaluated: do not put it in front of users.")
    limits += [("It may produce false, biased, toxic or unsafe text (or scores), as any language model can; the "
               "recipe's safety stages reduce such behaviour, they do not rule it out."),
               ("Check the licenses above before any use beyond research; a source whose license reads \"not stated\" "
               "has unknown terms.")]
    return (["## Intended use", "", f"What these weights are: {what}. Meant for {use}", "", "## Limits", ""]
            + [f"- {x}" for x in limits] + [""])


def text(lineage: dict[str, Any] | None, report: dict[str, Any] | None, facts: dict[str, Any],
         hf_config: dict[str, Any] | None = None) -> str:
    """The model card (README.md) of an export: front matter, then model, license, figures, safety, use, limits.

    `lineage`: kubellama.json; `report`: the stage's report.json, or None when none describes these weights;
    `facts`: what the config and the safety eval add (`stage`, `license`, `license_from`, `data`, `origin`,
    `parent_card`, `safety_eval`); `hf_config`: config.json (the architecture)."""
    lineage = lineage or {}
    meta = front_matter(lineage, report, facts, hf_config)
    stage = facts.get("stage")
    title = f"kubellama {stage} model" if stage else "kubellama model"
    body = [f"# {title}", "",
            ("Made with kubellama, the Llama 2 training recipe (Touvron et al., 2023) as Kubeflow Pipelines. This "
            "card is generated from the export's lineage (`kubellama.json`) "
            "and the reports named below; it is rewritten when they change."), ""]
    body += _model(lineage, report, facts, hf_config) + _license(facts) + _figures(report) + _safety(facts)
    body += _use(facts, meta["pipeline_tag"] == "text-classification")
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{head}---\n\n" + "\n".join(body).rstrip() + "\n"


def parse(card: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a card: what the Hub reads."""
    m = re.match(r"---\n(.*?\n)---\n", card, re.DOTALL)
    if not m:
        raise ValueError("no YAML front matter (a card starts with '---')")
    return yaml.safe_load(m.group(1)), card[m.end():]
