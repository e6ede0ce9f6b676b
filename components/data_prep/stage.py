"""Stage `data_prep`: clean the corpus, train (or take) the tokenizer, write token shards and alignment datasets.

The corpus goes through the fan-out steps (steps/), here in this process or with `--workers-as-processes` in
`data.parallelism` local processes; the merge step adds the small datasets (datasets.py) and the report (report.py).
Output under data.output (local or s3://); every folder gets its `_COMPLETE` marker last, the output folder itself
after everything else.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.recipe.entry import guarded, parser
from kubellama.components.data_prep import steps
from kubellama.components.data_prep.report import summary
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")


def run(cfg: Config, processes: bool = False) -> dict:
    """The whole stage on this machine: the steps in this process, or each phase's tasks in `data.parallelism`
    processes (`processes`). A content-addressed output that is already complete is reused."""
    cfg = runs.bind(cfg, "data_prep")
    if steps.reusable(cfg):
        # Content-addressed: this folder is the output of exactly this data config, already finished.
        log.info("data prep: %s already holds the output of this data config; nothing to do", cfg.data.output)
        return {**summary(storage.read_json(storage.join(cfg.data.output, "report.json"))), "reused": True}
    return steps.run_local(cfg, processes)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("data-prep", "Clean the corpus, train the tokenizer, write token shards and datasets.")
    p.add_argument("--workers-as-processes", action="store_true",
                   help="run data.parallelism workers (and packers, reducers) as parallel local processes: the "
                        "split a pipeline runs as pods, on this machine")
    args = p.parse_args(argv)

    def go() -> int:
        run(load_config(args.overrides), args.workers_as_processes)
        return 0

    # Progress to stderr for this call only: a handler left on the root logger would outlive the stream it holds
    # (the CLI can run in-process, under a caller that swaps sys.stderr).
    root = logging.getLogger()
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        level, root.level = root.level, logging.INFO
    try:
        return guarded(go)
    finally:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(level)
