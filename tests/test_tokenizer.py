"""The trained tokenizer: Llama settings in its proto, exact round trip of any text, the Llama 2 chat format."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubellama.components.core.data.tokenizer import IGNORE, Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.data_prep.pack import model_flags, train_tokenizer

WORDS = ["alpha", "river", "stone", "quiet", "north", "garden", "signal", "paper", "winter", "copper", "line",
         "über", "café", "naïve", "日本", "数据", "Москва", "ελλάδα", "the", "and", "of", "model", "token"]


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) if rng.random() > 0.1 else str(rng.randint(0, 99999))
                     for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(model_bytes=train_tokenizer(_corpus(400), vocab_size=400))


def test_trained_model_has_llama_settings(tok: Tokenizer) -> None:
    flags = model_flags(tok.model_bytes)
    assert flags["model_type"] == "bpe"
    assert flags["split_digits"] and flags["byte_fallback"]
    assert flags["normalization"] == "identity"
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (0, 1, 2, -1)
    assert tok.vocab_size == 400
    # Byte pieces cover every byte value, so nothing is ever unknown.
    assert all(tok.sp.piece_to_id(f"<0x{b:02X}>") != 0 for b in range(256))


def test_digits_are_split(tok: Tokenizer) -> None:
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("river 20231 and 42", bos=False)]
    digits = [p.lstrip("\u2581") for p in pieces if any(c.isdigit() for c in p) and not p.startswith("<0x")]
    assert digits == list("2023142")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_round_trip_any_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert 0 not in ids  # byte fallback: no <unk>
    assert tok.decode(ids) == text


def test_round_trip_of_the_whitespace_symbol(tok: Tokenizer) -> None:
    for text in ["\u2581", "a\u2581b", " \u2581 x\u2581", "\u2581\u2581"]:
        assert tok.decode(tok.encode(text)) == text


def test_batch_encoding_matches_single(tok: Tokenizer) -> None:
    texts = _corpus(20, seed=3) + ["x\u2581y", ""]
    assert tok.encode_batch(texts, bos=True, eos=True, num_threads=2) == \
        [tok.encode(t, bos=True, eos=True) for t in texts]


def _runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Contiguous runs of (trained?, token ids)."""
    runs: list[tuple[bool, list[int]]] = []
    for t, lab in zip(ids, labels):
        trained = lab != IGNORE
        if trained:
            assert lab == t
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(t)
        else:
            runs.append((trained, [t]))
    return runs


def test_chat_labels_cover_exactly_the_answers(tok: Tokenizer) -> None:
    dialog = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The north river."},
              {"role": "user", "content": "And a stone?"}, {"role": "assistant", "content": "Copper stone."},
              {"role": "user", "content": "Last one"}, {"role": "assistant", "content": "Winter garden 42."}]
    ids, labels = tok.encode_dialog(dialog)
    runs = _runs(ids, labels)
    prompts = [r for trained, r in runs if not trained]
    answers = [r for trained, r in runs if trained]
    assert [trained for trained, _ in runs] == [False, True] * 3
    assert [tok.decode(p) for p in prompts] == [
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a river. [/INST]", "[INST] And a stone? [/INST]",
        "[INST] Last one [/INST]"]
    assert all(p[0] == tok.bos_id for p in prompts)
    assert [tok.decode(a).strip() for a in answers] == ["The north river.", "Copper stone.", "Winter garden 42."]
    assert all(a[-1] == tok.eos_id for a in answers)
    # Ghost Attention: only the final answer trains.
    _, last = tok.encode_dialog(dialog, last_turn_only=True)
    assert [t for t, lab in zip(ids, last) if lab != IGNORE] == answers[-1]


def test_generation_prompt_ends_after_the_instruction(tok: Tokenizer) -> None:
    dialog = [{"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "North."},
              {"role": "user", "content": "Another?"}]
    ids = tok.encode_dialog_prompt(dialog)
    assert tok.decode(ids).endswith("[INST] Another? [/INST]")
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1


@pytest.mark.parametrize("dialog", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}],
    [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}],
])
def test_bad_dialogs_are_refused(tok: Tokenizer, dialog: list[dict]) -> None:
    with pytest.raises(KubellamaError):
        tok.encode_dialog(dialog)
