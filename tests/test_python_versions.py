"""Python 3.11 to 3.13: the Makefile takes the first interpreter of those on PATH, and the whole install (the package's
dependencies and its test extra) resolves for Python 3.12 against the package registry."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
# Pure-Python dependencies that PyPI has only as source: pip's --python-version takes wheels only, so these are built
# here (py3-none-any, any Python) and offered beside the registry. A new one fails the test below, naming it.
SDIST_ONLY = ("kfp-server-api", "antlr4-python3-runtime")


def make_python(tmp_path: Path, pythons: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    """`make` on a copy of the Makefile with only `pythons` (stubs) on PATH, printing the PYTHON it chose."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in pythons:
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return subprocess.run([MAKE, "-s", "-f", str(REPO / "Makefile"), "--eval", 'print-python: ; @echo "$(PYTHON)"',
                           "print-python", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)})


@pytest.mark.skipif(MAKE is None, reason="no make on PATH")
@pytest.mark.parametrize("pythons,chosen", [(("python3.13", "python3.12", "python3.11"), "python3.11"),
                                            (("python3.13", "python3.12"), "python3.12"),
                                            (("python3.13",), "python3.13")])
def test_the_makefile_takes_the_first_of_python_3_11_to_3_13(tmp_path, pythons, chosen):
    done = make_python(tmp_path, pythons)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "bin" / chosen)
    given = make_python(tmp_path, pythons, "PYTHON=/opt/py/bin/python3")
    assert given.stdout.strip() == "/opt/py/bin/python3"


@pytest.mark.skipif(MAKE is None, reason="no make on PATH")
def test_the_makefile_says_so_when_no_supported_python_is_there(tmp_path):
    """`make install` with none of them on PATH: one clear line, and nothing created."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "setup.py").touch()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3.10").write_text("#!/bin/sh\nexit 0\n")
    done = subprocess.run([MAKE, "install"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)})
    assert done.returncode != 0 and not (tmp_path / ".venv").exists()
    assert "no python3.11, python3.12 or python3.13 on PATH" in done.stderr, done.stderr


def requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


def makefile_var(name: str) -> str:
    """A variable's default in the Makefile (`NAME ?= value`)."""
    m = re.search(rf"^{name} \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert m, f"Makefile: no `{name} ?=` line"
    return m.group(1)


def index_url() -> str:
    """The package index pip is configured with (the default: PyPI)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    m = re.search(r"^[^.\s]*\.index-url='([^']+)'", listed, re.MULTILINE)
    return os.environ.get("PIP_INDEX_URL") or (m.group(1) if m else "https://pypi.org/simple")


def reachable(url: str, timeout: float = 10) -> str | None:
    """None when `url` answers, else why not."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def test_the_whole_install_resolves_for_python_3_12(tmp_path):
    """What `make install-test` installs, resolved for CPython 3.12 (wheels only, so every compiled dependency must
    have a cp312 build): torch pinned as the Makefile pins it, from its CPU index where that is reachable."""
    index = index_url().rstrip("/")
    why = reachable(f"{index}/pip/")
    if why:
        pytest.skip(f"package registry {index} unreachable ({why}): the Python 3.12 resolution needs it")
    links = tmp_path / "links"
    for name in SDIST_ONLY:
        try:
            spec = f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            spec = name
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                "-w", str(links), spec], capture_output=True, text=True)
        assert built.returncode == 0, built.stderr[-2000:]
    assert all(w.name.endswith("-py3-none-any.whl") for w in links.iterdir()), sorted(links.iterdir())
    torch, torch_index = makefile_var("TORCH"), makefile_var("TORCH_INDEX")
    extra = ["--extra-index-url", torch_index] if reachable(f"{torch_index}/torch/") is None else []
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--python-version", "3.12",
                           "--only-binary=:all:", "--target", str(tmp_path / "target"), "--ignore-installed",
                           "--retries", "1", "--timeout", "30", "--find-links", str(links), *extra,
                           "--report", str(report), "-q", *requirements(), torch],
                          capture_output=True, text=True, timeout=300)
    missing = re.findall(r"available for your environment:\s+(\S+)", done.stderr)
    assert not missing, f"{missing[0]} has no wheel for 3.12 (if it is pure Python, add it to SDIST_ONLY)"
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i for i in json.loads(report.read_text())["install"]}
    wanted = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements()}
    assert wanted <= set(chosen), sorted(wanted - set(chosen))
    assert chosen["torch"]["metadata"]["version"].split("+")[0] == torch.split("==")[1]
    # Every wheel picked installs on CPython 3.12: a cp312 build, the stable ABI of an older CPython, or pure Python.
    unfit = sorted(name for name, i in chosen.items() if not fits_312(i["download_info"]["url"].rsplit("/", 1)[-1]))
    assert not unfit, unfit


def fits_312(wheel: str) -> bool:
    return any(t.interpreter in ("cp312", "py3", "py312") or
               (t.abi == "abi3" and t.interpreter.startswith("cp3") and int(t.interpreter[3:]) <= 12)
               for t in parse_wheel_filename(wheel)[3])
