"""The docs site: it builds strictly, its config reference covers the schema and every field says what it is for, the
README stays a first page, and the links and commands of the README and the docs point at things that exist.

The commands of README.md and docs/getting-started.md are checked to exist here (a `kubellama` command, a Makefile
target); running them as written is a separate test that shares a reduced pipeline run with the browser test."""
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from kubellama.conf.schema import Config
from kubellama.pipelines.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MKDOCS = str(Path(sys.executable).parent / "mkdocs")
README_LIMIT = 10_000  # bytes: the README is what a first visit needs; the rest lives in docs/

# Fields that had no comment when the reference was first generated (class -> field names). The list only shrinks:
# comment a field in conf/schema and remove it here. A new field needs its comment.
UNCOMMENTED: dict[str, str] = {}
LEGACY = {f"{cls}.{name}" for cls, names in UNCOMMENTED.items() for name in names.split()}


def _load_hooks():
    spec = importlib.util.spec_from_file_location("kubellama_docs_hooks", DOCS / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as mkdocs loads it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def _build(root: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([MKDOCS, "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = _build(REPO, out)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def _page(site: Path, doc: str) -> str:
    """The built HTML of docs/<doc> (use_directory_urls: a.md -> a/index.html, index.md -> index.html)."""
    stem = doc.removesuffix(".md")
    path = site / ("index.html" if stem == "index" else f"{stem.removesuffix('/index')}/index.html")
    return path.read_text()


# --- the config reference against the schema ---


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every key of the structured config whose value is not itself a dataclass, found through OmegaConf (not the
    generator): the keys an override may set."""
    keys = []
    for name in map(str, node):
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(OmegaConf.get_type(node, name)):
            keys += _leaf_keys(node[name], f"{key}.")
        else:
            keys.append(key)
    return keys


def _list_item_classes(cls: type) -> set[type]:
    found = set()
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            found |= _list_item_classes(tp)  # type: ignore[arg-type]
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(arg := typing.get_args(tp)[0]):
            found |= {arg, *_list_item_classes(arg)}  # type: ignore[arg-type]
    return found


def test_every_config_key_and_list_item_field_is_in_the_built_reference(site):
    page = _page(site, "reference/config.md")
    keys = _leaf_keys(OmegaConf.structured(Config))
    assert len(keys) > 300 and "ppo.reward_models.combined.safety_threshold" in keys  # the walk went deep
    missing = [k for k in keys if f"<td><code>{k}</code></td>" not in page]
    assert not missing, f"keys missing from the config reference: {missing}"
    for item in _list_item_classes(Config):
        section = page.split(f'id="item-{item.__name__.lower()}"', 1)
        assert len(section) == 2, f"no section for the list items {item.__name__}"
        body = section[1].split("<h", 1)[0]
        assert all(f"<td><code>{f.name}</code></td>" in body for f in dataclasses.fields(item)), item.__name__


def test_the_reference_shows_each_fields_comment_default_and_the_presets(site):
    page = _page(site, "reference/config.md")
    row = re.search(r"<td><code>ppo\.beta</code></td>\s*<td><code>float</code></td>\s*<td><code>0\.01</code></td>"
                    r"\s*<td>(.*?)</td>", page, re.DOTALL)
    assert row and "KL penalty to the starting policy" in row.group(1)
    # A comment's <run.root>/<run.id> stays text, not a swallowed HTML tag.
    assert "Empty: &lt;run.root&gt;/&lt;run.id&gt;/ppo." in page
    assert "ppo.beta=0.005" in page and "NVIDIA-H100-80GB-HBM3" in page  # the presets, from conf/*/*.yaml
    assert "<code>ppo.value_coef</code>" in page  # the moved keys, from conf/schema/moved.py
    assert "only its introduction" not in page  # the note for readers of the plain file is replaced


def _undocumented(fields) -> tuple[set[str], set[str]]:
    """(new fields without a comment, listed fields that have one now or are gone)."""
    bare = {f.owner for f in fields if not f.comment}
    return bare - LEGACY, LEGACY - bare


def test_every_new_config_field_has_a_comment():
    new, stale = _undocumented(hooks.fields())
    assert not new, f"comment these fields in conf/schema (the config reference shows the comment): {sorted(new)}"
    assert not stale, f"these fields have a comment now, or are gone: remove them from UNCOMMENTED: {sorted(stale)}"


@dataclasses.dataclass
class _Inner:
    """An inner section."""

    # --- a heading, not a field's comment ---
    # Spoken for, over
    # two lines.
    said: int = 1
    trailing: str = "x"  # said on its line

    # A comment above a blank line belongs to no field.

    bare: float = 0.5


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    # Inherited by no one.
    top: bool = True
    unsaid: int = 3


def test_the_comment_reader_takes_each_fields_own_comment_and_flags_a_field_without_one():
    got = {f.key: f for f in hooks.fields(_Outer)}
    assert got["inner.said"].comment == "Spoken for, over two lines."
    assert got["inner.trailing"].comment == "said on its line"
    assert got["inner.bare"].comment == "" and got["unsaid"].comment == ""
    assert got["top"].comment == "Inherited by no one." and got["top"].default == "true"
    assert (got["inner.said"].owner, got["inner.said"].type) == ("_Inner.said", "int")
    new, _ = _undocumented(hooks.fields(_Outer))
    assert new == {"_Inner.bare", "_Outer.unsaid"}


@dataclasses.dataclass
class _Base:
    # How deep, said once in the base.
    depth: int = 1


@dataclasses.dataclass
class _Derived(_Base):
    depth: int = 2


def test_a_field_redeclared_without_a_comment_keeps_its_base_classes_comment():
    (got,) = hooks.fields(_Derived)
    assert (got.key, got.owner, got.default, got.comment) == ("depth", "_Derived.depth", "2",
                                                              "How deep, said once in the base.")


# --- the site and the README ---


def test_a_broken_anchor_or_link_fails_the_strict_build(tmp_path):
    """The strict build is a real check: the same docs with one broken anchor fail, naming it."""
    for name in ("docs", "conf"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "stages" / "ppo.md"
    page.write_text(page.read_text() + "\n[gone](../concepts/world.md#no-such-section)\n")
    built = _build(tmp_path, tmp_path / "site")
    assert built.returncode != 0 and "no-such-section" in built.stderr, built.stderr[-2000:]


def test_the_readme_is_a_first_page():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) < README_LIMIT, f"README.md is {len(text.encode())} bytes; move detail into docs/"
    head = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in head] == ["make demo", "make test"]
    assert "docs/getting-started.md" in text and "docs/reference/config.md" in text


_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_every_relative_link_in_the_readme_and_the_docs_resolves(site):
    broken = []
    for path in _markdown_files():
        prose = re.sub(r"`[^`\n]*`", "", _FENCE.sub("", path.read_text()))
        for target in _LINK.findall(prose):
            if re.match(r"[a-z]+:", target):
                continue  # a URL, not a file of this repository
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
            elif anchor and dest.is_relative_to(DOCS) and f'id="{anchor}"' not in _page(site, str(
                    dest.relative_to(DOCS))):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such anchor in the built page)")
    assert not broken, broken


def test_every_repository_path_the_readme_and_the_docs_name_exists():
    tops = "components|conf|pipelines|scripts|benchmarks|images|helm|tests|docs|\\.ci"
    missing = set()
    for path in _markdown_files():
        for name in re.findall(rf"(?<![\w./<-])((?:{tops})/[\w./-]*\w)", path.read_text()):
            if not (REPO / name).exists():
                missing.add(f"{path.relative_to(REPO)}: {name}")
    assert not missing, sorted(missing)


def _commands(path: Path) -> list[str]:
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE):
        lines += [line.split("  #")[0].strip() for line in block.splitlines() if not line.startswith(" ")]
    return [line for line in lines if line]


def test_the_first_pages_commands_exist():
    """Each command line of the README and the getting-started page names a real `kubellama` command or Makefile
    target."""
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
    seen = []
    for path in (REPO / "README.md", DOCS / "getting-started.md"):
        for line in _commands(path):
            words = line.split()
            if words[0] == "kubellama":
                assert words[1] in COMMANDS or words[1] == "--help", f"{path.name}: {line}"
            elif words[0] == "make":
                assert words[1] in targets, f"{path.name}: {line}"
            seen.append(words[0])
    assert {"kubellama", "make"} <= set(seen)
