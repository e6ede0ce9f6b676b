"""The architecture, checked: one `kubellama` namespace in the wheel, import contracts that fail when broken, no
project import hidden inside a function, no private name crossing a module, no module past 400 lines."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = ("components", "pipelines", "conf")
BIN = Path(sys.executable).parent

# Project imports that stay inside a function, each for the reason the issue allows: it keeps a heavy dependency
# (kfp, torchx, kubernetes, s3fs, matplotlib, tensorboard) off the import path of code that runs without it.
# (file, imported module) -> the reason. KFP component bodies (component.py) are exempt: KFP runs them alone.
LAZY: dict[tuple[str, str], str] = {}


def _sources() -> list[Path]:
    return sorted(p for top in TOP for p in (REPO / top).rglob("*.py"))


def _function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module that sits inside a function of `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found: dict[int, tuple[int, str]] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith((".", "kubellama")) or name.split(".")[0] in TOP:
                    found[id(node)] = (node.lineno, name)
    return sorted(found.values())


def test_no_project_import_hides_inside_a_function():
    hidden = {(str(p.relative_to(REPO)), mod): line for p in _sources() if p.name != "component.py"
              for line, mod in _function_imports(p)}
    unexplained = sorted(f"{f}:{line} imports {mod}" for (f, mod), line in hidden.items() if (f, mod) not in LAZY)
    assert not unexplained, "imports inside functions (move them up, or give the heavy dependency in LAZY):\n" + \
        "\n".join(unexplained)
    assert not set(LAZY) - set(hidden), "LAZY lists imports that are gone"


def test_no_private_name_crosses_a_module():
    crossing = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kubellama"):
                crossing += [f"{p.relative_to(REPO)}:{node.lineno} imports {node.module}.{a.name}"
                             for a in node.names if a.name.startswith("_")]
    assert not crossing, "\n".join(crossing)


def test_no_module_in_components_is_over_400_lines():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in (REPO / "components").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, "\n".join(long)


def test_the_wheel_installs_only_the_kubellama_namespace(tmp_path):
    """`pip install .` puts one top-level name into site-packages: another distribution's `components` or `conf`
    is never overwritten, and a user's `conf.py` in the working directory cannot shadow ours."""
    src = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    for top in TOP:
        shutil.copytree(REPO / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("kubellama-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert z.read(top_level).decode().split() == ["kubellama"]
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"kubellama"}
    assert "kubellama = kubellama.pipelines.cli:main" in entry
    # The config tree and the stages' data files travel with the code.
    for data in ("kubellama/conf/config.yaml", "kubellama/conf/model/tiny.yaml",
                 "kubellama/components/safety_eval/toxic_lexicon.txt"):
        assert data in names
    assert not any(n.startswith(("components/", "conf/", "pipelines/")) for n in names)


def _tree_with(tmp_path: Path, stage_file: str, line: str) -> Path:
    """A copy of the package tree as `kubellama/...` with `line` added to `stage_file`."""
    root = tmp_path / "tree"
    for top in TOP:
        shutil.copytree(REPO / top, root / "kubellama" / top, ignore=shutil.ignore_patterns("__pycache__"))
    target = root / "kubellama" / stage_file
    target.write_text(target.read_text() + f"\n{line}\n")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("stage_file,line,broken", [
    ("components/ppo/stage.py", "from kubellama.components.sft import stage as _sft  # noqa", "Stages never import"),
    ("components/core/model/llama.py", "from kubellama.components.core.train import dist as _dist  # noqa",
     "Core: each subpackage"),
    ("conf/schema/model.py", "from kubellama.components.core import errors as _errors  # noqa", "Layers"),
])
def test_breaking_a_contract_fails_lint_imports(tmp_path, stage_file, line, broken):
    """The contracts are not decoration: the same tree with one forbidden import added fails, naming the contract;
    the tree as it is passes."""
    lint = str(BIN / "lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "tree")}
    root = _tree_with(tmp_path, stage_file, line)
    bad = subprocess.run([lint, "--no-cache"], cwd=root, env=env, capture_output=True, text=True)
    verdicts = [line for line in bad.stdout.splitlines() if line.startswith(broken)]
    assert bad.returncode != 0 and verdicts and verdicts[0].endswith("BROKEN"), bad.stdout[-2000:]
    assert str(root) in subprocess.run([sys.executable, "-c", "import kubellama.components as c; print(c.__file__)"],
                                       cwd=root, env=env, capture_output=True, text=True).stdout
    good = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0, good.stdout[-2000:]
