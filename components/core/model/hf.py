"""Hugging Face Llama checkpoints, both ways.

Our parameter names are LlamaForCausalLM's without the `model.` prefix, and RoPE uses its rotate-half layout, so the
conversion is a rename. What we write loads in transformers (strict keys, identical fp32 logits), vLLM and TGI; what
transformers' `save_pretrained` writes (one safetensors file or a sharded index) loads here.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage, trust
from kubellama.components.core.io.cards import LINEAGE
from kubellama.components.core.model.llama import Llama
from kubellama.conf.schema.model import ModelConfig

SHARD_BYTES = 5 * 1024**3


def to_hf_key(name: str) -> str:
    # Heads sit beside the backbone in transformers: LlamaForCausalLM's lm_head, LlamaForSequenceClassification's score.
    return name if name.startswith(("lm_head.", "score.")) else f"model.{name}"


def from_hf_key(name: str) -> str:
    return name.removeprefix("model.")


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def model_config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    if hf.get("model_type") not in ("llama", None):
        raise KubellamaError(f"config.json: model_type {hf.get('model_type')!r} is not a Llama model")
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        name=name, dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=None if kv == heads else kv, ffn_hidden=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(rope),
        max_seq_len=hf.get("max_position_embeddings", 4096), init_std=hf.get("initializer_range", 0.02),
    )


def _tokenizer_files(tokenizer_url: str) -> dict[str, bytes]:
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {
        "tokenizer.model": storage.read_bytes(tokenizer_url),
        "tokenizer_config.json": json.dumps(cfg, indent=2).encode(),
        "special_tokens_map.json": json.dumps(special, indent=2).encode(),
    }


def save_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, url: str, tokenizer: str | None = None,
            dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES,
            lineage: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> None:
    """Write a LlamaForCausalLM directory at `url` (local or s3://): config, generation config, weights, the
    tokenizer when given, and `kubellama.json` with the lineage (config hash, data hash, parent checkpoint, step).
    `config` adds or replaces config.json keys (another architecture: a reward model's classifier head). The folder
    gets its `_COMPLETE` marker last."""
    storage.remove(storage.join(url, storage.COMPLETE))
    # An earlier export here may have been sharded differently; its index would point readers at old weights.
    for old in storage.glob(storage.join(url, "model*.safetensors*")):
        storage.remove(old)
    tensors = {to_hf_key(k): (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in state_dict.items()}
    dtype = dtype or next(iter(tensors.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        storage.write_bytes(storage.join(url, "model.safetensors"), st_save(shards[0], metadata=meta))
    else:
        index: dict[str, Any] = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                                 "weight_map": {}}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            storage.write_bytes(storage.join(url, name), st_save(shard, metadata=meta))
            index["weight_map"].update({k: name for k in shard})
        storage.write_json(storage.join(url, "model.safetensors.index.json"), index)
    storage.write_json(storage.join(url, "config.json"), {**hf_config(cfg, dtype), **(config or {})})
    storage.write_json(storage.join(url, "generation_config.json"),
                       {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9})
    if tokenizer:
        for name, data in _tokenizer_files(tokenizer).items():
            storage.write_bytes(storage.join(url, name), data)
    if lineage is not None:
        storage.write_json(storage.join(url, LINEAGE), lineage)
    storage.mark_complete(url, {"format": "hf-llama"})


def exported(url: str, lineage: dict[str, Any]) -> bool:
    """True when `url` is a complete export with exactly this lineage (nothing to redo)."""
    path = storage.join(url, LINEAGE)
    return storage.is_complete(url) and storage.exists(path) and storage.read_json(path) == lineage


def _files(url: str) -> list[str]:
    """The safetensors file names of HF directory `url`, each checked to be a plain name inside it."""
    index_url = storage.join(url, "model.safetensors.index.json")
    if storage.exists(index_url):
        index = storage.read_json(index_url)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise trust.Refused(f"{index_url}: no weight_map of tensor names to file names")
        # File names come from the index: `../x` or `s3://other/x` would read weights from somewhere else.
        return sorted({trust.safe_name(name, index_url) for name in weight_map.values()})
    if storage.exists(storage.join(url, "model.safetensors")):
        return ["model.safetensors"]
    raise KubellamaError(f"{url}: no model.safetensors or model.safetensors.index.json (not an HF checkpoint)")


def _read_tensors(url: str) -> dict[str, torch.Tensor]:
    files = _files(url)
    out: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            out.update(st_load(storage.read_bytes(storage.join(url, name))))
        except FileNotFoundError:
            raise KubellamaError(f"{storage.join(url, name)}: missing") from None
        except Exception as exc:  # safetensors' own errors: a truncated or foreign file  # noqa: BLE001
            raise trust.Refused(f"{storage.join(url, name)}: not a safetensors file ({trust.one_line(exc)})") \
                from None
    return out


def read_config(url: str) -> tuple[dict[str, Any], ModelConfig]:
    """config.json of HF directory `url`, and our model config from it; anything else is one line."""
    config_url = storage.join(url, "config.json")
    if not storage.exists(config_url):
        raise KubellamaError(f"{url}: no config.json (not a checkpoint directory)")
    try:
        hf = storage.read_json(config_url)
        return hf, model_config_from_hf(hf)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise KubellamaError(f"{config_url}: not a Llama config ({trust.one_line(exc)})") from None


def load_hf(url: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> tuple[Llama, ModelConfig, str | None]:
    """Load an HF Llama directory (ours or transformers'): model, its config, and the tokenizer URL if present."""
    hf, cfg = read_config(url)
    tensors = {from_hf_key(k): v for k, v in _read_tensors(url).items()}
    if "lm_head.weight" not in tensors and hf.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    # Rotary inverse frequencies some exporters store are recomputed here, not loaded.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        model = Llama(cfg)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)[:2]
    except RuntimeError as exc:  # shape mismatches: torch's message is a header line, then one line per tensor
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise KubellamaError(f"{url}: weights do not match config.json ({detail})") from None
    if missing or unexpected:
        raise KubellamaError(f"{url}: weights do not match config.json (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    tok = storage.join(url, "tokenizer.model")
    return model.eval(), cfg, (tok if storage.exists(tok) else None)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32}


def _headers(url: str) -> dict[str, tuple[str, dict[str, Any], int]]:
    """HF key -> (file URL, safetensors entry, offset of the file's data section), reading headers only."""
    files = _files(url)
    out: dict[str, tuple[str, dict[str, Any], int]] = {}
    for name in files:
        path = storage.join(url, name)
        fs, p = storage.filesystem(path)
        try:
            size = fs.size(p)
            (n,) = struct.unpack("<Q", fs.cat_file(p, start=0, end=8))
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} past the file's {size} bytes")
            header = json.loads(fs.cat_file(p, start=8, end=8 + n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                _check_entry(key, info, size - 8 - n)
        except FileNotFoundError:
            raise KubellamaError(f"{path}: missing") from None
        except (struct.error, ValueError, TypeError, AttributeError, KeyError) as exc:
            raise trust.Refused(f"{path}: not a safetensors file ({trust.one_line(exc)})") from None
        out.update({k: (path, v, 8 + n) for k, v in header.items()})
    return out


def _check_entry(key: str, info: Any, data_size: int) -> None:
    """A header entry must describe a tensor of a known dtype whose bytes lie inside the file's data section:
    ranged reads trust these numbers."""
    if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
        raise ValueError(f"tensor {key!r}: unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {key!r}: bad shape or data_offsets")
    width = _ST_DTYPES[info["dtype"]].itemsize
    begin, end = offsets
    if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * width:
        raise ValueError(f"tensor {key!r}: data_offsets {offsets} do not fit its shape or the file")


def read_into(url: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Fill `state` (our names; plain tensors or dim-0-sharded DTensors, as FSDP2 makes them) from the HF Llama
    directory `url` with one ranged read per tensor of just this rank's rows, local or s3://. Returns the names
    the directory lacks."""
    headers = _headers(url)
    missing = []
    for name, t in state.items():
        entry = headers.get(to_hf_key(name))
        if entry is None:
            missing.append(name)
            continue
        path, info, base = entry
        if list(info["shape"]) != list(t.shape):
            raise KubellamaError(f"{url}: {to_hf_key(name)} has shape {info['shape']}, the model wants "
                                 f"{list(t.shape)}")
        local, first = t, 0
        if isinstance(t, DTensor):
            local = t.to_local()
            _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            first = offset[0] if len(offset) else 0
        if local.numel() == 0:
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        width = dtype.itemsize
        row = local[0].numel() * width if local.dim() else 0
        begin = base + info["data_offsets"][0] + first * row
        size = local.numel() * width
        fs, p = storage.filesystem(path)
        data = fs.cat_file(p, start=begin, end=begin + size)
        local.copy_(torch.frombuffer(bytearray(data), dtype=dtype).reshape(local.shape))
    return missing
