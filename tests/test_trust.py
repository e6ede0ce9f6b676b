"""The trust boundary: a checkpoint, manifest, index or archive from storage cannot run code, point a reader outside
its folder, or end in a traceback. Every refusal is one line (exit status 2 from the CLI) and writes nothing."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
import zipfile

import pytest
import torch
from test_trainer_support import MODEL, OVERRIDES, model_cfg, train_cfg, write_shards
from torch.distributed.checkpoint.filesystem import _StorageInfo

from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage, trust
from kubellama.components.core.model import hf
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.train.loss import causal_lm_loss
from kubellama.components.core.train.trainer import Trainer
from kubellama.components.data_prep import samples
from kubellama.pipelines.cli import main as cli

MODEL_OVERRIDES = [f"model.{k}={v}" for k, v in MODEL.items()]


class Payload:
    """What an attacker plants: unpickling it runs code, here creating the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def payload(marker: str) -> bytes:
    data = pickle.dumps(Payload(marker))
    # The control: a plain unpickler does run it, so a test that sees no marker saw a refusal, not a dud.
    probe = marker + ".probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert os.path.exists(probe)
    os.remove(probe)
    return data


def trainer(data: str, out: str, steps: int) -> Trainer:
    return Trainer(train_cfg(max_steps=steps, ckpt_every=steps), model_cfg(), out, ShardReader(data),
                   loss_fn=causal_lm_loss, env=dist.init())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    """(shards, run output) of a 2-step run: a real checkpoint with model, optimizer and RNG state."""
    root = tmp_path_factory.mktemp("trained")
    data = write_shards(str(root / "data"))
    trainer(data, str(root / "run"), 2).fit()
    return data, str(root / "run")


@pytest.fixture
def run(trained, tmp_path) -> tuple[str, str, str]:
    """A fresh copy of the trained run: (shards, run output, its checkpoint)."""
    data, src = trained
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    return data, out, checkpoint.folder(os.path.join(out, "checkpoints"), 2)


def files(root: str) -> dict[str, float]:
    return {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(root) for f in fs}


def one_line_refusal(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("kubellama: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_real_checkpoints_load_through_the_safe_reader(run):
    data, out, ckpt = run
    resumed = trainer(data, out, 3)
    assert resumed.resume() and resumed.step == 2
    model = checkpoint.load_model(ckpt, model_cfg())
    assert torch.equal(model.state_dict()["norm.weight"], resumed.full_state_dict()["norm.weight"])


def test_planted_metadata_pickle_is_refused_on_resume_init_export_and_generate(run, tmp_path, capsys):
    data, out, ckpt = run
    marker = str(tmp_path / "pwned")
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(payload(marker))
    before = files(out)

    # (a) resume, through Trainer.fit -> Trainer.load -> checkpoint.load
    with pytest.raises(trust.Refused) as exc:
        trainer(data, out, 4).fit()
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(os.path.join(ckpt, ".metadata")) and "builtins.exec" in msg
    # (c) what a stage's `init` loads
    with pytest.raises(trust.Refused, match=r"\.metadata: refused to unpickle 'builtins\.exec'"):
        checkpoint.load_model(ckpt, model_cfg())
    # (b) the CLI: one line, exit 2, no output folder
    hf_out = str(tmp_path / "hf")
    code = cli(["export-hf", "--checkpoint", ckpt, "--out", hf_out, *MODEL_OVERRIDES])
    assert "builtins.exec" in one_line_refusal(capsys, code)
    assert not os.path.exists(hf_out)
    code = cli(["generate", "--checkpoint", ckpt, "--prompt-ids", "1,5", "--max-new-tokens", "2", *MODEL_OVERRIDES])
    assert "builtins.exec" in one_line_refusal(capsys, code)

    assert not os.path.exists(marker)
    assert files(out) == before


def test_planted_metadata_pickle_is_refused_as_a_stage_init(run, tmp_path, capsys):
    """`<stage>.init` pointing at a poisoned checkpoint: the trainer and the stage's CLI refuse it in one line."""
    data, _out, ckpt = run
    marker = str(tmp_path / "pwned")
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(payload(marker))
    with pytest.raises(trust.Refused, match=r"\.metadata: refused to unpickle 'builtins\.exec'"):
        Trainer(train_cfg(max_steps=1), model_cfg(), str(tmp_path / "t"), ShardReader(data), loss_fn=causal_lm_loss,
                env=dist.init(), init=ckpt)
    root, shards = tmp_path / "root", tmp_path / "d"
    write_shards(str(shards / "pretrain"))
    code = cli(["pretrain", *OVERRIDES, f"run.root={root}", "run.id=t", f"data.output={shards}",
                f"pretrain.data={shards}", f"pretrain.init={ckpt}", "pretrain.max_steps=1"])
    assert "builtins.exec" in one_line_refusal(capsys, code)
    assert not os.path.exists(marker)
    assert not os.path.exists(root / "t" / "pretrain" / "checkpoints")
    assert not os.path.exists(root / "t" / "pretrain" / "hf")


def _rewrite_metadata(ckpt: str, edit) -> None:
    # The file is our own, written by the run above: a plain unpickler is fine here.
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def test_planted_optimizer_value_pickle_is_refused(run, tmp_path):
    """DCP unpickles non-tensor state (optimizer hyperparameters) with torch.load(weights_only=False)."""
    data, out, ckpt = run
    marker = str(tmp_path / "pwned")
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    evil = buf.getvalue()
    with pytest.raises(pickle.UnpicklingError):  # what the safe path does with it
        torch.load(io.BytesIO(evil), weights_only=True)
    shard = os.path.join(ckpt, "__0_0.distcp")
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(evil)

    def point_lr_at_payload(md) -> None:
        key = next(k for k in md.storage_data if k.fqn == "optim.param_groups.0.lr")
        md.storage_data[key] = _StorageInfo("__0_0.distcp", offset, len(evil))

    _rewrite_metadata(ckpt, point_lr_at_payload)
    with pytest.raises(trust.Refused) as exc:
        trainer(data, out, 4).fit()
    assert "'optim.param_groups.0.lr' is not plain data" in str(exc.value) and "\n" not in str(exc.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name", ["../x", "s3://other/x", "/etc/passwd"])
def test_metadata_file_names_outside_the_checkpoint_are_refused(run, name):
    _, _, ckpt = run

    def redirect(md) -> None:
        key = next(iter(md.storage_data))
        md.storage_data[key] = _StorageInfo(name, 0, 8)

    _rewrite_metadata(ckpt, redirect)
    with pytest.raises(trust.Refused, match=rf"\.metadata: refused file name '{name}'"):
        checkpoint.load_model(ckpt, model_cfg())


def test_tampered_rng_and_trainer_state_are_refused(run):
    data, out, ckpt = run
    with open(os.path.join(ckpt, "rng_0.pt"), "wb") as f:
        f.write(payload(os.path.join(out, "pwned")))
    with pytest.raises(trust.Refused, match=r"rng_0\.pt: not an RNG state"):
        trainer(data, out, 4).fit()
    storage.write_text(os.path.join(ckpt, "trainer.json"), "{not json")
    with pytest.raises(KubellamaError, match=r"trainer\.json: not valid JSON"):
        trainer(data, out, 4).fit()
    for bad, error in (([1, 2], "a list, not an object"), ({"world_size": 1}, "no step"),
                       ({"step": 2, "scheduler": "x"}, "'scheduler' is not an object")):
        storage.write_json(os.path.join(ckpt, "trainer.json"), bad)
        with pytest.raises(trust.Refused, match=rf"trainer\.json: not a trainer state \({error}\)"):
            trainer(data, out, 4).fit()
    assert not os.path.exists(os.path.join(out, "pwned"))


def test_planted_metadata_is_refused_on_s3(run, tmp_path, s3_bucket):
    _, _, ckpt = run
    marker = str(tmp_path / "pwned")
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(payload(marker))
    remote = f"{s3_bucket}/ckpt"
    storage.put_dir(ckpt, remote)
    with pytest.raises(trust.Refused, match=rf"^{remote}/\.metadata: refused to unpickle 'builtins\.exec'"):
        checkpoint.load_model(remote, model_cfg())
    assert not os.path.exists(marker)


BAD_NAMES = ["../x", "s3://other/x", "/etc/passwd", "a\\..\\x", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_shard_manifest_names_outside_the_folder_are_refused(tmp_path, name):
    url = write_shards(str(tmp_path / "s"))
    manifest = storage.read_json(str(tmp_path / "s" / "manifest.json"))
    manifest["shards"][1]["name"] = name
    storage.write_json(str(tmp_path / "s" / "manifest.json"), manifest)
    with pytest.raises(trust.Refused) as exc:
        ShardReader(url)
    assert str(exc.value) == (f"{tmp_path / 's' / 'manifest.json'}: refused file name {name!r} (only a plain file "
                              f"name in the same folder is allowed)")


@pytest.mark.parametrize("edit,error", [
    (lambda m: m.update(fields={"../../x": "<i4"}), "refused file name 'shard_00000.../../x.bin'"),
    (lambda m: m.update(dtype="O"), "dtype 'O' is not one of"),
    (lambda m: m["shards"][0].update(rows="7"), "needs a name and a row count"),
    (lambda m: m.update(seq_len=-1), "seq_len -1 is not a positive integer"),
])
def test_shard_manifest_fields_and_types_are_checked(tmp_path, edit, error):
    url = write_shards(str(tmp_path / "s"))
    manifest = storage.read_json(str(tmp_path / "s" / "manifest.json"))
    edit(manifest)
    storage.write_json(str(tmp_path / "s" / "manifest.json"), manifest)
    with pytest.raises(trust.Refused, match=error.replace("(", r"\(").replace(".", r"\.")):
        ShardReader(url)


def _sharded_hf(folder: str) -> str:
    cfg = model_cfg()
    hf.save_hf(Llama(cfg).state_dict(), cfg, folder, shard_bytes=20_000)
    assert storage.exists(os.path.join(folder, "model.safetensors.index.json"))
    return folder


def _poisoned_index(folder: str, name: str) -> str:
    """A sharded HF directory whose index sends lm_head.weight to file `name`; returns the index URL."""
    _sharded_hf(folder)
    index_url = os.path.join(folder, "model.safetensors.index.json")
    index = storage.read_json(index_url)
    index["weight_map"]["lm_head.weight"] = name
    storage.write_json(index_url, index)
    return index_url


def _empty_model() -> Llama:
    with torch.device("meta"):
        model = Llama(model_cfg())
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_hf_index_names_outside_the_folder_are_refused(tmp_path, name):
    """Both readers of an HF directory: the whole-file one (export-hf, generate) and the sharded `<stage>.init` one,
    which reads only this rank's rows through the index."""
    folder = str(tmp_path / "hf")
    index_url = _poisoned_index(folder, name)
    with pytest.raises(trust.Refused, match=f"^{index_url}: refused file name"):
        hf.load_hf(folder)
    with pytest.raises(trust.Refused, match=f"^{index_url}: refused file name"):
        checkpoint.load_weights(_empty_model(), folder)


@pytest.mark.parametrize("edit,error", [
    (lambda h: h["model.norm.weight"].update(data_offsets=[0, 10 ** 12]), "do not fit its shape or the file"),
    (lambda h: h["model.norm.weight"].update(dtype="OBJ"), "unknown dtype 'OBJ'"),
    (lambda h: h["model.norm.weight"].update(shape="x"), "bad shape or data_offsets"),
])
def test_safetensors_headers_that_point_past_the_data_are_refused(tmp_path, edit, error):
    """Sharded reads trust the header's offsets: they must fit the tensor and the file."""
    import struct

    cfg = model_cfg()
    folder = str(tmp_path / "hf")
    hf.save_hf(Llama(cfg).state_dict(), cfg, folder)
    path = os.path.join(folder, "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    with pytest.raises(trust.Refused, match=f"^{path}: not a safetensors file .*{error}"):
        checkpoint.load_weights(_empty_model(), folder)


def test_hf_index_refusal_from_the_cli(tmp_path, capsys):
    folder = str(tmp_path / "hf")
    _poisoned_index(folder, "/etc/passwd")
    out = str(tmp_path / "out")
    assert "refused file name '/etc/passwd'" in one_line_refusal(
        capsys, cli(["export-hf", "--checkpoint", folder, "--out", out]))
    assert not os.path.exists(out)


@pytest.mark.parametrize("file,content,error", [
    ("tokenizer.model", b"not a model", "tokenizer.model: not a SentencePiece model"),
    ("model-00001-of-", b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated", "not a safetensors file"),
    ("config.json", b'{"model_type": "llama"}', "config.json: not a Llama config"),
    ("config.json", b"{", "config.json: not valid JSON"),
])
def test_other_hf_files_that_are_not_what_they_claim_are_one_line(tmp_path, capsys, file, content, error):
    folder = _sharded_hf(str(tmp_path / "hf"))
    file = next((n for n in sorted(os.listdir(folder)) if n.startswith(file)), file)
    with open(os.path.join(folder, file), "wb") as f:
        f.write(content)
    code = cli(["generate", "--checkpoint", folder, "--prompt-ids", "1,5", "--max-new-tokens", "1"])
    assert error in one_line_refusal(capsys, code)


def test_resolved_config_is_safe_yaml_and_bad_yaml_is_one_line(tmp_path, capsys):
    from kubellama.components.core.recipe.config import load_resolved

    marker = tmp_path / "pwned"
    path = tmp_path / "config.yaml"
    path.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(KubellamaError, match="config.yaml: not valid YAML"):
        load_resolved(str(path))
    assert not marker.exists()
    path.write_text("run: [1\n")
    code = cli(["pretrain", "--config", str(path), "--dryrun"])
    assert "config.yaml: not valid YAML" in one_line_refusal(capsys, code)


def test_safe_name_takes_plain_names_only():
    for ok in ["shard_00000.bin", "model-00001-of-00002.safetensors", "__0_0.distcp", "..x", "a..b"]:
        assert trust.safe_name(ok, "f") == ok
    for bad in [*BAD_NAMES, ".", "..", "C:x", "a/b", "x\x00", None, 3, ["a"]]:
        with pytest.raises(trust.Refused):
            trust.safe_name(bad, "f")


# --- sample archives ----------------------------------------------------------------------------------------------

def test_sample_archive_with_another_sha256_is_refused_and_nothing_extracted(tmp_path, monkeypatch, capsys):
    """A real pip run, offline: the index is a folder holding an archive that is not the pinned one."""
    index = tmp_path / "index"
    index.mkdir()
    with tarfile.open(index / "llamafactory-0.9.5.tar.gz", "w:gz") as tar:
        data = b"[]"
        info = tarfile.TarInfo("llamafactory-0.9.5/data/alpaca_en_demo.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    dest = str(tmp_path / "samples")
    err = one_line_refusal(capsys, samples.main(["fetch-samples", "--dest", dest]))
    assert f"is not the pinned {samples.PACKAGES[0].sha256}" in err and "llamafactory==0.9.5" in err
    assert os.listdir(dest) == []


def _pkg(sdist: bool) -> samples.Package:
    return samples.Package("p", "p==1", sdist, "0" * 64, (("*/data/*.json", ""),))


def _tar(path: str, members: list[tarfile.TarInfo]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(b"{}") if m.isfile() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 2
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member,error", [
    (_file("p-1/../../data/x.json"), "climbs out of the archive"),
    (_file("/tmp/data/x.json"), "has an absolute path"),
    (_link("p-1/data/x.json", "../../../etc/passwd"), "outside the archive"),
    (_link("p-1/data/y.json", "/etc/passwd"), "has an absolute path"),
    (_link("p-1/data/z.json", "../../../x", tarfile.LNKTYPE), "climbs out of the archive"),
])
def test_tar_member_escaping_the_target_is_refused(tmp_path, member, error):
    archive = _tar(str(tmp_path / "p-1.tar.gz"), [_file("p-1/data/ok.json"), _link("p-1/README", "docs/README.md"),
                                                  member])
    dest = str(tmp_path / "dest")
    with pytest.raises(trust.Refused, match=error):
        samples.extract(archive, _pkg(True), dest)
    assert not os.path.exists(dest)


@pytest.mark.parametrize("name,link", [("../data/x.json", None), ("/data/x.json", None),
                                       ("p/data/x.json", "../../../../etc/passwd")])
def test_zip_member_escaping_the_target_is_refused(tmp_path, name, link):
    archive = str(tmp_path / "p-1-py3-none-any.whl")
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("p/data/ok.json", "{}")
        info = zipfile.ZipInfo(name)
        if link is not None:
            info.external_attr = (0o120777 << 16)  # a symbolic link: the entry's bytes are its target
        z.writestr(info, link or "{}")
    dest = str(tmp_path / "dest")
    with pytest.raises(trust.Refused):
        samples.extract(archive, _pkg(False), dest)
    assert not os.path.exists(dest)


def test_links_inside_the_archive_are_fine_and_never_followed(tmp_path):
    archive = _tar(str(tmp_path / "p-1.tar.gz"), [_file("p-1/data/ok.json"), _link("p-1/data/l.json", "ok.json")])
    written = samples.extract(archive, _pkg(True), str(tmp_path / "dest"))
    assert [os.path.relpath(w, tmp_path) for w in written] == [os.path.join("dest", "p", "ok.json")]
    assert json.loads(open(written[0]).read()) == {}
    assert not any(os.path.islink(w) for w in written)


def test_a_manifest_cannot_pull_an_outside_file_into_the_export(tmp_path, capsys):
    """The manifest's `tokenizer` URL is not followed: its bytes would be copied into this run's HF export."""
    secret = tmp_path / "elsewhere" / "secret.model"
    secret.parent.mkdir()
    secret.write_bytes(b"not for this run")
    shards = tmp_path / "d"
    write_shards(str(shards / "pretrain"))
    manifest_url = str(shards / "pretrain" / "manifest.json")
    storage.write_json(manifest_url, {**storage.read_json(manifest_url), "tokenizer": str(secret)})
    root = tmp_path / "root"
    assert cli(["pretrain", *OVERRIDES, f"run.root={root}", "run.id=t", f"data.output={shards}",
                f"pretrain.data={shards}", "pretrain.max_steps=1"]) == 0
    hf_dir = root / "t" / "pretrain" / "hf"
    assert (hf_dir / "model.safetensors").exists()
    assert not (hf_dir / "tokenizer.model").exists()


def test_planted_tensor_pickle_names_the_file_as_untrusted(run, tmp_path):
    """A pickle in a `.distcp` tensor slot: DCP loads tensors weights-only, which refuses it; the refusal names the
    file and says why (untrusted content), not "checkpoint does not match model"."""
    data, out, ckpt = run
    marker = str(tmp_path / "pwned")
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    evil = buf.getvalue()
    shard = os.path.join(ckpt, "__0_0.distcp")
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(evil)

    def point_a_weight_at_payload(md) -> None:
        key = next(k for k in md.storage_data if k.fqn.startswith("model.") and k.fqn.endswith("weight"))
        md.storage_data[key] = _StorageInfo("__0_0.distcp", offset, len(evil))

    _rewrite_metadata(ckpt, point_a_weight_at_payload)
    for load in (lambda: trainer(data, out, 4).fit(), lambda: checkpoint.load_model(ckpt, model_cfg())):
        with pytest.raises(trust.Refused) as exc:
            load()
        msg = str(exc.value)
        assert msg.startswith(shard + ":") and "untrusted" in msg and "\n" not in msg, msg
        assert "does not match model" not in msg and "a pickle of 'exec'" in msg
    assert not os.path.exists(marker)
