"""Hugging Face interop both ways, with transformers as the numerical reference."""
import subprocess
import sys

import pytest
import torch

from kubellama.components.core.model.generate import generate
from kubellama.components.core.model.hf import load_hf, save_hf
from kubellama.components.core.model.llama import Llama
from kubellama.conf.schema.model import ModelConfig

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160, vocab_size=211,
                  max_seq_len=128)


def ours() -> Llama:
    torch.manual_seed(0)
    return Llama(CFG).eval()


def test_export_loads_in_transformers_with_all_keys_and_identical_logits(tmp_path):
    model = ours()
    save_hf(model.state_dict(), CFG, str(tmp_path / "hf"))
    hf, info = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randint(0, CFG.vocab_size, (2, 17))
    with torch.no_grad():
        diff = (hf.eval()(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-5


def test_checkpoint_saved_by_transformers_loads_with_identical_logits(tmp_path):
    torch.manual_seed(3)
    hf_cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=211,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    model, cfg, tok = load_hf(str(tmp_path / "hf"))
    assert (cfg.dim, cfg.n_kv_heads, cfg.ffn_hidden) == (64, 2, 160) and tok is None
    x = torch.randint(0, 211, (2, 13))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-5


def test_sharded_export_round_trips(tmp_path):
    model = ours()
    save_hf(model.state_dict(), CFG, str(tmp_path / "hf"), shard_bytes=60_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    loaded, _, _ = load_hf(str(tmp_path / "hf"))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    x = torch.randint(0, CFG.vocab_size, (1, 9))
    with torch.no_grad():
        assert (hf.eval()(x).logits - model(x)).abs().max().item() <= 1e-5


def test_cli_greedy_generation_equals_transformers_generate(tmp_path):
    torch.manual_seed(5)
    hf_cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=211,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    prompt = [1, 37, 99, 5]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                          pad_token_id=0)[0, len(prompt):].tolist()
    if 2 in ref:
        ref = ref[: ref.index(2) + 1]
    out = subprocess.run([sys.executable, "-m", "kubellama.pipelines.cli", "generate", "--checkpoint", str(tmp_path / "hf"),
                          "--prompt-ids", ",".join(map(str, prompt)), "--greedy", "--max-new-tokens", "12", "--ids"],
                         capture_output=True, text=True, check=True)
    assert [int(t) for t in out.stdout.strip().split(",")] == ref
    model, _, _ = load_hf(str(tmp_path / "hf"))
    assert generate(model, [prompt], 12) == [ref]


def test_export_and_load_through_s3(tmp_path, s3_bucket):
    model = ours()
    url = f"{s3_bucket}/models/tiny"
    save_hf(model.state_dict(), CFG, url)
    loaded, cfg, _ = load_hf(url)
    assert cfg.n_layers == CFG.n_layers
    x = torch.randint(0, CFG.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kubellama.pipelines.cli", "generate", "--checkpoint", str(tmp_path),
                          "--prompt-ids", "1,2"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "no config.json" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_export_init_then_generate_ids(tmp_path):
    out_dir = str(tmp_path / "tiny")
    exported = subprocess.run([sys.executable, "-m", "kubellama.pipelines.cli", "export-hf", "--init", "--out", out_dir,
                               "model=tiny"], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    gen = subprocess.run([sys.executable, "-m", "kubellama.pipelines.cli", "generate", "--checkpoint", out_dir,
                          "--prompt-ids", "1,37,99", "--prompt-ids", "1,5", "--max-new-tokens", "5",
                          "generate.seed=3"], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    rows = [[int(t) for t in line.split(",")] for line in gen.stdout.strip().splitlines()]
    assert len(rows) == 2 and all(1 <= len(r) <= 5 and all(0 <= t < 2048 for t in r) for r in rows)


def test_exported_tokenizer_loads_in_transformers_and_encodes_like_ours(tmp_path):
    import sentencepiece as spm

    from kubellama.components.core.data.tokenizer import Tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"The quick brown fox {i} jumps over the lazy dog {i * 7}. façade 東京" for i in range(500)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), model_type="bpe",
                                   vocab_size=350, split_digits=True, byte_fallback=True, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    cfg = ModelConfig(name="t", dim=32, n_layers=1, n_heads=2, n_kv_heads=None, ffn_hidden=64, vocab_size=350)
    save_hf(Llama(cfg).state_dict(), cfg, str(tmp_path / "hf"), tokenizer=str(tmp_path / "tok.model"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = Tokenizer(str(tmp_path / "tok.model"))
    for text in ["Hello world 12345", "façade 東京 ✓ 3.14"]:
        assert theirs(text)["input_ids"] == ours.encode(text)


def test_cli_export_converts_a_training_checkpoint(tmp_path):
    """A DCP training checkpoint (as the trainer core writes it) becomes an HF directory with the same weights."""
    from kubellama.components.core.train import checkpoint, dist

    torch.manual_seed(11)
    cfg = ModelConfig(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160, vocab_size=211,
                      max_seq_len=128)
    model = Llama(cfg)
    root = str(tmp_path / "checkpoints")
    checkpoint.save(root, 5, {"model": model.state_dict()}, {"scheduler": {}, "data": {}}, dist.init(), keep=2).finish()
    out = str(tmp_path / "hf")
    done = subprocess.run([sys.executable, "-m", "kubellama.pipelines.cli", "export-hf", "--checkpoint", root, "--out", out,
                           "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                           "model.ffn_hidden=160", "model.vocab_size=211"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded, _, _ = load_hf(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    wrong = subprocess.run([sys.executable, "-m", "kubellama.pipelines.cli", "export-hf", "--checkpoint", root, "--out", out],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "does not match model" in wrong.stderr
