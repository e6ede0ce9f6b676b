"""`kubellama generate`: sample or decode greedily from a checkpoint (ours or Hugging Face)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.model.generate import generate
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.recipe.entry import guarded, parser
from kubellama.components.core.tools.load import load_any


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("generate", "Generate from a checkpoint directory (ours or one saved by transformers).")
    p.add_argument("--checkpoint", required=True,
                   help="HF Llama directory (ours or transformers'), or a training checkpoint (model from overrides)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids, e.g. 1,37,99")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    p.add_argument("--max-new-tokens", type=int, help="default: generate.max_new_tokens")
    p.add_argument("--ids", action="store_true", help="print generated token ids as a comma-separated line")
    args = p.parse_args(argv)

    def go() -> int:
        cfg = load_config(args.overrides)
        g = cfg.generate
        model, _, tok_url = load_any(args.checkpoint, cfg)
        tok = Tokenizer(tok_url) if tok_url else None
        if args.prompt:
            if tok is None:
                raise KubellamaError(f"{args.checkpoint} has no tokenizer.model: use --prompt-ids")
            prompts = [tok.encode(t) for t in args.prompt]
        else:
            try:
                prompts = [[int(x) for x in s.split(",") if x.strip()] for s in args.prompt_ids]
            except ValueError:
                raise KubellamaError(f"--prompt-ids {args.prompt_ids}: expected comma-separated integers") from None
        torch.manual_seed(g.seed)
        out = generate(model, prompts, args.max_new_tokens or g.max_new_tokens,
                       temperature=0.0 if args.greedy else g.temperature, top_p=g.top_p, seed=g.seed)
        for i, ids in enumerate(out):
            if args.ids or tok is None:
                print(",".join(str(t) for t in ids))
            else:
                # Decode prompt and continuation together so the joining space survives.
                print(tok.decode(prompts[i] + [t for t in ids if t != tok.eos_id]))
        return 0

    return guarded(go)
