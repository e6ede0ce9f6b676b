"""Check that every <img> of a report page decodes: `python scripts/check_page.py runs/demo/latest/report.html`.

1. Every <img> has one src, a `data:image/png;base64,` URI (so the page needs nothing else) whose bytes are a PNG:
   the signature, an IHDR chunk with a non-zero width and height, and pixel data that decodes (Pillow) to that
   size.
2. Where headless Chromium is installed (`chromium`, `chromium-browser`, `chromium-headless-shell`,
   `chrome-headless-shell` or `google-chrome` on PATH; Debian: `apt-get install chromium-headless-shell`), the page
   is opened in it and each image must be loaded with a non-zero natural width: what a person opening the page
   would see. Without one, this half is skipped and says so (one line on stderr).
Exit status 0 when every image passes, 1 otherwise (one line per failure).
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser

URI = "data:image/png;base64,"
PNG = b"\x89PNG\r\n\x1a\n"
BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "chrome-headless-shell", "google-chrome")
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.setAttribute("data-check", imgs.length + "|" + bad.join(","));
});</script>"""


class _Imgs(HTMLParser):
    """The attributes of every <img>, as a browser's tokenizer reads them (quoting, `data-src` is not `src`)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[list[tuple[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.found.append(attrs)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG whose pixels decode; raises ValueError saying what is wrong."""
    from PIL import Image

    if not data.startswith(PNG):
        raise ValueError("not a PNG (no PNG signature)")
    # The first chunk must be IHDR: length 13, then width and height (big-endian, non-zero by the PNG spec).
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise ValueError("no IHDR chunk after the signature")
    w, h = struct.unpack(">II", data[16:24])
    if w == 0 or h == 0:
        raise ValueError(f"IHDR says {w}x{h} pixels")
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # inflates every IDAT: a truncated or corrupt image raises here
        if im.size != (w, h):
            raise ValueError(f"decodes to {im.size[0]}x{im.size[1]}, IHDR says {w}x{h}")
    return w, h


def decode_all(page: str) -> tuple[int, list[str]]:
    """(images, failures) decoding each <img>'s data URI in Python."""
    parser = _Imgs()
    parser.feed(page)
    parser.close()
    imgs = parser.found
    failures = []
    for n, attrs in enumerate(imgs):
        srcs = [v or "" for k, v in attrs if k == "src"]
        if len(srcs) != 1:
            failures.append(f"<img> {n}: {len(srcs)} src attributes")
            continue
        if not srcs[0].startswith(URI):
            failures.append(f"<img> {n}: src is not a {URI} URI ({srcs[0][:40]!r})")
            continue
        try:
            png_size(base64.b64decode(srcs[0][len(URI):], validate=True))
        except Exception as exc:  # any decoder error is the finding  # noqa: BLE001
            failures.append(f"<img> {n}: does not decode ({exc})")
    return len(imgs), failures


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in BROWSERS) if p), None)


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
    else:
        # Not silent: a pass without a browser checked only the Python half.
        print(f"check_page: {path}: chromium check skipped: none of {', '.join(BROWSERS)} on PATH "
              f"(Debian: apt-get install chromium-headless-shell)", file=sys.stderr)
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
