"""The shard format: names, sizes, byte-stable tars, readers (ours, tarfile, webdataset)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset as wds

from w2v_stream import shards


def _meta(utt_id: str, n: int) -> bytes:
    return shards.encode_metadata(
        {
            "id": utt_id,
            "speaker_id": 1,
            "chapter_id": 2,
            "split": "dev-clean",
            "text": "HI",
            "sample_rate": 16000,
            "num_samples": n,
            "duration": n / 16000,
        }
    )


SAMPLES = [
    ("1-2-0000", b"x" * 1000, _meta("1-2-0000", 10), 10),
    ("1-2-0001", b"y" * 513, _meta("1-2-0001", 20), 20),
]


@pytest.mark.parametrize("bad", ["../x", "a/b", "a.b", "", "a\0b", "-rf", "x" * 81, ".."])
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(shards.ShardFormatError, match="unsafe utterance id"):
        shards.check_id(bad)


def test_metadata_needs_required_keys():
    with pytest.raises(shards.ShardFormatError, match="lacks"):
        shards.encode_metadata({"id": "x"})


def test_write_is_byte_stable_and_size_is_predicted(tmp_path):
    a = shards.write_shard(tmp_path / "a.tar", iter(SAMPLES), 16000)
    b = shards.write_shard(tmp_path / "b.tar", iter(SAMPLES), 16000)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a.sha256 == b.sha256 and a.num_samples == [10, 20]
    sizes = [len(x) for _, flac, meta, _ in SAMPLES for x in (flac, meta)]
    assert a.bytes == shards.shard_bytes(sizes) == (tmp_path / "a.tar").stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


def test_plain_tarfile_and_our_reader_agree(tmp_path):
    shards.write_shard(tmp_path / "s.tar", iter(SAMPLES), 16000)
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "1-2-0000.flac",
            "1-2-0000.json",
            "1-2-0001.flac",
            "1-2-0001.json",
        ]
        assert all(m.mtime == 0 and m.uname == "" and m.mode == 0o644 for m in members)
    with open(tmp_path / "s.tar", "rb") as f:
        got = list(shards.iter_samples(f))
    assert [(k, p["flac"], p["json"]) for k, p in got] == [s[:3] for s in SAMPLES]


def test_webdataset_reads_keys_and_metadata(tmp_path):
    shards.write_shard(tmp_path / "s.tar", iter(SAMPLES), 16000)
    got = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["1-2-0000", "1-2-0001"]
    assert json.loads(got[1]["json"])["num_samples"] == 20
    assert got[0]["flac"] == b"x" * 1000


def test_reader_refuses_path_traversal_members():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../etc/passwd.flac")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    buf.seek(0)
    with pytest.raises(
        shards.ShardFormatError, match=(r"^s\.tar: member '\.\./\.\./etc/passwd\.flac': unsafe")
    ):
        list(shards.iter_samples(buf, "s.tar"))


def _index(tmp_path) -> dict:
    """The index of one shard of SAMPLES, as the converter builds it."""
    record = shards.write_shard(tmp_path / "shard-000000.tar", iter(SAMPLES), 16000)
    totals = {"dev-clean": shards.SplitTotal(2, 30 / 16000)}
    return shards.build_index([record], totals, {}, {"seed": 0}, frozenset(), 16000)


def test_index_round_trip_and_version_check(tmp_path):
    index = _index(tmp_path)
    shards.write_index(tmp_path, index)
    assert shards.read_index(tmp_path) == index
    assert index["shards"][0]["num_samples"] == [10, 20]
    assert index["totals"]["utterances"] == 2 and index["splits"]["dev-clean"]["utterances"] == 2
    (tmp_path / shards.INDEX_NAME).write_text('{"format": "other", "format_version": 9}')
    with pytest.raises(shards.ShardFormatError, match="expected"):
        shards.read_index(tmp_path)
    with pytest.raises(shards.ShardFormatError, match="no index"):
        shards.read_index(tmp_path / "missing")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format_version": 99}, "version 99, expected 'w2v_stream.shards' version 1"),
        ({"format": "webdataset"}, "format 'webdataset' version 1, expected"),
        ({"sample_rate": None}, "sample_rate None"),
        ({"shards": None}, "'shards' is missing"),
        ({"totals": {}}, "'totals' is missing"),
        ({"shards": [{"file": "shard-000000.tar"}]}, "shards\\[0\\]: 'num_utterances' is missing"),
    ],
)
def test_every_bad_index_is_refused_naming_the_file(tmp_path, change, message):
    index = {**_index(tmp_path), **change}
    path = tmp_path / shards.INDEX_NAME
    with pytest.raises(shards.ShardFormatError, match=message):
        shards.write_index(tmp_path, index)  # the writer never writes what readers refuse
    assert not path.exists()
    path.write_text(json.dumps(index))
    with pytest.raises(shards.ShardFormatError, match=message) as caught:
        shards.read_index(tmp_path)
    assert str(caught.value).startswith(f"{path}: ")


def test_shard_entries_are_plain_file_names_with_consistent_counts(tmp_path):
    for entry, message in [
        ({"file": "../../etc/passwd.tar"}, "not a plain file name"),
        ({"file": "/abs.tar"}, "not a plain file name"),
        ({"num_samples": [10]}, "1 num_samples for 2 utterances"),
        ({"num_samples": [10, "x"]}, "other than counts"),
    ]:
        index = _index(tmp_path)
        index["shards"][0].update(entry)
        with pytest.raises(shards.ShardFormatError, match=message):
            shards.check_index(index, "somewhere/index.json")


def test_bad_json_and_non_objects_name_the_file(tmp_path):
    (tmp_path / shards.INDEX_NAME).write_bytes(b'{"format": ')
    with pytest.raises(shards.ShardFormatError, match=r"index\.json: not valid JSON"):
        shards.read_index(tmp_path)
    with pytest.raises(shards.ShardFormatError, match=r"^u/index\.json: not a shard index"):
        shards.parse_index(b"[1, 2]", "u/index.json")


def test_check_sample_reasons():
    flac, meta = SAMPLES[0][1], SAMPLES[0][2]
    assert shards.check_sample({"flac": flac, "json": meta, "txt": b"extra"}, 10) == flac
    for parts, expected, reason in [
        (None, 10, "missing_sample"),
        ({"flac": flac}, 10, "missing_member"),
        ({"flac": flac, "json": b"{"}, 10, "bad_metadata"),
        ({"flac": flac, "json": b"[]"}, 10, "index_mismatch"),
        ({"flac": flac, "json": meta}, 11, "index_mismatch"),
    ]:
        with pytest.raises(shards.BadSample) as caught:
            shards.check_sample(parts, expected)
        assert caught.value.reason == reason


def test_the_loader_uses_the_same_sample_check():
    from w2v_stream import stream

    with pytest.raises(stream.BadUtterance) as caught:
        stream.check_utterance({"flac": b"x"}, 1)
    assert caught.value.reason == "missing_member"
    assert stream.check_utterance is shards.check_sample


@pytest.mark.parametrize(
    "name,size", [("1-2-0000.flac", 12345), ("x.json", 0), ("a" * 80 + ".flac", 8**11 - 1)]
)
def test_direct_header_is_what_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, 0o644, 0, 0, 0
    info.uname = info.gname = ""
    assert shards.tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_our_reader_reads_what_tarfile_writes_in_each_format(fmt):
    long = "d" * 90 + "/" + "a" * 90 if fmt == tarfile.USTAR_FORMAT else "a" * 150
    members = [(long + ".flac", b"x" * 700), ("b.json", "é".encode()), ("c.txt", b"")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    assert list(shards.iter_members(buf)) == members


def test_truncated_or_damaged_tar_raises_after_the_good_samples(tmp_path):
    shards.write_shard(tmp_path / "s.tar", iter(SAMPLES), 16000)
    data = (tmp_path / "s.tar").read_bytes()
    got = []
    with pytest.raises(shards.ShardFormatError, match="truncated"):
        for key, _ in shards.iter_samples(io.BytesIO(data[: 2 * 512 + 1024 + 700])):
            got.append(key)
    assert got == ["1-2-0000"]
    damaged = bytearray(data)
    damaged[0] ^= 0x20  # a header byte changes, its checksum no longer matches
    with pytest.raises(shards.ShardFormatError, match="checksum"):
        list(shards.iter_samples(io.BytesIO(bytes(damaged))))


def test_short_reads_from_a_network_stream_are_not_truncation(tmp_path):
    shards.write_shard(tmp_path / "s.tar", iter(SAMPLES), 16000)

    class Trickle(io.RawIOBase):  # hands out at most 300 bytes per read, like a socket
        def __init__(self, data):
            self.data, self.pos = data, 0

        def read(self, n=-1):
            chunk = self.data[self.pos : self.pos + min(n if n >= 0 else 300, 300)]
            self.pos += len(chunk)
            return chunk

    got = list(shards.iter_samples(Trickle((tmp_path / "s.tar").read_bytes())))
    assert [(k, p["flac"], p["json"]) for k, p in got] == [s[:3] for s in SAMPLES]
