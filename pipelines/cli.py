"""`kubellama <command> [flags] [key=value ...]`: one entry point for the tools, every stage and the pipeline.

Commands are looked up lazily so `kubellama plan` does not pay for importing kfp or torchx.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from kubellama.components.core.recipe.stages import STAGES

# command -> (module:function taking argv and returning an exit status, one-line help); one per registered stage.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("kubellama.components.core.tools.generate:main", "generate text from a checkpoint (ours or Hugging Face)"),
    "export-hf": ("kubellama.components.core.tools.export:main", "write a checkpoint as an HF Llama folder with a model card"),
    "plan": ("kubellama.components.core.tools.plan:main", "parameter count and per-GPU memory under FSDP"),
    "config": ("kubellama.components.core.tools.config:main", "print the resolved config"),
    "data": ("kubellama.components.data_prep.samples:main", "sample datasets: `kubellama data fetch-samples`"),
    **{s.command: (s.entry, s.help) for s in STAGES},
    "run": ("kubellama.pipelines.run:run_main", "run the pipeline locally through kfp.local"),
    "compile": ("kubellama.pipelines.run:compile_main",
                "compile the pipeline to KFP IR YAML; its runs take run-time overrides in the `overrides` parameter"),
    "submit": ("kubellama.pipelines.submit:main",
               "upload the pipeline to a KFP API and start a run (run-time overrides in its `overrides` parameter)"),
    "doctor": ("kubellama.pipelines.doctor:main", "preflight of the cluster a config would run on (one line a check)"),
    "show": ("kubellama.pipelines.show:main", "a run's models on held-out world prompts, pretrained beside gated"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: kubellama <command> [flags] [key=value ...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Overrides are Hydra's: model=llama2_7b cluster=h100 pretrain.lr=1e-4"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kubellama: error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
