"""mkdocs hook: the config reference, generated at build time from the typed schema (conf/schema), so it cannot drift.

Every field's meaning is the comment written above it (or after it on its line) in its dataclass; a field without one
falls back to the comment of the same field in a base class. Each section opens with its dataclass's docstring. The
presets (conf/model, conf/cluster) and the table of moved keys (conf/schema/moved.py) are generated the same way.
`docs/reference/config.md` holds the hand-written introduction and the markers between which this hook writes.
tests/test_docs.py holds the schema to it: every key is in the page, and a new field without a comment fails.
"""
import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kubellama.conf.schema import Config
from kubellama.conf.schema.moved import MOVED, REMOVED

# The page's placeholder: everything between the two markers (a note for readers of the plain file) is replaced.
MARKER = re.compile(r"<!-- config-reference -->.*?<!-- /config-reference -->", re.DOTALL)
CONF = Path(__file__).resolve().parents[1] / "conf"
# Longer defaults (word lists, refusal markers) are cut: the reference names the key, `kubellama config` the values.
MAX_DEFAULT = 90


@dataclasses.dataclass(frozen=True)
class Field:
    key: str  # dotted key as an override names it (`ppo.sampling.temperature`), or `Item.field` for list items
    owner: str  # the dataclass whose body defines the field (its default): `PpoConfig.lr`
    type: str
    default: str
    comment: str


@dataclasses.dataclass(frozen=True)
class Section:
    key: str  # `ppo.sampling`, or the item dataclass's name
    doc: str
    fields: tuple[Field, ...]
    item: bool = False  # a dataclass that appears as the items of a list (`data.sources: list[SourceConfig]`)


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment written for it in `cls`'s own body: the `#` lines right above it (a `# --- ... ---`
    heading and blank lines end them) and any comment on the field's own lines."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    trailing: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and not lines[tok.start[0] - 1].lstrip().startswith("#"):
            trailing.setdefault(tok.start[0], []).append(tok.string.lstrip("#").strip())
    found = {}
    body = ast.parse(src).body[0]
    assert isinstance(body, ast.ClassDef)
    for stmt in body.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        row = stmt.lineno - 2
        while row >= 0 and lines[row].lstrip().startswith("#") and not lines[row].lstrip().startswith("# ---"):
            above.insert(0, lines[row].lstrip()[1:].strip())
            row -= 1
        after = [c for r in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) for c in trailing.get(r, [])]
        if text := " ".join(above + after).strip():
            found[stmt.target.id] = text
    return found


def _owner(cls: type, name: str) -> tuple[type, str]:
    """The class whose body defines `name` (its default applies), and the first comment for it along the MRO."""
    defining = [c for c in cls.__mro__ if name in inspect.get_annotations(c)]
    comment = next((text for c in defining if (text := _comments(c).get(name))), "")
    return defining[0], comment


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if origin else str(tp)


def _default(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_DEFAULT:
        extra = f" ({len(value)} items)" if isinstance(value, list | dict) else ""
        text = text[:MAX_DEFAULT].rstrip() + "…" + extra
    return text


def _item_class(tp: Any) -> type | None:
    """The dataclass of a `list[SomeConfig]` field, else None."""
    if typing.get_origin(tp) is list:
        (arg,) = typing.get_args(tp)
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def sections(root: type = Config) -> list[Section]:
    """The schema as reference sections: one per dataclass node of the tree (depth first, in field order), then one
    per dataclass that appears as list items. Every field of every section is a leaf (a scalar, list or dict)."""
    tree: list[Section] = []
    items: dict[str, Section] = {}

    def walk(cls: type, instance: Any, prefix: str, item: bool = False) -> None:
        hints = typing.get_type_hints(cls)
        rows: list[Field] = []
        children: list[tuple[type, Any, str]] = []
        for f in dataclasses.fields(cls):
            tp, value = hints[f.name], getattr(instance, f.name)
            key = f"{prefix}.{f.name}" if prefix else f.name
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                children.append((tp, value, key))
                continue
            owner, comment = _owner(cls, f.name)
            item_cls = _item_class(tp)
            if item_cls is not None and item_cls.__name__ not in items:
                items[item_cls.__name__] = Section("", "", ())  # placeholder: keeps the first-seen order
                walk(item_cls, item_cls(), item_cls.__name__, item=True)
            rows.append(Field(key, f"{owner.__name__}.{f.name}", _type_name(tp), _default(value), comment))
        section = Section(prefix, inspect.cleandoc(cls.__doc__ or "") if _has_own_doc(cls) else "", tuple(rows),
                          item)
        if item:
            items[prefix] = section
        elif rows or prefix:
            tree.append(section)
        for tp, value, key in children:
            walk(tp, value, key)

    walk(root, root(), "")
    return tree + list(items.values())


def _has_own_doc(cls: type) -> bool:
    # A dataclass without a docstring gets a generated one (`Name(field: type = ...)`): not prose to show.
    return bool(cls.__doc__) and not cls.__doc__.startswith(f"{cls.__name__}(")  # type: ignore[union-attr]


def fields(root: type = Config) -> list[Field]:
    return [f for s in sections(root) for f in s.fields]


_CODE = re.compile(r"(`[^`]*`)")


def _prose(text: str) -> str:
    """Comment text as Markdown inside a table cell: code spans kept, HTML and emphasis characters escaped elsewhere
    (comments name paths like <run.root>/<run.id> and globs like pipeline.stages.*)."""
    out = []
    for part in _CODE.split(text):
        if not part.startswith("`"):
            part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            part = re.sub(r"([*_\\\[\]])", r"\\\1", part)
        out.append(part.replace("|", "\\|"))
    return "".join(out)


def _anchor(key: str) -> str:
    return "item-" + key.lower() if key[:1].isupper() else key.replace(".", "-")


def _table(section: Section) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in section.fields:
        name = f.key.rsplit(".", 1)[-1] if section.item else f.key
        meaning = _prose(f.comment)
        if item := re.search(r"list\[([A-Z]\w+)\]", f.type):
            meaning += f" Items: [{item.group(1)}](#{_anchor(item.group(1))})."
        rows.append(f"| `{name}` | `{f.type}` | `{f.default}` | {meaning} |")
    return rows


def _presets(group: str) -> list[str]:
    rows = [f"| `{group}=` | what the preset file says | what it sets |", "|---|---|---|"]
    for path in sorted((CONF / group).glob("*.yaml")):
        text = path.read_text()
        note = " ".join(line.lstrip("# ").strip() for line in text.splitlines()
                        if line.startswith("#") and "@package" not in line)
        values = yaml.safe_load(text) or {}
        if "@package _global_" not in text:
            values = {group: values}
        flat = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in _flatten(values).items() if not k.endswith(".name"))
        rows.append(f"| `{path.stem}` | {_prose(note)} | {flat} |")
    return rows


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def render(root: type = Config) -> str:
    intro = ("Config groups pick a preset file: `model=<preset>` from `conf/model/`, `cluster=<preset>` from "
             "`conf/cluster/`. A command-line override of any key still wins over the preset.")
    out = ["## Presets", "", intro, ""]
    for group in ("model", "cluster"):
        out += [f"### {group}", "", *_presets(group), ""]
    out += ["## Moved and removed keys", "",
            "Setting an old key fails with one line naming its new place (`conf/schema/moved.py`).", "",
            "| old key | new key |", "|---|---|"]
    out += [f"| `{old}` | `{new}` |" for old, new in MOVED.items()]
    out += [f"| `{old}` | (removed) |" for old in REMOVED]
    out += [""]
    secs = sections(root)
    out += ["## Keys", ""]
    for s in secs:
        if s.item:
            title = f"### List items: {s.key} {{#{_anchor(s.key)}}}"
        else:
            title = f"{'#' * min(3 + s.key.count('.'), 6)} {s.key or 'top level'} {{#{_anchor(s.key or 'top')}}}"
        out += [title, ""]
        if s.doc:
            out += [_prose(" ".join(s.doc.split())), ""]
        if s.fields:
            out += [*_table(s), ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: fill the marker of the config reference page."""
    return MARKER.sub(lambda _: render(), markdown)
