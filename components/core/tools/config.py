"""`kubellama config`: print the resolved config for these overrides."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from kubellama.components.core.recipe.config import load_config, to_yaml
from kubellama.components.core.recipe.entry import guarded, parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser("config", "Print the resolved config for these overrides.").parse_args(argv)

    def go() -> int:
        sys.stdout.write(to_yaml(load_config(args.overrides)))
        return 0

    return guarded(go)
