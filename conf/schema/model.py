from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Llama 2 shapes (paper §2.2, Table 1). Presets in conf/model/*.yaml; the defaults are the tiny CPU model."""

    # The preset's name (conf/model/<name>.yaml), shown by `kubellama plan`.
    name: str = "tiny"
    # Hidden size (embedding width) of the residual stream.
    dim: int = 256
    # Transformer blocks.
    n_layers: int = 4
    # Attention (query) heads; the head size is dim / n_heads.
    n_heads: int = 8
    # None means n_heads (plain multi-head attention); 70B uses 8 (grouped-query attention).
    n_kv_heads: int | None = 4
    # Inner width of each block's SwiGLU MLP (gate/up/down projections).
    ffn_hidden: int = 688
    # Token vocabulary size (§2.2: 32k); data prep trains its tokenizer to it (data.tokenizer.vocab_size).
    vocab_size: int = 2048
    # Epsilon of the RMSNorm layers.
    norm_eps: float = 1e-5
    # Base of the rotary position embedding's frequencies.
    rope_theta: float = 10000.0
    # Context length in tokens (§2.2: 4096); the default sequence length of data prep and training.
    max_seq_len: int = 4096
    # Std of the normal init of random weights (residual outputs: / sqrt(2 n_layers)).
    init_std: float = 0.02
