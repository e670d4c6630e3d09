"""The on-disk shard format: one owner for writer, reader and index.

A shard is a plain POSIX tar (ustar) holding, per utterance, ``<id>.flac`` (16 kHz mono FLAC)
followed by ``<id>.json`` (metadata, UTF-8, sorted keys). Tar headers carry no time, owner or
host, so the same samples always give the same bytes. ``index.json`` beside the shards lists
every shard with its sha256 and the ``num_samples`` of each sample in order, so a loader can
plan batch shapes without decoding audio.

This module is the format's one owner: writing and reading tars, building, writing, parsing
and validating ``index.json`` (``check_index`` is the one version check, used by the
converter, ``--verify`` and the loader), and the per-sample check (``check_sample``) that the
loader and ``--verify`` share.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, NamedTuple, Protocol, Sequence

from . import __version__

FORMAT_NAME = "w2v_stream.shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
AUDIO_EXT = "flac"
META_EXT = "json"
REQUIRED_META = (
    "id",
    "speaker_id",
    "chapter_id",
    "split",
    "text",
    "sample_rate",
    "num_samples",
    "duration",
)
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
        raise ShardFormatError(f"unsafe utterance id {utt_id!r}: ids must match {_SAFE_ID.pattern}")
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
    fields = (
        name.encode().ljust(100, b"\0")
        + b"0000644\0"
        + b"0000000\0" * 2
        + b"%011o\0" % size
        + b"00000000000\0"
        + b" " * 8
        + b"0"
        + bytes(100)
        + b"ustar\x0000"
        + bytes(32 + 32 + 8 + 8 + 155 + 12)
    )
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
        return {
            "file": self.file,
            "num_utterances": self.num_utterances,
            "seconds": round(self.seconds, 3),
            "bytes": self.bytes,
            "sha256": self.sha256,
            "num_samples": self.num_samples,
        }


def write_shard(
    path: Path, samples: Iterator[tuple[str, bytes, bytes, int]], sample_rate: int
) -> ShardRecord:
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
    return ShardRecord(
        path.name,
        len(num_samples),
        sum(num_samples) / sample_rate,
        size,
        digest.hexdigest(),
        num_samples,
    )


def record_for(path: Path, num_samples: list[int], sample_rate: int) -> ShardRecord:
    return ShardRecord(
        path.name,
        len(num_samples),
        sum(num_samples) / sample_rate,
        path.stat().st_size,
        file_sha256(path),
        num_samples,
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def iter_samples(
    fileobj: BinaryIO, name: str = "<shard>"
) -> Iterator[tuple[str, dict[str, bytes]]]:
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
            try:
                check_id(key)
            except ShardFormatError as exc:
                raise ShardFormatError(f"{name}: member {member!r}: {exc}") from None
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

    A direct reader of ustar, GNU and pax headers (what tarfile and webdataset write), as
    ``tarfile`` in stream mode is slow on the loader's hot path. Headers are checksummed;
    links, folders and devices are skipped, never followed.
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
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        try:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
        except ValueError:
            length = 0
        if length <= space - pos:
            raise ShardFormatError(f"{name}: bad pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


class BadSample(ValueError):
    """One sample that cannot be used: ``reason`` is a short stable key that readers count
    (``missing_sample``, ``missing_member``, ``bad_metadata``, ``index_mismatch``, ...),
    ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_sample(parts: dict[str, bytes] | None, expected_samples: int) -> bytes:
    """A sample's FLAC bytes, once its members and metadata agree with the index.

    ``parts`` is what ``iter_samples`` gave for the sample (None: it was not there);
    ``expected_samples`` is its ``num_samples`` in index.json. Raises BadSample otherwise.
    """
    if parts is None:
        raise BadSample("missing_sample", "not found where the index puts it")
    if META_EXT not in parts or AUDIO_EXT not in parts:
        raise BadSample("missing_member", f"members {sorted(parts)}, need flac and json")
    try:
        meta = json.loads(parts[META_EXT])
    except ValueError as exc:
        raise BadSample("bad_metadata", str(exc)) from None
    if not isinstance(meta, dict) or meta.get("num_samples") != expected_samples:
        got = meta.get("num_samples") if isinstance(meta, dict) else meta
        raise BadSample(
            "index_mismatch",
            f"metadata says {got} samples, index.json {expected_samples}; re-run make_shards",
        )
    return parts[AUDIO_EXT]


# ---------------------------------------------------------------- index.json

MAX_LISTED = 1000  # problem items listed per reason in index.json; counts are always complete
# A shard entry's file is a plain name in the index's folder: nothing that climbs out of it.
_SAFE_FILE = re.compile(r"(?!\.\.?$)[^/\\\0]+")
_SHARD_KEYS = {
    "file": str,
    "num_utterances": int,
    "seconds": (int, float),
    "bytes": int,
    "sha256": str,
    "num_samples": list,
}


class SplitTotal(NamedTuple):
    """What the index says of one split."""

    utterances: int
    seconds: float


class ListedProblem(Protocol):
    """A problem as the index lists it (``librispeech.Problem`` is one)."""

    utt_id: str | None
    location: str
    detail: str
    seconds: float | None  # audio it left out, when known


def build_index(
    records: Sequence[ShardRecord],
    splits: Mapping[str, SplitTotal],
    problems: Mapping[str, Sequence[ListedProblem]],
    options: Mapping,
    kept_reasons: frozenset[str],
    sample_rate: int,
) -> dict:
    """The content of index.json for shards ``records`` (in shard order).

    ``problems`` maps a reason to its problems; those in ``kept_reasons`` are notes on
    utterances that were kept, the rest name what was left out (``hours``: the audio they
    left out whose length is known; ``totals.hours_dropped``: all of it). ``options`` are
    the conversion options, recorded as given.
    """
    lengths = [n for r in records for n in r.num_samples]
    bins = Counter(int(n // sample_rate) for n in lengths)
    seconds = sum(lengths) / sample_rate
    dropped = {
        reason: sum(p.seconds or 0.0 for p in items)
        for reason, items in problems.items()
        if reason not in kept_reasons
    }
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"w2v_stream {__version__} tools/make_shards.py",
        "sample_rate": sample_rate,
        "options": dict(options),
        "shards": [r.to_json() for r in records],
        "totals": {
            "shards": len(records),
            "utterances": len(lengths),
            "seconds": round(seconds, 3),
            "hours": round(seconds / 3600, 4),
            "hours_dropped": round(sum(dropped.values()) / 3600, 4),
            "bytes": sum(r.bytes for r in records),
            "min_seconds": round(min(lengths) / sample_rate, 4),
            "max_seconds": round(max(lengths) / sample_rate, 4),
        },
        "splits": {
            name: {"utterances": total.utterances, "hours": round(total.seconds / 3600, 4)}
            for name, total in sorted(splits.items())
        },
        "duration_histogram": {
            "bin_seconds": 1,
            "counts": [bins.get(b, 0) for b in range(max(bins) + 1)],
        },
        "problems": {
            reason: {
                "count": len(items),
                "kept": reason in kept_reasons,
                **({"hours": round(dropped[reason] / 3600, 4)} if dropped.get(reason) else {}),
                "items": [
                    {"id": p.utt_id, "location": p.location, "detail": p.detail}
                    for p in items[:MAX_LISTED]
                ],
            }
            for reason, items in sorted(problems.items())
        },
    }


def check_index(index: object, where: str) -> dict:
    """``index`` if it is an index this version reads, else ShardFormatError naming ``where``.

    The one check of format name and version, used by the converter, ``--verify`` and the
    loader; it also checks the keys any of them reads, so a reader never meets a KeyError.
    """
    if not isinstance(index, dict):
        raise ShardFormatError(
            f"{where}: not a shard index (a JSON {type(index).__name__}, expected an object)"
        )
    name, version = index.get("format"), index.get("format_version")
    if name != FORMAT_NAME or version != FORMAT_VERSION:
        raise ShardFormatError(
            f"{where}: format {name!r} version {version!r}, expected {FORMAT_NAME!r} version "
            f"{FORMAT_VERSION}; re-run tools/make_shards.py with this w2v_stream"
        )
    rate, shards, totals = index.get("sample_rate"), index.get("shards"), index.get("totals")
    if not isinstance(rate, int) or rate < 1:
        raise ShardFormatError(f"{where}: sample_rate {rate!r} is not a positive integer")
    if not isinstance(shards, list):
        raise ShardFormatError(f"{where}: 'shards' is missing or not a list")
    if not isinstance(totals, dict) or not isinstance(totals.get("utterances"), int):
        raise ShardFormatError(f"{where}: 'totals' is missing or has no utterance count")
    for number, entry in enumerate(shards):
        _check_shard_entry(entry, f"{where}: shards[{number}]")
    return index


def _check_shard_entry(entry: object, where: str) -> None:
    if not isinstance(entry, dict):
        raise ShardFormatError(f"{where} is not an object")
    for key, kind in _SHARD_KEYS.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            raise ShardFormatError(f"{where}: {key!r} is missing or of the wrong type")
    if not _SAFE_FILE.fullmatch(entry["file"]):
        raise ShardFormatError(f"{where}: file {entry['file']!r} is not a plain file name")
    lengths = entry["num_samples"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise ShardFormatError(f"{where}: num_samples holds something other than counts")
    if len(lengths) != entry["num_utterances"]:
        raise ShardFormatError(
            f"{where}: {len(lengths)} num_samples for {entry['num_utterances']} utterances"
        )


def parse_index(data: bytes | str, where: str) -> dict:
    """index.json's bytes → the checked index; ShardFormatError naming ``where`` if bad."""
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardFormatError(
            f"{where}: not valid JSON ({exc}); re-run tools/make_shards.py"
        ) from None
    return check_index(index, where)


def write_index(output_dir: Path, index: dict) -> None:
    """Write ``index.json`` atomically (temp file, fsync, rename), once ``check_index``
    accepts it: what is written is always what the readers read."""
    path = output_dir / INDEX_NAME
    check_index(index, str(path))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(output_dir: Path) -> dict:
    """The checked index.json of a local shard folder."""
    path = Path(output_dir) / INDEX_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: no index; run tools/make_shards.py first") from None
    except OSError as exc:
        raise ShardFormatError(f"{path}: unreadable ({exc.strerror or exc})") from None
    return parse_index(data, str(path))
