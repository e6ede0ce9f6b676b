from dataclasses import dataclass, field

from kubellama.conf.schema.sft import SFT_VOLATILE, SftTrainConfig


@dataclass
class GattConfig(SftTrainConfig):
    """Ghost Attention (paper §3.3): a synthetic instruction appended to every user turn of a dialog, answers taken
    or sampled with it, then the instruction kept in the first user turn only and the loss zeroed on every token of
    earlier turns. Fine-tuned with the SFT body and its §3.1 defaults."""

    # Instruction families (components/gatt/families.py): the paper's hobby, language, figure and combo (two of
    # them at once), and first_word / caps, which a function can check on any answer.
    families: list[str] = field(default_factory=lambda: ["hobby", "language", "figure", "combo", "first_word"])
    # The words of `first_word` instructions ("Begin every answer with the word W").
    first_words: list[str] = field(default_factory=lambda: ["Indeed", "Certainly", "Absolutely", "Sure", "Well",
                                                            "Okay", "Alright", "Right"])
    # "given": the dialog's own answers (a checkable family rewrites them to comply, standing in for the paper's
    # RLHF model that follows an instruction present in every turn); "sample": answers sampled from `init` with the
    # instruction in every user turn, dialogs failing a checkable instruction dropped.
    answers: str = "given"
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    # Dialogs with fewer turns are skipped; 0 dialogs limit: all of them.
    min_turns: int = 2
    max_dialogs: int = 0
    # Cut every message to this many characters at a word boundary (0: whole), for small-context models.
    message_chars: int = 0
    # Instruction-adherence eval (Table 30's spirit): long dialogs of held-out prompts, the model's own answers fed
    # back, a checkable instruction in the first user turn only; the share of answers that follow it at these turns.
    eval_turns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 20])
    eval_dialogs: int = 50
    eval_max_new_tokens: int = 64
    eval_temperature: float = 0.0


GATT_VOLATILE = SFT_VOLATILE + ("eval_turns", "eval_dialogs", "eval_max_new_tokens", "eval_temperature")
