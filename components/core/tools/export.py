"""`kubellama export-hf`: write a checkpoint (HF, training, or fresh weights) as a Hugging Face Llama directory, with
its model card (README.md: core/io/card.py) and the lineage the source records."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kubellama.components.core.io import cards, storage
from kubellama.components.core.model.hf import save_hf
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.recipe.entry import guarded, parser
from kubellama.components.core.tools.load import load_any
from kubellama.components.core.train.checkpoint import resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("export-hf", "Write a Hugging Face Llama checkpoint directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="an HF directory or a kubellama training checkpoint to convert")
    src.add_argument("--init", action="store_true", help="fresh weights for `model` (seeded by run.seed)")
    p.add_argument("--out", required=True, help="output directory, local or s3://")
    p.add_argument("--tokenizer", help="tokenizer.model to include")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast weights (default: as stored)")
    args = p.parse_args(argv)

    def go() -> int:
        dtype = DTYPES[args.dtype]
        cfg = load_config(args.overrides)
        tokenizer = args.tokenizer
        cast = f", weights cast to {args.dtype}" if args.dtype else ""
        if args.init:
            torch.manual_seed(cfg.run.seed)
            model, model_cfg = Llama(cfg.model), cfg.model
            source, origin = None, f"fresh random weights (`kubellama export-hf --init`, run.seed {cfg.run.seed}{cast})"
        else:
            model, model_cfg, tok_url = load_any(args.checkpoint, cfg)
            tokenizer = tokenizer or tok_url
            # The folder the weights came from: an HF folder, or the training checkpoint's step that load_any read.
            hf_source = storage.exists(storage.join(args.checkpoint, "config.json"))
            source = args.checkpoint if hf_source else resolve(args.checkpoint)[1]
            origin = f"converted from `{source}` by `kubellama export-hf`{cast}"
        lineage, report, facts = cards.for_export(source, cfg, origin)
        save_hf(model.state_dict(), model_cfg, args.out, tokenizer=tokenizer, dtype=dtype, lineage=lineage)
        card = cards.write(args.out, report, facts)
        print(f"wrote {args.out} (model card {card})")
        return 0

    return guarded(go)
