"""One storage layer for local folders and S3 (moto's real S3 API on loopback)."""
import pytest

from kubellama.components.core.io import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_round_trip_and_listing(root):
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(root, "a", "y.bin"), b"\x00\x01")
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
    assert storage.read_bytes(storage.join(root, "a", "y.bin")) == b"\x00\x01"
    assert storage.listdir(storage.join(root, "a")) == ["x.json", "y.bin"]
    assert storage.listdir(storage.join(root, "missing")) == []
    assert [u.rsplit("/", 1)[-1] for u in storage.glob(storage.join(root, "a", "*.json"))] == ["x.json"]


def test_failed_write_publishes_nothing_and_keeps_the_old_object(root):
    url = storage.join(root, "obj.txt")
    storage.write_text(url, "old")
    with pytest.raises(RuntimeError), storage.atomic_write(url, "wb") as f:
        f.write(b"new but partial")
        raise RuntimeError("crash mid-write")
    assert storage.read_text(url) == "old"
    fresh = storage.join(root, "never.txt")
    with pytest.raises(RuntimeError), storage.atomic_write(fresh, "wb") as f:
        f.write(b"x" * 10)
        raise RuntimeError("crash")
    assert not storage.exists(fresh)
    assert storage.listdir(root) == ["obj.txt"]


def test_folders_are_complete_only_once_marked(root):
    folder = storage.join(root, "ckpt")
    storage.write_bytes(storage.join(folder, "part0"), b"a")
    assert not storage.is_complete(folder)
    storage.mark_complete(folder, {"step": 3})
    assert storage.is_complete(folder)


def test_put_and_get_folders(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "f.txt").write_text("1")
    (src / "sub" / "g.txt").write_text("2")
    storage.put_dir(str(src), storage.join(root, "copy"))
    local = storage.get_dir(storage.join(root, "copy"), str(tmp_path / "back"))
    with open(f"{local}/sub/g.txt") as f:
        assert f.read() == "2"


def test_s3_endpoint_comes_from_the_aws_environment(s3_server):
    opts = storage.storage_options("s3://bucket/x")
    assert opts["client_kwargs"]["endpoint_url"] == s3_server
    assert storage.storage_options("/tmp/x") == {}
