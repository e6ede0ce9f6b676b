from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Llama 2 shapes (paper §2.2, Table 1). Presets in conf/model/*.yaml; the defaults are the tiny CPU model."""

    name: str = "tiny"
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    # None means n_heads (plain multi-head attention); 70B uses 8 (grouped-query attention).
    n_kv_heads: int | None = 4
    ffn_hidden: int = 688
    vocab_size: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    init_std: float = 0.02
