"""One loader for the tools: an HF Llama directory or a kubellama training checkpoint, told apart by config.json."""
from __future__ import annotations

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.model.hf import load_hf
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.train.checkpoint import latest, load_model
from kubellama.conf.schema import Config
from kubellama.conf.schema.model import ModelConfig


def load_any(url: str, cfg: Config) -> tuple[Llama, ModelConfig, str | None]:
    """An HF directory (model, its config, tokenizer URL), or a training checkpoint of the trainer core consolidated
    to a model of `cfg.model` (no tokenizer)."""
    if storage.exists(storage.join(url, "config.json")):
        return load_hf(url)
    if not storage.is_complete(url) and latest(url) is None:
        raise KubellamaError(f"{url}: neither a Hugging Face checkpoint (no config.json) nor a training checkpoint "
                             f"(no {storage.COMPLETE} marker, no step_* folder)")
    return load_model(url, cfg.model), cfg.model, None
