"""Container images: hadolint-clean Dockerfiles, base images pinned once, non-root, tags the config expects."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kubellama.conf.schema import ClusterConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "images")
DOCKERFILES = ["Dockerfile.train", "Dockerfile.cpu"]


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def bake_defaults() -> dict[str, str]:
    return dict(re.findall(r'variable "(\w+)" \{ default = "([^"]*)" \}', read("images", "docker-bake.hcl")))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name):
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    out = subprocess.run([hadolint, "--failure-threshold", "style", os.path.join(IMAGES, name)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_takes_its_base_from_the_bake_file_and_drops_root(name):
    text = read("images", name)
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms == ["${BASE_IMAGE}"]  # no tag here: the pin lives in docker-bake.hcl only
    assert re.search(r"^ARG BASE_IMAGE$", text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # The package and kfp are installed in the image: pipeline steps import them without pip at run time.
    assert "pip install ." in text and "import torch, kfp" in text
    for folder in re.findall(r"^COPY (\w+) ", text, re.MULTILINE):
        assert os.path.isdir(os.path.join(ROOT, folder)), folder


def test_bake_pins_bases_and_matches_config_and_makefile():
    pins = bake_defaults()
    for key in ("TRAIN_BASE", "CPU_BASE"):
        image, _, tag = pins[key].rpartition(":")
        assert image and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), pins[key]
    assert "cuda" in pins["TRAIN_BASE"] and pins["TRAIN_BASE"].startswith("pytorch/pytorch:")
    assert re.search(r"^TORCH \?= torch==(\S+)$", read("Makefile"), re.MULTILINE).group(1) == pins["TORCH_VERSION"]
    assert pins["TRAIN_BASE"].split(":")[1].startswith(pins["TORCH_VERSION"] + "-")
    cluster = ClusterConfig()
    bake = read("images", "docker-bake.hcl")
    for target, default in (("train", cluster.image_train), ("cpu", cluster.image_cpu)):
        assert default == f"{pins['REGISTRY']}/{target}:{pins['VERSION']}"
        assert f'dockerfile = "images/Dockerfile.{target}"' in bake


def test_hadolint_catches_an_unpinned_base(tmp_path):
    """The lint is live: an unpinned, root-running Dockerfile fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    out = subprocess.run([hadolint, str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3013" in out.stdout


def test_makefile_takes_torch_from_the_cpu_index_and_falls_back():
    """On a stock Linux box PyPI's torch is the multi-GB CUDA build: the install asks the PyTorch CPU index first,
    falls back to the configured index when that one is unreachable, and pins torch in every later step so pip's
    resolver never swaps it."""
    pin = re.search(r"^TORCH \?= (\S+)$", read("Makefile"), re.MULTILINE).group(1)
    out = subprocess.run(["make", "-n", "-B", "install-test", "PYTHON=python3", "TORCH_INDEX=https://idx.invalid/cpu"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    installs = [line for line in out.splitlines() if " pip install " in line and "--upgrade pip" not in line]
    first, fallback = installs[0].split(" || ")
    assert first.endswith(f"--extra-index-url https://idx.invalid/cpu {pin}") and "--timeout" in first
    assert fallback.endswith(f"pip install -q {pin}") and "--extra-index-url" not in fallback
    assert len(installs) >= 3 and all(line.endswith(pin) for line in installs[1:])
