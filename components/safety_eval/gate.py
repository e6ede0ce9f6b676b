"""The promotion gate: thresholds from `safety_eval.gate` checked on the evaluated model's scores.

Every line is checked and reported (pass, FAIL, or not evaluated with the reason). In `enforce` mode any failed
line fails the stage, and so the pipeline, with one message naming each failed line and its config key; `report`
mode only reports. A line the model has no figure for is not evaluated, unless its benchmark is in
`safety_eval.gate.require`: a required benchmark that was skipped (no data, not run, no figure) fails. Figures of a
fallback scorer (toxicity by the word list, not a classifier) are reported, not gated.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from kubellama.components.core.errors import ConfigError
from kubellama.components.safety_eval.benchmarks import BENCHMARKS
from kubellama.conf.schema.safety_eval import GateConfig

MODES = ("enforce", "report")


@dataclass
class Line:
    rule: str  # what is checked, with the config key that sets it
    status: str  # pass | fail | skipped
    detail: str  # the values, or why it was not evaluated

    @property
    def text(self) -> str:
        return f"{self.rule}: {self.detail}"


def _value(scores: Mapping[str, Mapping[str, float]], key: str, model: str) -> float | None:
    v = scores.get(key, {}).get(model)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _fmt(v: float, key: str) -> str:
    return f"{v:.2f}%" if key.endswith("_pct") else f"{v:.4f}"


def check(gate: GateConfig, scores: Mapping[str, Mapping[str, float]], model: str, baseline: str | None,
          models: Mapping[str, str], evaluated: set[str], fallback: Collection[str] = ()) -> list[Line]:
    """The gate's lines for `model`. `evaluated`: benchmarks that had data; `fallback`: benchmarks scored by a
    fallback instead of a classifier (toxicity by the lexicon), whose lines are reported, not gated."""
    validate(gate)
    lines: list[Line] = []
    required = set(gate.require)

    def missing(rule: str, key: str, reason: str) -> None:
        bench = key.split(".")[0]
        if bench in required:
            lines.append(Line(rule, "fail", f"not evaluated ({reason}); {bench} is required "
                                            f"(safety_eval.gate.require)"))
        else:
            lines.append(Line(rule, "skipped", f"not evaluated ({reason})"))

    def not_gated(key: str) -> str | None:
        # A word list's % is a floor, not a classifier's figure: gating on it would pass what a classifier fails.
        return "not gated: lexicon fallback" if key.split(".")[0] in fallback else None

    def absolute(key: str, bound: float | None, upper: bool, setting: str) -> None:
        if bound is None:
            return
        rule = f"{key} {'<=' if upper else '>='} {bound:g} (safety_eval.gate.{setting})"
        v = _value(scores, key, model)
        if v is None:
            missing(rule, key, _why(key, evaluated))
            return
        if (why := not_gated(key)) is not None:
            lines.append(Line(rule, "skipped", f"{why} ({model} has {_fmt(v, key)})"))
            return
        ok = v <= bound if upper else v >= bound
        lines.append(Line(rule, "pass" if ok else "fail", f"{model} has {_fmt(v, key)}"))

    def relative(key: str, ref: str | None, slack: float, upper: bool, setting: str, why: str) -> None:
        sign = "+" if upper else "-"
        rule = (f"{key} {'<=' if upper else '>='} {ref or 'reference'}'s {sign} {slack:g} "
                f"(safety_eval.gate.{setting})")
        v = _value(scores, key, model)
        r = _value(scores, key, ref) if ref else None
        if v is None and ref:
            missing(rule, key, _why(key, evaluated))
            return
        if v is None or r is None:
            reason = why if not ref else f"{ref} has no {key}"
            lines.append(Line(rule, "skipped", f"not evaluated ({reason})"))
            return
        if (gone := not_gated(key)) is not None:
            lines.append(Line(rule, "skipped", f"{gone} ({model} has {_fmt(v, key)}, {ref} {_fmt(r, key)})"))
            return
        limit = r + slack if upper else r - slack
        ok = v <= limit if upper else v >= limit
        lines.append(Line(rule, "pass" if ok else "fail", f"{model} has {_fmt(v, key)}, {ref} {_fmt(r, key)}"))

    absolute("toxicity.toxic_pct", gate.max_toxic_pct, True, "max_toxic_pct")
    absolute("refusal.refusal_pct", gate.min_refusal_pct, False, "min_refusal_pct")
    absolute("refusal.false_refusal_pct", gate.max_false_refusal_pct, True, "max_false_refusal_pct")
    absolute("bias.min_group_sentiment", gate.min_group_sentiment, False, "min_group_sentiment")
    other = baseline if baseline and baseline != model else None
    if gate.truthfulness_vs:
        ref = gate.truthfulness_vs if gate.truthfulness_vs in models and gate.truthfulness_vs != model else other
        why = f"no {gate.truthfulness_vs} model in this run and no baseline other than {model}"
        for key in ("truthfulqa.mc2", "truthfulqa.true_info_pct"):
            if key == "truthfulqa.mc2" or _value(scores, key, model) is not None:
                relative(key, ref, gate.truth_margin, False, "truthfulness_vs", why)
    if gate.max_toxic_increase is not None:
        relative("toxicity.toxic_pct", other, gate.max_toxic_increase, True, "max_toxic_increase",
                 f"no baseline other than {model}")
    for bench in gate.require:
        rule = f"{bench} ran (safety_eval.gate.require)"
        if bench not in evaluated:
            lines.append(Line(rule, "fail", f"{bench} was skipped: no data configured for it, or not in "
                                            f"safety_eval.benchmarks"))
        elif not any(_value(scores, k, model) is not None for k in scores if k.split(".")[0] == bench):
            lines.append(Line(rule, "fail", f"{bench} was skipped: it gave {model} no figure"))
        else:
            lines.append(Line(rule, "pass", f"{model} has its figures"))
    return lines


def validate(gate: GateConfig) -> None:
    if gate.mode not in MODES:
        raise ConfigError(f"safety_eval.gate.mode={gate.mode!r}: expected one of {', '.join(MODES)}")
    unknown = [b for b in gate.require if b not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"safety_eval.gate.require: unknown benchmark '{unknown[0]}'; known: "
                          f"{', '.join(BENCHMARKS)}")


def _why(key: str, evaluated: set[str]) -> str:
    bench = key.split(".")[0]
    return "no data for this benchmark" if bench not in evaluated else "the benchmark gave no such figure"


def verdict(lines: list[Line], mode: str, model: str) -> str | None:
    """The error of a failed gate in enforce mode (one line naming every failed line), else None."""
    failed = [ln.text for ln in lines if ln.status == "fail"]
    if not failed or mode != "enforce":
        return None
    return f"safety gate failed for {model}: " + "; ".join(failed)
