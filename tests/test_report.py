"""The one report writer: self-contained HTML with embedded PNG plots, Markdown without image links, JSON with
status and lineage; locally and on S3; and the HTML artifact a KFP run hands the UI."""
from __future__ import annotations

import base64
import io
import json
import os
import re
from types import SimpleNamespace

import pytest

from kubellama.components.core.io import storage
from kubellama.components.core.io.report import (
    PNG_SIGNATURE,
    WORLD_TITLE,
    Section,
    Table,
    html_page,
    promised_sections,
    write_report,
)
from kubellama.components.core.kfp.publish import publish

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
LINEAGE = {"config_hash": "c0ffee12", "data_hash": "da7a5eed", "parent": None}


def training_summary() -> dict:
    records = [{"step": s, "loss": 6.0 / s, "tokens_per_s": 1000.0 + s, "mfu": None, "peak_mem_gib": 0.5}
               for s in range(1, 6)]
    return {"status": "completed", "step": 5, "start_step": 0, "checkpoint": "ckpt/step_0000005",
            "metrics": "metrics.jsonl", "records": records, "final_loss": records[-1]["loss"], "lineage": LINEAGE}


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m, validate=True) for m in DATA_URI.findall(page)]


def assert_self_contained(page: str) -> None:
    """Nothing in the page loads from elsewhere: every src is a data URI, no stylesheet or script links."""
    srcs = re.findall(r'\bsrc\s*=\s*"([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<(script|link|iframe)\b|\bhref\s*=|url\(|@import", page)


def read_png(png: bytes):
    import matplotlib.image

    assert png.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(png), format="png")


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/runs/pretrain"
    return str(tmp_path / "pretrain")


def test_training_report_embeds_the_loss_plot(output):
    paths = write_report(output, "Pretraining", training_summary())
    assert paths == {"json": storage.join(output, "report.json"), "md": storage.join(output, "report.md"),
                     "html": storage.join(output, "report.html"), "loss.png": storage.join(output, "loss.png")}

    page = storage.read_text(paths["html"])
    assert_self_contained(page)
    (png,) = embedded_pngs(page)
    assert png == storage.read_bytes(paths["loss.png"])  # the file beside it is the same plot
    image = read_png(png)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert len({tuple(px) for px in image.reshape(-1, image.shape[-1])[::7]}) > 2  # drawn on, not blank
    assert "<td>final loss</td><td>1.2000</td>" in page and "c0ffee12" in page

    md = storage.read_text(paths["md"])
    assert "![" not in md and "](" not in md and "<img" not in md
    assert "report.html" in md and "| final loss | 1.2000 |" in md
    assert "| config hash | `c0ffee12` |" in md and "| parent checkpoint | none |" in md

    body = storage.read_json(paths["json"])
    assert body["status"] == "completed" and body["lineage"] == LINEAGE
    assert "records" not in body and body["final_loss"] == pytest.approx(1.2)
    assert body["report_html"] == paths["html"] and body["plots"] == {"loss": paths["loss.png"]}


def test_status_always_present_and_text_escaped(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [1, 2])
    hostile = "<script>alert(1)</script> a|b `x<y`"
    paths = write_report(str(tmp_path), "Eval <&>", {"score": 0.5, "note": hostile},
                         sections=[Section("Cases", text=hostile, tables=[Table(["in", "out"], [[hostile, 1]])],
                                           items=[hostile])],
                         plots={"bars": fig})
    page = (tmp_path / "report.html").read_text()
    assert_self_contained(page)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<code>x&lt;y</code>" in page
    assert "<title>Eval &lt;&amp;&gt;</title>" in page
    (png,) = embedded_pngs(page)
    assert read_png(png).ndim == 3 and (tmp_path / "bars.png").read_bytes() == png
    md = (tmp_path / "report.md").read_text()
    assert "a\\|b" in md and "| status | completed |" in md  # a pipe in a cell must not split it
    body = json.loads((tmp_path / "report.json").read_text())
    assert body["status"] == "completed" and body["note"] == hostile and "lineage" not in body
    assert paths["bars.png"] == str(tmp_path / "bars.png")

    # A preempted run without records: its status, no plot, and no claim of a plot in the Markdown.
    write_report(str(tmp_path / "p"), "Pretraining", {"status": "preempted", "step": 2, "records": []})
    assert json.loads((tmp_path / "p" / "report.json").read_text())["status"] == "preempted"
    assert "<img" not in (tmp_path / "p" / "report.html").read_text()
    assert "report.html" not in (tmp_path / "p" / "report.md").read_text()
    with pytest.raises(ValueError, match="not a PNG"):
        write_report(str(tmp_path / "q"), "x", {}, plots={"loss": b"GIF89a"})
    with pytest.raises(ValueError, match="names a file"):
        write_report(str(tmp_path / "q"), "x", {}, plots={"../loss": png})


def test_each_section_has_the_id_its_report_promises(tmp_path):
    """promised_sections names the ids a stage's page carries (what the browser test checks); any other section gets
    `section-<its title>`, unique in the page."""
    world = {"accuracy": {"before": {"value": 0.0, "ci": [0.0, 0.1]}, "after": {"value": 0.5, "ci": [0.3, 0.7]},
                          "n": 20}}
    paths = write_report(str(tmp_path), "SFT", {**training_summary(), "world": world},
                         sections=[Section("Held-out loss"), Section("Held-out loss"), Section("World")])
    page = storage.read_text(paths["html"])
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert ids == ["summary", "lineage", "section-held-out-loss", "section-held-out-loss-2", "section-world", "world",
                   "plots"]
    assert promised_sections(storage.read_json(paths["json"])) == ["summary", "lineage", "world", "plots"]
    # Safety eval's world (model -> metric -> figure), under the world's title, is promised and gets the same id;
    # data prep's `world` (its counts) promises nothing, nor does a report without plots.
    by_model = {"sft": {"accuracy": {"value": 0.4, "ci": [0.3, 0.5], "n": 10}}}
    assert promised_sections({"world": by_model, "lineage": {}}) == ["summary", "lineage", "world"]
    assert promised_sections({"world": {"counts": {"sft": 3}, "eval": "/d/world/eval"}, "plots": {}}) == ["summary"]
    assert re.findall(r'<section id="([^"]+)"', html_page("x", [], [Section(WORLD_TITLE)])) == ["summary", "world"]


def test_publish_hands_the_html_report_to_kfp(output, tmp_path):
    write_report(output, "Pretraining", training_summary())
    outs = {n: SimpleNamespace(path=str(tmp_path / n), metadata={}) for n in ("model", "report", "html")}
    metrics = SimpleNamespace(log_metric=lambda name, value: None)
    summary = {**storage.read_json(storage.join(output, "report.json")), "url": output}
    publish(summary, output, outs["model"], metrics, outs["report"], outs["html"])
    assert (tmp_path / "html").read_text() == storage.read_text(storage.join(output, "report.html"))
    assert outs["model"].metadata["report_html"] == storage.join(output, "report.html")

    # A stage that wrote no report.html: the summary, escaped, as a page.
    bare = str(tmp_path / "bare")
    publish({"step": 1, "name": "<b>"}, bare, outs["model"], metrics, outs["report"], outs["html"])
    page = (tmp_path / "html").read_text()
    assert "<td>step</td><td>1</td>" in page and "&lt;b&gt;" in page and "<b>" not in page
    assert "<td>status</td><td>completed</td>" in page


def test_kfp_pretrain_task_html_artifact_holds_the_loss_plot(tmp_path):
    """Done-when of issue 8: the pretraining step's HTML artifact in a kfp.local run embeds the loss plot."""
    from test_pipeline_local import TINY, corpus, executor_output

    from kubellama.pipelines import run

    root = str(tmp_path / "run")
    src = corpus(str(tmp_path / "corpus.jsonl"), docs=80)
    assert run.run_main([f"run.root={root}", f"data.sources=[{{name:t,path:'{src}'}}]", *TINY,
                         "pretrain.max_steps=2", "run.id=h"]) == 0
    kfp_root = os.path.join(root, "kfp")
    (art,) = executor_output(kfp_root, "pretrain")["artifacts"]["html"]["artifacts"]
    with open(art["uri"]) as f:
        page = f.read()
    assert_self_contained(page)
    (png,) = embedded_pngs(page)
    read_png(png)
    assert png == storage.read_bytes(os.path.join(root, "h", "pretrain", "loss.png"))
    with open(os.path.join(root, "h", "pretrain", "report.md")) as f:
        assert "](" not in f.read()

    # Data prep has no plot, but its tables reach the UI as HTML too.
    (art,) = executor_output(kfp_root, "data-prep")["artifacts"]["html"]["artifacts"]
    with open(art["uri"]) as f:
        page = f.read()
    assert "<h2>Tokenizer</h2>" in page and "<img" not in page
