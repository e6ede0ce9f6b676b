"""Writing model cards (core/io/card.py builds them): after a stage's report.json, the card of its hf/ export; after
a safety eval, the cards of the models it scored; and `kubellama export-hf`'s card, from whatever the source records.

Beside README.md goes card.json: the card's inputs that kubellama.json and report.json do not hold (the license, the
data sources, the safety eval's scores of these weights), so a later writer rebuilds the card instead of patching it.
"""
from __future__ import annotations

import posixpath
import re
from typing import Any

from kubellama.components.core.io import storage
from kubellama.components.core.io.card import CARD, FACTS, project_license, text

# The lineage file save_hf writes beside the weights (core/model/hf.py imports it from here).
LINEAGE = "kubellama.json"
_STEP = re.compile(r"^step_0*(\d+)$")


def _read(url: str) -> Any:
    return storage.read_json(url) if storage.exists(url) else None


def output_of(url: str) -> str:
    """The stage output a weights URL belongs to: …/ppo/hf, …/sft/checkpoints/step_0000034 -> …/ppo, …/sft."""
    parts = url.rstrip("/").split("/")
    while len(parts) > 1 and (parts[-1] in ("hf", "checkpoints") or _STEP.match(parts[-1])):
        parts.pop()
    return "/".join(parts)


def same_weights(report: dict[str, Any] | None, lineage: dict[str, Any] | None) -> bool:
    """Does `report` describe the weights of `lineage` (same config, same step)?"""
    got = (report or {}).get("lineage") or {}
    return bool(lineage) and all(got.get(k) == (lineage or {}).get(k) for k in ("config_hash", "data_hash", "step"))


def license_facts(cfg: Any, inherited: dict[str, Any] | None = None) -> dict[str, str]:
    """The weights' license: `run.license` when set, else what the source's card said, else the project's."""
    given = str(getattr(cfg.run, "license", "") or "")
    if given:
        return {"license": given, "license_from": "run.license"}
    if inherited and inherited.get("license"):
        return {"license": inherited["license"], "license_from": inherited.get("license_from") or "its source"}
    return {"license": project_license(), "license_from": "the project's license; run.license is empty"}


def data_facts(url: str, licenses: dict[str, str]) -> dict[str, Any]:
    """The data prep output a stage read: its report's named sources, each with its license from `licenses`."""
    report_url = storage.join(url, "report.json")
    rep = _read(report_url) or {}
    sources = [{"name": s.get("name"), "set": "pretrain", "path": s.get("path")} for s in rep.get("sources") or []]
    sources += [{"name": name, "set": "sft", "path": None} for name in (rep.get("sft") or {}).get("sources") or {}]
    for s in sources:
        s["license"] = licenses.get(str(s["name"]))
    return {"url": url, "report": report_url if rep else None, "sources": sources, "world": bool(rep.get("world"))}


def stage_facts(cfg: Any, stage: str, step: str) -> dict[str, Any]:
    """What the config says about a stage's weights: the step, the license, the data it read."""
    licenses = {str(k): str(v) for k, v in (getattr(cfg.run, "data_licenses", None) or {}).items()}
    data = str(getattr(cfg[stage], "data", "") or "")
    return {"stage": step, **license_facts(cfg), "data": data_facts(data, licenses) if data else None}


def write(hf: str, report: dict[str, Any] | None, facts: dict[str, Any]) -> str:
    """Write `<hf>/README.md` and `<hf>/card.json` from the folder's lineage and config.json, `report` and
    `facts`; returns the card's URL."""
    lineage = _read(storage.join(hf, LINEAGE)) or {}
    parent = lineage.get("parent")
    parent_card = storage.join(output_of(parent), "hf", CARD) if parent else None
    facts = {**facts, "parent_card": parent_card if parent_card and storage.exists(parent_card) else None,
             "report": (report or {}).get("report_json")}
    storage.write_json(storage.join(hf, FACTS), facts)
    url = storage.join(hf, CARD)
    storage.write_text(url, text(lineage, report, facts, _read(storage.join(hf, "config.json"))))
    return url


def _kept_eval(hf: str, lineage: dict[str, Any] | None) -> dict[str, Any]:
    """The safety eval an earlier card of `hf` holds, while it scored these very weights."""
    ev = (_read(storage.join(hf, FACTS)) or {}).get("safety_eval")
    return {"safety_eval": ev} if ev and lineage and ev.get("lineage") == lineage else {}


def after_stage(cfg: Any, stage: str, step: str) -> list[str]:
    """Once a stage's report.json is written: the card of its hf/ export, and, for an evaluation (a report with
    `models` and `scores`: the safety eval), the refreshed cards of the models it scored. Returns the cards."""
    report = _read(storage.join(cfg[stage].output, "report.json"))
    if not isinstance(report, dict):
        return []
    cards = []
    hf = report.get("hf")
    if hf and storage.exists(storage.join(hf, "config.json")):
        facts = {**stage_facts(cfg, stage, step), **_kept_eval(hf, _read(storage.join(hf, LINEAGE)))}
        cards.append(write(hf, report, facts))
    if isinstance(report.get("models"), dict) and isinstance(report.get("scores"), dict):
        cards += refresh_evaluated(report)
    return cards


def _hf_of(url: str) -> str | None:
    """The kubellama export an evaluated model URL names (the folder itself or a stage output's hf/), if carded."""
    for c in (url, storage.join(url, "hf")):
        if storage.exists(storage.join(c, FACTS)):
            return c
    return None


def evaluation(report: dict[str, Any], label: str, lineage: dict[str, Any] | None) -> dict[str, Any]:
    """What a card states of a safety eval report about its model `label`: copied, not computed."""
    gate = report.get("gate") or {}
    return {"report": report.get("report_json"), "run_id": report.get("run_id"), "model": label,
            "lineage": lineage, "decoding": report.get("decoding"), "toxicity_scorer": report.get("toxicity_scorer"),
            "scores": {k: per[label] for k, per in report["scores"].items() if isinstance(per, dict) and label in per},
            "gated": label == report.get("model"), "gate": gate if label == report.get("model") else None,
            "gate_rules_pass": (report.get("gate_by_model") or {}).get(label),
            "world": (report.get("world") or {}).get(label)}


def refresh_evaluated(report: dict[str, Any]) -> list[str]:
    """Rewrite the card of each model a safety eval report scored (its own exports only: a folder without a card
    came from elsewhere and is left alone)."""
    cards = []
    for label, url in report["models"].items():
        hf = _hf_of(str(url))
        if hf is None:
            continue
        facts = storage.read_json(storage.join(hf, FACTS))
        lineage = _read(storage.join(hf, LINEAGE))
        stage_report = _read(facts["report"]) if facts.get("report") else None
        facts["safety_eval"] = evaluation(report, label, lineage)
        cards.append(write(hf, stage_report, facts))
    return cards


def for_export(source: str | None, cfg: Any, origin: str) -> tuple[dict | None, dict | None, dict[str, Any]]:
    """(lineage, report, facts) of `kubellama export-hf`'s card. `source`: the HF folder or the resolved training
    checkpoint (a step folder) converted, None for fresh weights. Only what the source records is carried: its
    lineage, its stage's report while that describes these weights, its card's license, data and safety eval."""
    if source is None:
        return None, None, {"stage": None, **license_facts(cfg), "data": None, "origin": origin}
    out = output_of(source)
    own = _read(storage.join(source, FACTS))
    old = own or _read(storage.join(out, "hf", FACTS)) or {}
    report = _read(old["report"]) if old.get("report") else _read(storage.join(out, "report.json"))
    lineage = _read(storage.join(source, LINEAGE))
    m = _STEP.match(posixpath.basename(source.rstrip("/")))
    if lineage is None and m and report and (report.get("lineage") or {}).get("step") == int(m.group(1)):
        lineage = report["lineage"]  # a step folder: the stage's report speaks for it only at its final step
    if not same_weights(report, lineage):
        report = None
    facts = {"stage": old.get("stage"), **license_facts(cfg, old), "data": old.get("data"), "origin": origin}
    if own and own.get("safety_eval"):
        facts["safety_eval"] = own["safety_eval"]
    return lineage, report, facts
