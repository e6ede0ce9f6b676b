from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class SourceConfig:
    """One input of the corpus mix: a file, a folder or a glob at any fsspec URL."""

    name: str = ""
    path: str = ""
    # auto picks by extension: .jsonl/.json, .parquet, anything else is plain text.
    format: str = "auto"
    text_field: str = "text"
    # Sampling weight; > 1 up-samples (repeats) a source, as the paper did for factual sources.
    weight: float = 1.0


@dataclass
class CleanConfig:
    normalize: str = "NFC"
    dedup_exact: bool = True
    dedup_near: bool = True
    minhash_perm: int = 128
    minhash_bands: int = 16
    shingle: int = 5
    near_threshold: float = 0.8
    pii: bool = True
    min_chars: int = 32
    max_chars: int = 1_000_000
    min_alpha_ratio: float = 0.5


@dataclass
class TokenizerConfig:
    # An existing tokenizer.model (e.g. Llama 2's own) is used unchanged when given.
    model: Optional[str] = None
    vocab_size: int = "${model.vocab_size}"  # type: ignore[assignment]
    train_chars: int = 50_000_000
    character_coverage: float = 0.99995


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    output: str = "${run.root}/data"
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = "${model.max_seq_len}"  # type: ignore[assignment]
    shard_tokens: int = 100_000_000
    # 0 means every CPU core.
    workers: int = 0
    # The stage fails when more than this fraction of input records is malformed.
    max_error_rate: float = 0.01
