"""What every `kubellama <stage>` entry point shares: overrides in, a typed config, one-line errors out."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kubellama.components.core.errors import PREFIX, KubellamaError
from kubellama.components.core.recipe.config import load_config
from kubellama.conf.schema import Config


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"kubellama {prog}", description=description)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. model=llama2_7b")
    return p


def fail(message: str) -> int:
    print(f"{PREFIX}{message}", file=sys.stderr)
    return 2


def guarded(fn: Callable[[], int | None]) -> int:
    """Run `fn`, turning user errors into one line on stderr and exit status 2."""
    try:
        return fn() or 0
    except KubellamaError as exc:
        return fail(str(exc))


def stage_main(prog: str, description: str, run: Callable[[Config], object],
               argv: Sequence[str] | None = None) -> int:
    """Entry point of a stage without flags of its own: `kubellama <prog> [key=value ...]`."""
    args = parser(prog, description).parse_args(argv)

    def go() -> int:
        run(load_config(args.overrides))
        return 0

    return guarded(go)
