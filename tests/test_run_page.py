"""The run's page for a person, built from small fake stage reports: the verdict first (gate and its failed lines,
final model, stages, cost), the table of what each stage did, a card per stage with its figures beside the paper's and
its key plot, and lineage, paths and raw figures collapsed; one file that loads nothing."""
from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from kubellama.components.core.io.report import PNG_SIGNATURE
from kubellama.components.core.recipe.config import load_config
from kubellama.components.safety_eval import run_page

VOID = {"img", "meta", "br", "hr", "input", "link", "source"}


def png(width: int = 120, height: int = 80, grey: int = 128) -> bytes:
    """A real, decodable greyscale PNG (no plotting library needed)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes([grey]) * width for _ in range(height))
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


class Page(HTMLParser):
    """Every element (tag, attrs, the tags and ids it sits in) and every piece of text with its ancestors."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict[str, str | None]]] = []
        self.elements: list[tuple[str, dict[str, str | None], list[tuple[str, dict[str, str | None]]]]] = []
        self.texts: list[tuple[str, list[tuple[str, dict[str, str | None]]]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs), list(self.stack)))
        if tag not in VOID:
            self.stack.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.texts.append((data, list(self.stack)))

    def ids(self) -> list[str]:
        return [str(a["id"]) for _, a, _ in self.elements if a.get("id")]

    def text(self, inside: str | None = None, outside_tag: str | None = None) -> str:
        """The page's text, only what sits in the element with id `inside`, or only what is not in a `outside_tag`."""
        return " ".join(t for t, anc in self.texts
                        if (inside is None or any(a.get("id") == inside for _, a in anc))
                        and (outside_tag is None or all(tag != outside_tag for tag, _ in anc)))


def fig(value: float, lo: float, hi: float) -> dict[str, Any]:
    return {"value": value, "ci": [lo, hi]}


def fake_run(tmp_path: Path, *, gate: str | None = "fail") -> tuple[Any, Path]:
    """A run of data prep, pretrain, SFT and (unless gate is None) a safety eval whose gate fails or passes."""
    data, run = tmp_path / "data", tmp_path / "runs" / "r"

    def stage(folder: Path, rep: dict[str, Any], plots: dict[str, bytes] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, body in (plots or {}).items():
            (folder / f"{name}.png").write_bytes(body)
        urls = {name: str(folder / f"{name}.png") for name in plots or {}}
        (folder / "report.json").write_text(json.dumps({**rep, "plots": urls, "output": str(folder),
                                                        "report_html": str(folder / "report.html")}))

    # Data prep's maps hold nested maps, so their figures flatten to dotted keys (as a real report's do).
    stage(data, {"status": "completed", "pretrain": {"tokens": 992000, "mix": {"c4": {"docs": 298}}},
                 "tokenizer": {"vocab_size": 2048, "trained_on": {"records": 328}},
                 "lineage": {"config_hash": "d47a0c0f", "data_hash": "d47ad47a", "parent": None}})
    stage(run / "pretrain", {"status": "completed", "step": 40, "final_loss": 6.59, "wall_s": 26.6, "world_size": 1,
                             "hf": str(run / "pretrain" / "hf"),
                             "lineage": {"config_hash": "c0ffee12", "data_hash": "da7a5eed", "parent": None}},
          {"loss": png()})
    stage(run / "sft", {"status": "completed", "epochs": 2, "step": 34, "heldout_loss_end": 6.18, "wall_s": 12.0,
                        "hf": str(run / "sft" / "hf"),
                        "world": {"accuracy": {"before": fig(0.0, 0.0, 0.005), "after": fig(0.376, 0.342, 0.411),
                                               "n": 761},
                                  "false_refusal": {"before": fig(0.0, 0.0, 0.129), "after": fig(0.077, 0.021, 0.241),
                                                    "n": 26}},
                        "lineage": {"config_hash": "5f7c0de1", "data_hash": "b663ec19",
                                    "parent": str(run / "pretrain" / "checkpoints" / "step_0000040")}},
          {"loss": png(grey=10), "heldout": png(grey=200)})
    if gate is not None:
        lines = [{"rule": "toxicity.toxic_pct <= 10 (safety_eval.gate.max_toxic_pct)", "detail": "sft has 12.50%",
                  "status": gate},
                 {"rule": "refusal.refusal_pct >= 90 (safety_eval.gate.min_refusal_pct)", "detail": "sft has 95.00%",
                  "status": "pass"}]
        stage(run / "safety_eval", {
            "status": "completed", "model": "sft", "baseline": "pretrain", "wall_s": 6.3,
            "models": {"pretrain": str(run / "pretrain"), "sft": str(run / "sft")},
            "gate": {"mode": "report", "passed": gate == "pass", "lines": lines},
            "scores": {"toxicity.toxic_pct": {"pretrain": 20.0, "sft": 12.5}},
            "world": {"sft": {"accuracy": fig(0.4, 0.35, 0.45)}}, "gate_by_model": {"sft": gate == "pass"},
            "lineage": {"config_hash": "e7a1e7a1", "data_hash": None, "parent": str(run / "sft")}},
            {"toxicity": png(), "truthfulqa": png()})
    cfg = load_config([f"run.root={tmp_path / 'runs'}", "run.id=r", f"safety_eval.data={data}"])
    return cfg, run


@pytest.fixture(scope="module")
def failed_gate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Page, str, dict[str, Any], Path]:
    cfg, run = fake_run(tmp_path_factory.mktemp("failed"))
    paths = run_page.write(cfg, str(run))
    text = Path(paths["html"]).read_text()
    return Page(text), text, json.loads(Path(paths["json"]).read_text()), run


def test_the_verdict_comes_first_then_the_table_the_cards_and_the_details(failed_gate) -> None:
    page, _, report, _ = failed_gate
    sections = [i for tag, a, _ in page.elements if tag == "section" and (i := a.get("id"))]
    expected = ["verdict", "stages", "stage-data_prep", "stage-pretrain", "stage-sft", "stage-safety_eval", "details"]
    assert sections == expected == report["sections"] == run_page.promised_sections(report)
    assert set(run_page.SECTIONS) <= set(sections) and len(page.ids()) == len(set(page.ids()))
    # Nothing but the title comes before the verdict.
    body = [tag for tag, _, anc in page.elements if anc and anc[-1][0] == "body"]
    assert body[:3] == ["h1", "p", "section"]
    verdict = page.text(inside="verdict")
    assert "sft fails the safety gate: 1 of 2 lines (report mode: not enforced)" in verdict
    assert "toxicity.toxic_pct <= 10 (safety_eval.gate.max_toxic_pct)" in verdict and "sft has 12.50%" in verdict
    assert "refusal.refusal_pct >= 90" not in verdict  # only the failed lines
    assert "4 of 4 completed" in verdict and "GPU-hours" in verdict
    # The final model links to its card; every in-page link lands on an id of the page.
    links = [str(a["href"]) for tag, a, _ in page.elements if tag == "a"]
    assert "#stage-sft" in links and all(h.startswith("#") and h[1:] in page.ids() for h in links)
    assert report["gate"] == {"passed": False, "lines_failed": [[
        "toxicity.toxic_pct <= 10 (safety_eval.gate.max_toxic_pct)", "sft has 12.50%"]]}
    assert report["final_model"] == "sft" and report["status"] == "completed"


def test_what_each_stage_did_gives_world_figures_with_intervals_else_the_stage_headline(failed_gate) -> None:
    _, text, _, _ = failed_gate
    table = text[text.index('<section id="stages">'):text.index("</section>", text.index('<section id="stages">'))]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)][1:]
    assert rows[0][2:] == ["pretraining tokens", "", "992,000", "", ""]
    assert rows[1][2:] == ["training loss", "", "6.59", "", ""]
    # SFT's two world metrics share one stage cell (rowspan); a clear rise is marked, overlapping intervals are not.
    assert 'rowspan="2"' in table and '<a href="#stage-sft">sft</a>' in table
    assert rows[2][2:] == ["accuracy", "0.000 [0.000, 0.005]", "0.376 [0.342, 0.411]", "761", "rose"]
    assert rows[3] == ["false_refusal", "0.000 [0.000, 0.129]", "0.077 [0.021, 0.241]", "26", "within noise"]
    # The safety eval's rows: the gated model on the world, and whether the gate's lines pass it.
    assert '<a href="#stage-safety_eval">safety_eval: sft</a>' in table
    assert rows[4][2:] == ["accuracy", "", "0.400 [0.350, 0.450]", "-", ""] and rows[5] == ["gate", "", "fail", "", ""]


def test_a_card_shows_the_papers_figures_beside_the_run_and_its_key_plot(failed_gate) -> None:
    page, text, _, _ = failed_gate
    sft = text[text.index('<section id="stage-sft"'):text.index('<section id="stage-safety_eval"')]
    card = sft[:sft.index("<details>")]
    # Only figures the paper has a number for; the rest is in the collapsed raw figures.
    assert re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>", card) == [("epochs", "2", "2 (§3.1)")]
    assert "heldout_loss_end" not in card and "<td>heldout_loss_end</td><td>6.18</td>" in sft
    # The key plot (held-out loss for SFT) beside the figures, the other one collapsed.
    imgs = [(a["alt"], anc) for tag, a, anc in page.elements if tag == "img" and str(a["alt"]).startswith("sft:")]
    assert [alt for alt, _ in imgs] == ["sft: heldout", "sft: loss"]
    assert all(t != "details" for t, _ in imgs[0][1]) and any(t == "details" for t, _ in imgs[1][1])
    assert "2T tokens (§2.2)" in page.text(inside="stage-data_prep")
    assert "21.25 pretrained / 0.00 chat" in page.text(inside="stage-safety_eval")
    assert "The paper gives no figure" not in page.text(inside="stage-pretrain")


def test_lineage_paths_and_raw_figures_are_collapsed(failed_gate) -> None:
    page, text, _, run = failed_gate
    assert "<details open" not in text and text.count("<details>") >= 6
    visible = page.text(outside_tag="details")
    for hidden in ("c0ffee12", "da7a5eed", "5f7c0de1", str(run / "sft" / "hf"), str(run / "pretrain" / "report.html")):
        assert hidden in page.text(inside="details") and hidden not in visible, hidden
    assert "final_loss" not in visible and "final_loss" in page.text()
    summaries = [t for t, anc in page.texts if anc and anc[-1][0] == "summary"]
    assert {"Lineage", "Paths", "Cost by stage", "All figures (4)", "More plots (1)"} <= set(summaries)


def test_the_page_is_one_file_that_loads_nothing(failed_gate) -> None:
    page, text, _, _ = failed_gate
    assert not re.search(r"<(script|link|iframe|object|embed)\b|url\(|@import|https?:", text)
    srcs = [str(a.get("src")) for tag, a, _ in page.elements if "src" in a]
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        body = base64.b64decode(s.split(",", 1)[1], validate=True)
        assert body.startswith(PNG_SIGNATURE) and struct.unpack(">II", body[16:24]) == (120, 80)
    assert all(str(a["href"]).startswith("#") for tag, a, _ in page.elements if "href" in a)


def test_a_passed_gate_and_a_run_without_safety_eval(tmp_path) -> None:
    cfg, run = fake_run(tmp_path / "pass", gate="pass")
    page = Page(Path(run_page.write(cfg, str(run))["html"]).read_text())
    assert "sft passes the safety gate" in page.text(inside="verdict") and "2 of 2 lines pass" in page.text()
    assert 'class="verdict ok"' in (Path(run) / "report.html").read_text()

    cfg, run = fake_run(tmp_path / "none", gate=None)
    paths = run_page.write(cfg, str(run))
    page = Page(Path(paths["html"]).read_text())
    verdict = page.text(inside="verdict")
    assert "Not gated: no safety eval in this run" in verdict and "sft" in verdict  # the last stage with weights
    assert run_page.promised_sections(json.loads(Path(paths["json"]).read_text())) == [
        "verdict", "stages", "stage-data_prep", "stage-pretrain", "stage-sft", "details"]
    md = Path(paths["md"]).read_text()
    assert md.index("## Verdict") < md.index("## What each stage did") < md.index("## pretrain (completed)")
