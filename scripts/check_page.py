"""Check that every <img> of a report page decodes: `python scripts/check_page.py runs/demo/latest/report.html`.

1. Every <img> is a PNG data URI that decodes to pixels (matplotlib's PNG reader), so the page needs nothing else.
2. Where headless Chromium is installed (`chromium`, `chromium-browser` or `google-chrome` on PATH; Debian:
   `apt-get install chromium`), the page is opened in it and each image must be loaded with a non-zero natural
   width: what a person opening the page would see.
Exit status 0 when every image passes, 1 otherwise (one line per failure).
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile

IMG = re.compile(r"<img\b[^>]*>")
SRC = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.setAttribute("data-check", imgs.length + "|" + bad.join(","));
});</script>"""


def decode_all(page: str) -> tuple[int, list[str]]:
    """(images, failures) decoding each data URI in Python."""
    import matplotlib.image

    tags = IMG.findall(page)
    failures = []
    for n, tag in enumerate(tags):
        m = SRC.search(tag)
        if not m:
            failures.append(f"<img> {n}: not an embedded PNG data URI")
            continue
        try:
            pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(m.group(1), validate=True)), format="png")
            if pixels.shape[0] == 0 or pixels.shape[1] == 0:
                failures.append(f"<img> {n}: empty image")
        except Exception as exc:  # any decoder error is the finding
            failures.append(f"<img> {n}: does not decode ({exc})")
    return len(tags), failures


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def in_browser(page: str, browser: str) -> tuple[int, list[str]]:
    """(images, failures) as headless Chromium loads the page (a copy with a probe script appended)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "page.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page.replace("</body>", PROBE + "</body>"))
        out = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=10000",
                              "--dump-dom", f"file://{path}"], capture_output=True, text=True, timeout=120)
    m = re.search(r'data-check="(\d+)\|([^"]*)"', out.stdout)
    if not m:
        return 0, [f"chromium did not render the page: {out.stderr.strip().splitlines()[-1:]}"]
    bad = [b for b in m.group(2).split(",") if b]
    return int(m.group(1)), [f"<img alt={b!r}>: not displayed by chromium" for b in bad]


def check(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        page = f.read()
    n, failures = decode_all(page)
    if n == 0:
        failures.append("no <img> in the page")
    browser = chromium()
    if browser:
        shown, more = in_browser(page, browser)
        failures += more + ([f"chromium saw {shown} images, the page has {n}"] if shown != n and not more else [])
    return failures


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    bad = [f"{p}: {f}" for p in argv for f in check(p)]
    for line in bad:
        print(line)
    if not bad:
        how = "decoded, and shown by headless chromium" if chromium() else "decoded (no chromium here)"
        print(f"every <img> of {', '.join(argv)} {how}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
