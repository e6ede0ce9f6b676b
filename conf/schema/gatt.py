from dataclasses import dataclass, field

from kubellama.conf.schema.sft import SFT_VOLATILE, SftTrainConfig


@dataclass
class GattConfig(SftTrainConfig):
    """Ghost Attention (paper §3.3): a synthetic instruction appended to every user turn of a dialog, answers taken
    or sampled with it, then the instruction kept in the first user turn only and the loss zeroed on every token of
    earlier turns. Fine-tuned with the SFT body and its §3.1 defaults."""

    # Instruction families (components/gatt/families.py). The default ones are enforceable: a function checks an
    # answer and rewrites a given one to comply, standing in for the paper's hobby / language / figure, which only
    # a model can answer: first_word ("Begin every answer with the word W"), end_word ("End every answer with the
    # word W"), code (a language-like code: every word gets the suffix K) and caps. The paper's hobby, language,
    # figure and combo (two of them at once) need answers=sample: with given answers they would train answers that
    # ignore the instruction, so they are a config error there.
    families: list[str] = field(default_factory=lambda: ["first_word", "end_word", "code", "caps"])
    # Each valued family's training values, and held-out values (disjoint; the adherence eval's new instructions,
    # never seen in training). Many training values, so that a model learns to copy the value from the instruction
    # rather than to recall a few memorised ones.
    first_words: list[str] = field(default_factory=lambda: [
        "Indeed", "Certainly", "Absolutely", "Sure", "Well", "Okay", "Alright", "Right", "Now", "So", "Then", "Also",
        "time", "year", "city", "world", "music", "game", "river", "house", "school", "family", "history", "water",
        "story", "party", "north", "light", "power", "money", "paper", "market"])
    # first_word's held-out values (the adherence eval's only).
    heldout_first_words: list[str] = field(default_factory=lambda: ["Yes", "Hello", "Listen", "Look", "island",
                                                                    "garden", "village", "winter"])
    # end_word's training values.
    end_words: list[str] = field(default_factory=lambda: [
        "Amen", "Done", "Cheers", "Over", "Peace", "Thanks", "south", "field", "church", "station", "road", "club",
        "film", "book", "team", "band", "army", "song", "bridge", "lake"])
    # end_word's held-out values (the adherence eval's only).
    heldout_end_words: list[str] = field(default_factory=lambda: ["Bye", "Enough", "Finished", "forest", "engine"])
    # code's training values: the suffix every word of an answer gets.
    codes: list[str] = field(default_factory=lambda: ["zo", "ka", "mi", "lu", "po", "te", "ni", "su", "ga", "ri",
                                                      "do", "fe"])
    # code's held-out values (the adherence eval's only).
    heldout_codes: list[str] = field(default_factory=lambda: ["ve", "ra", "bo"])
    # "given": the dialog's own answers, rewritten by each family's rule to comply (standing in for the paper's
    # RLHF model that follows an instruction present in every turn); "sample": answers sampled from `init` with
    # the instruction in every user turn, dialogs failing a checkable instruction dropped.
    answers: str = "given"
    # answers=sample: sampling temperature of the answers (0: greedy).
    temperature: float = 0.7
    # answers=sample: nucleus top-p of the answers.
    top_p: float = 0.9
    # answers=sample: tokens generated at most per answer.
    max_new_tokens: int = 256
    # Dialogs with fewer turns are skipped; 0 dialogs limit: all of them.
    min_turns: int = 2
    # Instructed dialogs per split (train, eval) at most, from the long enough ones (0: all).
    max_dialogs: int = 0
    # Cut every message to this many characters at a word boundary (0: whole), for small-context models.
    message_chars: int = 0
    # Which answers of an instructed dialog carry the loss: "last" (the paper: every earlier turn's tokens zeroed) or
    # "all" (every answer, the instruction still in the first user turn only). With given answers every answer
    # already follows the instruction, so "all" trains the same behaviour with a signal per turn rather than per
    # dialog: a small model learns to look back at the first turn in far fewer steps.
    train_turns: str = "last"
    # Share of the set made of plain dialogs (no instruction, every answer trained, drawn from data prep's SFT
    # dialogs of any length): they keep what SFT taught (task answers, refusals) and show the model what an
    # uninstructed dialog looks like, the contrast the adherence eval's control measures. 0: instructed dialogs only.
    plain_share: float = 0.0
    # Instruction-adherence eval (Table 30's spirit): long dialogs of held-out prompts, the model's own answers fed
    # back, a checkable instruction in the first user turn only; the share of answers that follow it at these turns.
    eval_turns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 20])
    # Held-out dialogs of the adherence eval.
    eval_dialogs: int = 50
    # Tokens generated at most per answer in the adherence eval.
    eval_max_new_tokens: int = 64
    # Sampling temperature of the adherence eval's answers (0: greedy).
    eval_temperature: float = 0.0


# The held-out values are the eval's only: changing them does not change what is trained.
GATT_VOLATILE = SFT_VOLATILE + ("eval_turns", "eval_dialogs", "eval_max_new_tokens", "eval_temperature",
                                "heldout_first_words", "heldout_end_words", "heldout_codes")
