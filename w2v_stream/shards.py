"""The on-disk shard format: one owner for writer, reader and index.

A shard is a plain POSIX tar (ustar) holding, per utterance, ``<id>.flac`` (16 kHz mono FLAC)
followed by ``<id>.json`` (metadata, UTF-8, sorted keys). Tar headers carry no time, owner or
host, so the same samples always give the same bytes. ``index.json`` beside the shards lists
every shard with its sha256 and the ``num_samples`` of each sample in order, so a loader can
plan batch shapes without decoding audio.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

FORMAT_NAME = "w2v_stream.shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
AUDIO_EXT = "flac"
META_EXT = "json"
REQUIRED_META = ("id", "speaker_id", "chapter_id", "split", "text", "sample_rate",
                 "num_samples", "duration")
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads archives to whole records

# Ids become member names and a WebDataset key (the part before the first dot), so: no dot,
# no slash, no NUL, no leading dash, short enough for a plain ustar name.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")


class ShardFormatError(ValueError):
    """A shard or index does not follow this format."""


def check_id(utt_id: str) -> str:
    """Return ``utt_id`` if it is safe as a member name and WebDataset key, else raise."""
    if not isinstance(utt_id, str) or not _SAFE_ID.fullmatch(utt_id):
        raise ShardFormatError(
            f"unsafe utterance id {utt_id!r}: ids must match {_SAFE_ID.pattern}")
    return utt_id


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode_metadata(meta: dict) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8; byte-stable across runs."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ShardFormatError(f"metadata for {meta.get('id')!r} lacks {missing}")
    return _CANONICAL.encode(meta).encode()


def member_bytes(size: int) -> int:
    """Bytes one tar member of ``size`` data bytes takes: header plus padded data."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def shard_bytes(member_sizes: list[int]) -> int:
    """Exact size of a shard whose members hold ``member_sizes`` bytes each."""
    return archive_bytes(sum(member_bytes(s) for s in member_sizes))


def archive_bytes(members: int) -> int:
    """Exact size of a tar whose members (headers and padded data) take ``members`` bytes."""
    return -(-(members + 2 * BLOCK) // RECORD) * RECORD


def tar_header(name: str, size: int) -> bytes:
    """The ustar header tarfile writes for a regular file with mode 0644, owner 0, mtime 0
    and no user names: built directly because tarfile's TarInfo costs more than the copy."""
    fields = (name.encode().ljust(100, b"\0") + b"0000644\0" + b"0000000\0" * 2
              + b"%011o\0" % size + b"00000000000\0" + b" " * 8 + b"0" + bytes(100)
              + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12))
    checksum = b"%06o\0 " % sum(fields)
    return fields[:148] + checksum + fields[156:]


@dataclass(frozen=True)
class ShardRecord:
    """What the index says of one shard."""

    file: str
    num_utterances: int
    seconds: float
    bytes: int
    sha256: str
    num_samples: list[int]

    def to_json(self) -> dict:
        return {"file": self.file, "num_utterances": self.num_utterances,
                "seconds": round(self.seconds, 3), "bytes": self.bytes,
                "sha256": self.sha256, "num_samples": self.num_samples}


def write_shard(path: Path, samples: Iterator[tuple[str, bytes, bytes, int]],
                sample_rate: int) -> ShardRecord:
    """Write ``(id, flac_bytes, json_bytes, num_samples)`` samples to ``path`` atomically.

    The tar goes to ``<path>.tmp`` and is renamed only once complete, so a killed run never
    leaves a shard that looks finished. Headers are written directly (what tarfile would
    write, without its copies) and hashed on the way, so the file is never read back.
    """
    tmp = path.with_name(path.name + ".tmp")
    num_samples: list[int] = []
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as f:
        def put(chunk: bytes) -> None:
            nonlocal size
            digest.update(chunk)
            f.write(chunk)
            size += len(chunk)

        for utt_id, flac, meta, length in samples:
            check_id(utt_id)
            for name, data in ((f"{utt_id}.{AUDIO_EXT}", flac), (f"{utt_id}.{META_EXT}", meta)):
                put(tar_header(name, len(data)))
                put(data)
                put(bytes(-len(data) % BLOCK))
            num_samples.append(length)
        put(bytes(archive_bytes(size) - size))  # two zero blocks, padded to a whole record
    os.replace(tmp, path)
    return ShardRecord(path.name, len(num_samples), sum(num_samples) / sample_rate, size,
                       digest.hexdigest(), num_samples)


def record_for(path: Path, num_samples: list[int], sample_rate: int) -> ShardRecord:
    return ShardRecord(path.name, len(num_samples), sum(num_samples) / sample_rate,
                       path.stat().st_size, file_sha256(path), num_samples)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def iter_samples(fileobj: BinaryIO, name: str = "<shard>") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(id, {ext: bytes})`` per sample from a shard read as a stream.

    Members of one sample are adjacent; a member with an unsafe name raises ShardFormatError
    (nothing from a shard is ever written to disk by name, executed or unpickled). A
    truncated or damaged tar raises ShardFormatError once the good samples before it are out.
    """
    current: str | None = None
    parts: dict[str, bytes] = {}
    try:
        for member, data in iter_members(fileobj, name):
            key, _, ext = member.partition(".")
            check_id(key)
            if key != current:
                if current is not None:
                    yield current, parts
                current, parts = key, {}
            parts[ext] = data
    except ShardFormatError:
        if current is not None:  # its members were read whole before the damage
            yield current, parts
        raise
    if current is not None:
        yield current, parts


def iter_members(fileobj: BinaryIO, name: str = "<shard>") -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, data)`` for each regular file of a tar read as a stream.

    A direct reader of ustar, GNU and pax headers (what tarfile and webdataset write):
    ``tarfile`` in stream mode costs a tenth of a loader worker's time, this a fraction of
    that. Headers are checksummed; links, folders and devices are skipped, never followed.
    """
    read = _full_reader(fileobj)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK:
            if header or long_name or pax:
                raise ShardFormatError(f"{name}: truncated tar header")
            return  # a stream that stops at a member boundary, without the end blocks
        if header == _ZERO_BLOCK:
            return
        _check_header(header, name)
        kind = header[156:157]
        size = pax.pop("size", None)
        size = int(size) if size is not None else _header_size(header, name)
        data = read(size)
        if len(data) < size:
            raise ShardFormatError(f"{name}: truncated tar member ({len(data)} of {size} bytes)")
        padding = -size % BLOCK
        if padding and len(read(padding)) < padding:
            raise ShardFormatError(f"{name}: truncated tar member padding")
        if kind == b"L":  # GNU long name: the next member's name
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":
            pax = _pax_records(data, name)
        elif kind == b"g":
            continue
        else:
            member = pax.pop("path", None) or long_name or _header_name(header)
            long_name, pax = None, {}
            if kind in (b"0", b"\0", b"7"):
                yield member, data


_ZERO_BLOCK = bytes(BLOCK)


def _full_reader(fileobj: BinaryIO):
    """``read(n)`` that returns n bytes unless the stream ends: a network stream may return
    fewer at a time, which must not look like a truncated shard."""
    def read(n: int) -> bytes:
        data = fileobj.read(n)
        if len(data) == n or not data:
            return data
        parts = [data]
        got = len(data)
        while got < n:
            more = fileobj.read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    return read


def _check_header(header: bytes, name: str) -> None:
    try:
        stored = int(header[148:156].strip(b" \0") or b"0", 8)
    except ValueError:
        raise ShardFormatError(f"{name}: not a tar (bad header checksum field)") from None
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored != unsigned:
        signed = unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:])
        if stored != signed:
            raise ShardFormatError(f"{name}: damaged tar header (checksum mismatch)")


def _header_size(header: bytes, name: str) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        raise ShardFormatError(f"{name}: bad tar size field {field!r}") from None


def _header_name(header: bytes) -> str:
    member = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            member = prefix + b"/" + member
    return member.decode("utf-8", "replace")


def _pax_records(data: bytes, name: str) -> dict[str, str]:
    records = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        try:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
        except ValueError:
            length = 0
        if length <= space - pos:
            raise ShardFormatError(f"{name}: bad pax header")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def write_index(output_dir: Path, index: dict) -> None:
    """Write ``index.json`` atomically (temp file, fsync, rename)."""
    path = output_dir / INDEX_NAME
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(output_dir: Path) -> dict:
    path = Path(output_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: no index; run tools/make_shards.py first") from None
    except json.JSONDecodeError as exc:
        raise ShardFormatError(f"{path}: not valid JSON ({exc})") from None
    if index.get("format") != FORMAT_NAME or index.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format {index.get('format')!r} v{index.get('format_version')!r}, "
            f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
    return index
