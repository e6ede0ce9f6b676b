"""Token shards: blocks per rank, contiguous reads, resume across world sizes, local and S3 alike; checksums;
prefetching that resumes where the consumer stopped."""
import time

import numpy as np
import pytest

from kubellama.components.core.data.shards import Prefetcher, ShardReader, ShardWriter
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage


def write(url: str, rows: int = 40, seq_len: int = 8) -> np.ndarray:
    data = np.arange(rows * seq_len, dtype=np.int64).reshape(rows, seq_len) % 60000
    labels = -np.arange(rows * seq_len, dtype=np.int64).reshape(rows, seq_len)
    w = ShardWriter(url, seq_len, vocab_size=60000, shard_rows=7, fields={"labels": "<i4"})
    w.add(data[:13], labels=labels[:13])
    w.add(data[13:], labels=labels[13:])
    w.close(source="test")
    return data


@pytest.mark.parametrize("block", [1, 3])
def test_ranks_read_disjoint_blocks_whose_union_is_the_single_rank_batch(tmp_path, block):
    data = write(str(tmp_path / "s"))
    one = ShardReader(str(tmp_path / "s"), block=2 * block)
    ranks = [ShardReader(str(tmp_path / "s"), rank=r, world_size=2, block=block) for r in range(2)]
    for _ in range(3):
        whole = one.next_batch(2 * block)["tokens"]
        parts = [r.next_batch(block)["tokens"] for r in ranks]
        assert sorted(map(tuple, np.concatenate(parts))) == sorted(map(tuple, whole))
        assert not set(map(tuple, parts[0])) & set(map(tuple, parts[1]))
    assert set(map(tuple, whole)) <= set(map(tuple, data))


def test_shards_are_cut_at_shard_rows_with_checksums_of_their_bytes(tmp_path):
    import hashlib

    write(str(tmp_path / "s"))
    manifest = storage.read_json(str(tmp_path / "s" / "manifest.json"))
    assert [s["rows"] for s in manifest["shards"]] == [7] * 5 + [5]
    assert manifest["rows"] == 40 and manifest["tokens"] == 320 and manifest["source"] == "test"
    for s in manifest["shards"]:
        data = (tmp_path / "s" / f"{s['name']}.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["rows"] * 8 * 2


def test_side_arrays_stay_aligned_across_shard_boundaries(tmp_path):
    data = write(str(tmp_path / "s"))
    batch = ShardReader(str(tmp_path / "s"), block=10).next_batch(10)
    assert np.array_equal(batch["tokens"], data[:10])
    assert np.array_equal(batch["labels"], -np.arange(80).reshape(10, 8))


def test_resume_on_another_world_size_continues_the_global_stream(tmp_path):
    write(str(tmp_path / "s"))
    two = [ShardReader(str(tmp_path / "s"), rank=r, world_size=2, block=2) for r in range(2)]
    for r in two:
        r.next_batch(4)
    one = ShardReader(str(tmp_path / "s"), block=4)
    one.load_state_dict(two[0].state_dict())
    fresh = ShardReader(str(tmp_path / "s"), block=4)
    fresh.next_batch(8)
    assert np.array_equal(one.next_batch(4)["tokens"], fresh.next_batch(4)["tokens"])


def test_s3_reads_equal_local_reads(tmp_path, s3_bucket):
    write(str(tmp_path / "s"))
    storage.put_dir(str(tmp_path / "s"), f"{s3_bucket}/s")
    local = ShardReader(str(tmp_path / "s"), rank=1, world_size=2, block=3)
    remote = ShardReader(f"{s3_bucket}/s", rank=1, world_size=2, block=3)
    for _ in range(4):
        a, b = local.next_batch(3), remote.next_batch(3)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_incomplete_shard_set_is_refused(tmp_path):
    w = ShardWriter(str(tmp_path / "s"), 8, vocab_size=100)
    w.add(np.zeros((3, 8)))
    with pytest.raises(KubellamaError, match="incomplete"):
        ShardReader(str(tmp_path / "s"))


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_shard_is_refused_when_first_touched_and_shards_not_reached_are_not_read(tmp_path):
    write(str(tmp_path / "s"))  # shards of 7 rows
    flip_byte(tmp_path / "s" / "shard_00002.bin")
    reader = ShardReader(str(tmp_path / "s"), block=7)
    reader.next_batch(7)
    reader.next_batch(7)  # shards 0 and 1: fine, shard 2 not read yet
    with pytest.raises(KubellamaError) as err:
        reader.next_batch(7)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "s" / "shard_00002.bin") in msg and "sha256" in msg
    # Unverified reading is there for whoever wants it.
    unchecked = ShardReader(str(tmp_path / "s"), block=7, verify=False, position=14)
    assert unchecked.next_batch(7)["tokens"].shape == (7, 8)


def test_each_shard_is_hashed_once_per_reader(tmp_path):
    data = write(str(tmp_path / "s"))
    reader = ShardReader(str(tmp_path / "s"), block=2)
    assert np.array_equal(reader.next_batch(2)["tokens"], data[:2])
    # A later change to a verified shard goes unnoticed by this reader: it does not hash the shard on every read.
    flip_byte(tmp_path / "s" / "shard_00000.bin")
    reader.next_batch(2)
    with pytest.raises(KubellamaError, match="shard_00000"):
        ShardReader(str(tmp_path / "s"), block=2).next_batch(2)


def test_a_corrupt_shard_on_s3_is_refused_naming_its_url(tmp_path, s3_bucket):
    write(str(tmp_path / "s"))
    flip_byte(tmp_path / "s" / "shard_00001.bin")
    storage.put_dir(str(tmp_path / "s"), f"{s3_bucket}/s")
    reader = ShardReader(f"{s3_bucket}/s", block=7)
    reader.next_batch(7)
    with pytest.raises(KubellamaError, match=f"{s3_bucket}/s/shard_00001.bin: sha256"):
        reader.next_batch(7)


def test_prefetched_batches_equal_the_bare_readers_in_order_whatever_the_row_count(tmp_path):
    write(str(tmp_path / "s"))
    bare = ShardReader(str(tmp_path / "s"), rank=1, world_size=2, block=2)
    with Prefetcher(ShardReader(str(tmp_path / "s"), rank=1, world_size=2, block=2), depth=3) as ahead:
        assert ahead.seq_len == bare.seq_len
        for rows in [2, 2, 2, 4, 4, 2, 2, 2, 2, 2]:  # 24 rows: past the 20 of this rank, into the next epoch
            a, b = ahead.next_batch(rows), bare.next_batch(rows)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert ahead.state_dict() == bare.state_dict()


def wait_until(cond, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_state_is_the_position_of_batches_handed_out_not_of_the_read_ahead(tmp_path):
    write(str(tmp_path / "s"))
    ahead = Prefetcher(ShardReader(str(tmp_path / "s"), block=3), depth=2)
    for _ in range(3):
        ahead.next_batch(3)
    # The thread reads at least `depth` batches past the third (one more waits to be queued).
    wait_until(lambda: ahead.source.position >= 15)
    state = ahead.state_dict()
    assert state["position"] == 9

    bare = ShardReader(str(tmp_path / "s"), block=3)
    for _ in range(3):
        bare.next_batch(3)
    expected = bare.next_batch(3)["tokens"]
    resumed = Prefetcher(ShardReader(str(tmp_path / "s"), block=3))
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.next_batch(3)["tokens"], expected)
    # Loading into a running prefetcher drops its queue: the next batch is again the one after the checkpoint.
    ahead.next_batch(3)
    ahead.load_state_dict(state)
    assert np.array_equal(ahead.next_batch(3)["tokens"], expected)
    for p in (ahead, resumed):
        p.close()
        assert p._thread is None and p.source.position == p.state_dict()["position"]


def test_an_error_in_the_thread_is_raised_by_the_call_that_reaches_it(tmp_path):
    data = write(str(tmp_path / "s"))
    flip_byte(tmp_path / "s" / "shard_00001.bin")
    ahead = Prefetcher(ShardReader(str(tmp_path / "s"), block=7), depth=2)
    assert np.array_equal(ahead.next_batch(7)["tokens"], data[:7])  # the thread goes on to fail on shard 1
    for _ in range(2):  # and retrying reads shard 1 again
        with pytest.raises(KubellamaError, match="shard_00001.bin: sha256"):
            ahead.next_batch(7)
        assert ahead.state_dict()["position"] == 7
    ahead.close()
