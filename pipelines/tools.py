"""The non-stage commands: generate, export-hf, plan, config."""
from __future__ import annotations

import sys
from typing import Sequence

from kubellama.components.core.recipe.cli import guarded, parser
from kubellama.components.core.recipe.config import load_config, to_yaml
from kubellama.components.core.errors import KubellamaError


def generate_main(argv: Sequence[str] | None = None) -> int:
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
        import torch

        from kubellama.components.core.model.generate import generate
        from kubellama.components.core.data.tokenizer import Tokenizer

        cfg = load_config(args.overrides)
        g = cfg.generate
        model, _, tok_url = _load_any(args.checkpoint, cfg)
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


def export_hf_main(argv: Sequence[str] | None = None) -> int:
    p = parser("export-hf", "Write a Hugging Face Llama checkpoint directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="an HF directory or a kubellama training checkpoint to convert")
    src.add_argument("--init", action="store_true", help="fresh weights for `model` (seeded by run.seed)")
    p.add_argument("--out", required=True, help="output directory, local or s3://")
    p.add_argument("--tokenizer", help="tokenizer.model to include")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast weights (default: as stored)")
    args = p.parse_args(argv)

    def go() -> int:
        import torch

        from kubellama.components.core.model.hf import save_hf
        from kubellama.components.core.model.llama import Llama

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
        cfg = load_config(args.overrides)
        tokenizer = args.tokenizer
        if args.init:
            torch.manual_seed(cfg.run.seed)
            model, model_cfg = Llama(cfg.model), cfg.model
        else:
            model, model_cfg, tok_url = _load_any(args.checkpoint, cfg)
            tokenizer = tokenizer or tok_url
        save_hf(model.state_dict(), model_cfg, args.out, tokenizer=tokenizer, dtype=dtype)
        print(f"wrote {args.out}")
        return 0

    return guarded(go)


def _load_any(url: str, cfg):  # type: ignore[no-untyped-def]
    """An HF directory, or a training checkpoint of the trainer core consolidated to a model."""
    from kubellama.components.core.io import storage
    from kubellama.components.core.model.hf import load_model

    if storage.exists(storage.join(url, "config.json")):
        return load_model(url)
    from kubellama.components.core.train.checkpoint import latest, load_model as load_training_checkpoint

    if not storage.is_complete(url) and latest(url) is None:
        raise KubellamaError(f"{url}: neither a Hugging Face checkpoint (no config.json) nor a training checkpoint "
                             f"(no {storage.COMPLETE} marker, no step_* folder)")
    model = load_training_checkpoint(url, cfg.model)
    return model, cfg.model, None


def plan_main(argv: Sequence[str] | None = None) -> int:
    p = parser("plan", "Parameter count, per-GPU memory under FSDP (plan.world_size, plan.seq_len, ...) and the "
                       "cost ledger: GPU-hours and tCO2eq for plan.tokens on plan.gpu.")
    args = p.parse_args(argv)

    def go() -> int:
        from kubellama.components.core.tools.cost import estimate, format_cost
        from kubellama.components.core.tools.plan import format_plan, format_ppo_plan, plan, ppo_plan

        cfg = load_config(args.overrides)
        p = cfg.plan
        memory = plan(cfg.model, p)
        cost = estimate(memory.params, p.tokens, p.gpu, p.mfu, p.gpu_power_w)
        print(format_plan(cfg.model, p, memory))
        print(format_ppo_plan(p, cfg.ppo, ppo_plan(cfg.model, p, cfg.ppo)))
        print(format_cost(cfg.model.name, p.tokens, cost, derived_mfu=not p.mfu))
        return 0

    return guarded(go)


def config_main(argv: Sequence[str] | None = None) -> int:
    args = parser("config", "Print the resolved config for these overrides.").parse_args(argv)

    def go() -> int:
        sys.stdout.write(to_yaml(load_config(args.overrides)))
        return 0

    return guarded(go)
