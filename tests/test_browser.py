"""The reports as a person sees them: the run's page and every stage's report.html of the session's reduced run
(conftest.py's `recipe_run`), opened in headless Chromium (Debian's `chromium`, which `make browser` installs, driven
by playwright without a browser of its own). For each page: every <img> has loaded with a non-zero natural size,
nothing is logged as an error, nothing is fetched (the page is one self-contained file), it has the sections it
promises, and a screenshot of it lands beside it (`report.png`). Then the same page inside a sandboxed iframe, as
the KFP UI shows an HTML artifact, where its images must load too."""
from __future__ import annotations

import base64
import glob
import html
import io
import json
import os
import shutil
from dataclasses import dataclass, field

import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from kubellama.components.core.io.report import promised_sections as stage_sections
from kubellama.components.safety_eval.run_page import promised_sections as run_sections

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make browser` installs Debian's "
                                                         "(apt-get install chromium), as `make test` does")

# The run's page, then each stage's page (a folder of the run, data prep's under <run.root>/data/).
PAGES = ("run", "data_prep", "pretrain", "sft", "gatt", "reward_helpfulness", "reward_safety", "rejection_sampling",
         "ppo", "safety_eval")
# How the page is put in the iframe: its HTML as `srcdoc`, as the KFP UI's HTML viewer does (so nothing beside the
# file resolves). Two sandboxes: same-origin without scripts (the strictest a viewer would use), and the KFP UI's own
# (scripts without same-origin).
SANDBOXES = ("allow-same-origin", "allow-scripts")
IMAGES = "() => [...document.images].map(i => ({alt: i.alt, done: i.complete, w: i.naturalWidth, h: i.naturalHeight}))"
# Each element with an id that holds something (a section, a card): what a promised section must be.
SECTIONS = "() => [...document.querySelectorAll('[id]')].filter(e => e.textContent.trim()).map(e => e.id)"


@dataclass
class Seen:
    """What Chromium made of a page: its images, the ids of its non-empty elements, and every error, failed or
    outside request."""
    images: list[dict] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def broken_images(images: list[dict]) -> list[str]:
    return [f"<img alt={i['alt']!r}>: not loaded ({i['w']}x{i['h']})" for i in images
            if not (i["done"] and i["w"] > 0 and i["h"] > 0)]


def visit(browser, url: str, screenshot: str | None = None) -> Seen:
    """Open `url` in a fresh page and read it (in its one child frame when it has one: the iframe wrapper)."""
    seen = Seen()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: seen.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: seen.problems.append(f"request failed: {r.url[:100]} ({r.failure})"))
    # A self-contained page fetches nothing but itself: a plot linked beside the file works on a disk, not in KFP.
    page.on("request", lambda r: seen.problems.append(f"fetched {r.url[:100]}")
            if not r.url.startswith(("data:", "about:")) and r.url != url else None)
    try:
        page.goto(url, wait_until="load")
        frame = page.frames[1] if len(page.frames) > 1 else page.main_frame
        seen.images = frame.evaluate(IMAGES)
        seen.sections = frame.evaluate(SECTIONS)
        if screenshot:
            page.screenshot(path=screenshot, full_page=True)
    finally:
        page.close()
    seen.problems += broken_images(seen.images)
    return seen


def framed(page_html: str, sandbox: str, folder: str) -> str:
    """A wrapper page (no script of its own) holding `page_html` in a sandboxed iframe; returns its file:// URL."""
    path = os.path.join(folder, f"framed-{sandbox}.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'<!DOCTYPE html><html><body><iframe sandbox="{sandbox}" style="width:1200px;height:860px" '
                f'srcdoc="{html.escape(page_html, quote=True)}"></iframe></body></html>')
    return f"file://{path}"


def promised(name: str, report: dict) -> list[str]:
    """The element ids a page promises, from its report.json (the writers' own lists)."""
    return (run_sections if name == "run" else stage_sections)(report)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        # Debian's Chromium, not a browser playwright downloads (`playwright install` is never run).
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(recipe_run) -> dict[str, str]:
    """Page name -> report.html of the reduced run."""
    assert recipe_run.rc == 0, recipe_run.err
    found = {"run": os.path.join(recipe_run.run_dir, "report.html")}
    found.update({os.path.basename(os.path.dirname(p)): p
                  for p in glob.glob(os.path.join(recipe_run.run_dir, "*", "report.html"))})
    (data,) = glob.glob(os.path.join(recipe_run.root, "data", "*", "report.html"))
    found["data_prep"] = data
    return found


def report_of(page: str) -> dict:
    with open(os.path.join(os.path.dirname(page), "report.json")) as f:
        return json.load(f)


def test_the_pages_are_the_runs_stages(pages):
    """PAGES (what the tests below open) is every stage of the run: a stage added to the recipe gets checked too."""
    stages = report_of(pages["run"])["stages"]
    assert set(pages) == {"run", *stages} == set(PAGES), (sorted(pages), sorted(stages))


@pytest.mark.parametrize("name", PAGES)
def test_page_in_chromium(browser, pages, name):
    page = pages[name]
    report = report_of(page)
    shot = os.path.join(os.path.dirname(page), "report.png")
    seen = visit(browser, f"file://{page}", screenshot=shot)
    assert seen.problems == [], f"{page}:\n" + "\n".join(seen.problems)
    # Every plot the report lists is on the page (the run's page shows each stage's key plot).
    assert len(seen.images) >= len(report.get("plots") or {}), (page, seen.images)
    if name in ("run", "pretrain", "sft", "ppo"):
        assert seen.images, f"{page}: no plot"
    missing = [s for s in promised(name, report) if s not in seen.sections]
    assert not missing, f"{page}: sections {missing} missing; it has {seen.sections}"
    # The screenshot beside the page is the page, drawn: as wide as the window, and not one flat colour.
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width == 1280 and im.height >= 900, (shot, im.size)
        low, high = im.convert("L").getextrema()
        assert high - low > 100, f"{shot}: blank"


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_pages_in_a_sandboxed_iframe(browser, pages, sandbox, tmp_path):
    failures = []
    for name in PAGES:
        with open(pages[name], encoding="utf-8") as f:
            page_html = f.read()
        seen = visit(browser, framed(page_html, sandbox, str(tmp_path)))
        if not seen.images and name in ("run", "pretrain"):
            seen.problems.append("no <img> in the frame")
        failures += [f"{pages[name]}: {p}" for p in seen.problems]
    assert failures == [], "\n".join(failures)


def test_the_checks_catch_a_broken_page(browser, tmp_path):
    """The same checks on a page with a corrupt plot, a plot linked beside the file, a script error and an empty
    section: each is named (so a pass above means something)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buf, format="PNG")
    good = buf.getvalue()
    (tmp_path / "plot.png").write_bytes(good)
    page = tmp_path / "report.html"
    page.write_text('<!DOCTYPE html><html><body><section id="lineage"></section><section id="plots"><h2>Plots</h2>'
                    f'<img alt="good" src="data:image/png;base64,{base64.b64encode(good).decode()}">'
                    f'<img alt="cut" src="data:image/png;base64,{base64.b64encode(good[:30]).decode()}">'
                    '<img alt="beside" src="plot.png"></section><script>throw new Error("boom")</script></body></html>')
    seen = visit(browser, f"file://{page}")
    assert seen.images[0]["w"] == 4 and [p.split(":")[0] for p in broken_images(seen.images)] == ["<img alt='cut'>"]
    assert any("boom" in p for p in seen.problems) and any(p.startswith("fetched file://") for p in seen.problems)
    # A promised section must hold something: the empty one is not counted.
    assert seen.sections == ["plots"] and "lineage" in promised("sft", {"lineage": {}, "plots": {"loss": "x"}})
    # In the KFP UI's frame the file beside the page is not there: that image breaks too.
    (tmp_path / "wrap").mkdir()
    framed_seen = visit(browser, framed(page.read_text(), "allow-same-origin", str(tmp_path / "wrap")))
    assert {p.split(":")[0] for p in broken_images(framed_seen.images)} == {"<img alt='cut'>", "<img alt='beside'>"}
