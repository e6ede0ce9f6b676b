"""Every command of the README and the docs' getting-started page runs as written: the lines of their ```bash,
```sh and ```console blocks (`$ ` lines of the last), in page order, in one shell per page (so that its
`source .venv/bin/activate` holds for the commands after it, as for a reader), from a folder laid out as the
repository's root whose `runs/demo` is the session's reduced run (conftest.py's `recipe_run`) in place of a
`make demo` one. The commands that cannot run here are in NOT_HERE, each with why. A failing command is reported with
its file and line."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ("README.md", "docs/getting-started.md")
SHELLS = ("bash", "sh", "shell", "console")
# By the start of the command: why it does not run here. Each must still be on a page (a stale entry fails).
NOT_HERE = {
    "make demo": "the demo itself (the whole recipe at demo size, minutes): the reduced run stands in for its "
                 "runs/demo/latest",
    "make test": "the suite itself",
    "make tools": "fetches helm from the registry: `make test` runs it before the suite (a prerequisite of `test`)",
    "docker buildx bake": "builds the images and pushes them to a registry",
    ".tools/helm install": "installs the chart into a cluster",
}
# A whole page's commands, at most (the slowest, `kubellama generate`, loads the PPO model: ~10 s on 2 cores).
TIMEOUT_S = 300


@dataclass
class Command:
    file: str
    line: int  # of its first line, 1-based
    text: str  # as written, continuation lines included

    def where(self) -> str:
        return f"{self.file}:{self.line}: `{self.text.splitlines()[0]}`"


def commands(text: str, file: str) -> list[Command]:
    """The shell commands of a Markdown page's fenced bash/sh/console blocks, with their lines."""
    found: list[Command] = []
    lang: str | None = None  # the open block's language; None outside a block
    open_cmd: Command | None = None  # a command whose last line ended in a backslash
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*(```+|~~~+)\s*([\w-]*)", line)
        if fence:
            lang, open_cmd = (fence[2].lower() if lang is None else None), None
            continue
        if lang not in SHELLS:
            continue
        if open_cmd is not None:
            open_cmd.text += "\n" + line
        else:
            body = line.strip()
            if lang == "console":
                if not body.startswith("$ "):
                    continue  # the output shown under a command
                body = body[2:]
            if not body or body.startswith("#"):
                continue
            open_cmd = Command(file, n, body)
            found.append(open_cmd)
        if not line.rstrip().endswith("\\"):
            open_cmd = None
    return found


def why_not_here(cmd: Command) -> str | None:
    return next((why for start, why in NOT_HERE.items() if cmd.text.startswith(start)), None)


def script(cmds: list[Command], logs: str) -> str:
    """One shell for the page: each command as written, in a group of its own (so `source` holds for the next),
    its output to logs/<i>.log and its exit status to logs/<i>.rc; a failure does not stop the ones after it."""
    return "".join(f"{{\n{c.text}\n}} >{logs}/{i}.log 2>&1 </dev/null; echo $? >{logs}/{i}.rc\n"
                   for i, c in enumerate(cmds))


def start(cmds: list[Command], cwd: str, logs: str) -> subprocess.Popen:
    os.makedirs(logs, exist_ok=True)
    # A reader's shell before `source .venv/bin/activate`: no virtualenv on PATH, however pytest was started.
    venv_bin = os.path.join(ROOT, ".venv", "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if os.path.realpath(p) !=
                           os.path.realpath(venv_bin))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")} | {"PATH": path}
    return subprocess.Popen(["bash", "-c", script(cmds, logs)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def failures(cmds: list[Command], logs: str) -> list[str]:
    out = []
    for i, c in enumerate(cmds):
        rc_file = os.path.join(logs, f"{i}.rc")
        if not os.path.exists(rc_file):
            out.append(f"{c.where()}: did not finish within {TIMEOUT_S} s (the page's shell was stopped)")
            break
        rc = int(open(rc_file).read())
        if rc != 0:
            tail = open(os.path.join(logs, f"{i}.log"), errors="replace").read().strip().splitlines()[-8:]
            out.append("\n    ".join([f"{c.where()}: exit status {rc}", *tail]))
    return out


def repo_root_at(folder: str, demo_runs: str) -> str:
    """`folder` laid out as the repository's root (each top-level entry linked), with runs/demo -> demo_runs."""
    os.makedirs(os.path.join(folder, "runs"))
    for name in os.listdir(ROOT):
        if name not in ("runs", ".git", "site"):
            os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
    os.symlink(demo_runs, os.path.join(folder, "runs", "demo"))
    return folder


def test_every_local_command_of_the_readme_and_getting_started_runs(recipe_run, tmp_path):
    assert recipe_run.rc == 0, recipe_run.err
    assert os.path.isdir(os.path.join(ROOT, ".venv", "bin")), "no .venv: the pages' commands need `make install` first"
    found = {page: commands(open(os.path.join(ROOT, page)).read(), page) for page in PAGES}
    every = [c for cmds in found.values() for c in cmds]
    stale = [start for start in NOT_HERE if not any(c.text.startswith(start) for c in every)]
    assert not stale, f"NOT_HERE names commands no page has any more: {stale}"
    local = {page: [c for c in cmds if why_not_here(c) is None] for page, cmds in found.items()}
    # The pages' promise, checked here rather than trusted: the demo's run is read, and its final model answers.
    texts = [c.text for cmds in local.values() for c in cmds]
    assert any(t.startswith("kubellama show runs/demo/latest") for t in texts), texts
    assert any(t.startswith("kubellama generate --checkpoint runs/demo/latest/") for t in texts), texts

    # The two pages side by side (2 cores; each page's shell is sequential), each from its own root.
    running = {page: start(cmds, repo_root_at(str(tmp_path / f"root{i}"), recipe_run.root), str(tmp_path / f"logs{i}"))
               for i, (page, cmds) in enumerate(local.items())}
    bad = []
    for i, (page, proc) in enumerate(running.items()):
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        bad += failures(local[page], str(tmp_path / f"logs{i}"))
    assert not bad, "commands of the docs that fail as written:\n" + "\n".join(bad)


PAGE = """# A page

```bash
echo one   # a comment
false
```

Text, and a block that is not a shell:

```python
raise SystemExit(1)
```

```console
$ echo two \\
    three
two three
$ make demo
```
"""


def test_commands_are_read_with_their_lines_and_a_failure_is_named(tmp_path):
    cmds = commands(PAGE, "page.md")
    assert [(c.line, c.text) for c in cmds] == [(4, "echo one   # a comment"), (5, "false"),
                                                (15, "echo two \\\n    three"), (18, "make demo")]
    assert [why_not_here(c) is not None for c in cmds] == [False, False, False, True]
    local = cmds[:3]
    proc = start(local, str(tmp_path), str(tmp_path / "logs"))
    assert proc.wait(timeout=30) == 0
    assert failures(local, str(tmp_path / "logs")) == ["page.md:5: `false`: exit status 1"]
    assert open(tmp_path / "logs" / "2.log").read() == "two three\n"
