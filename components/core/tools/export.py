"""`kubellama export-hf`: write a checkpoint (HF, training, or fresh weights) as a Hugging Face Llama directory."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kubellama.components.core.model.hf import save_hf
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.recipe.entry import guarded, parser
from kubellama.components.core.tools.load import load_any

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
        if args.init:
            torch.manual_seed(cfg.run.seed)
            model, model_cfg = Llama(cfg.model), cfg.model
        else:
            model, model_cfg, tok_url = load_any(args.checkpoint, cfg)
            tokenizer = tokenizer or tok_url
        save_hf(model.state_dict(), model_cfg, args.out, tokenizer=tokenizer, dtype=dtype)
        print(f"wrote {args.out}")
        return 0

    return guarded(go)
