"""Turning sources (LibriSpeech layouts, your own audio) into shards: plan, write, index,
verify.

The scan (``scan.py``) reads every source once and keeps small facts. The plan orders the
good utterances by id (or a seeded shuffle of that order) and cuts them into shards; it
depends only on the inputs and options, never on the worker count. The write pass produces
each planned shard that is not already complete, fetching audio again: plain files by path,
streamed sources (archives, parquet) by re-reading them once per window of shards that fits
``max_buffer_bytes``, so memory stays bounded whatever the corpus size; a piece of a long
recording is decoded and cut again (pieces of one recording are written one after the
other, so it is decoded once per shard). ``verify`` checks a finished folder against its
index.json.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from . import audio, segment
from .events import AudioFound, Problem, Source
from .scan import KEPT_REASONS, Mapper, Planned, scan, select
from .shards import (
    AUDIO_EXT,
    INDEX_NAME,
    META_EXT,
    BadSample,
    ShardFormatError,
    ShardRecord,
    SplitTotal,
    archive_bytes,
    build_index,
    check_sample,
    file_sha256,
    iter_samples,
    member_bytes,
    read_index,
    record_for,
    shard_name,
    write_index,
    write_shard,
)

# Shards finished by a run that has not yet written index.json, with their sha256: a rerun
# keeps a shard only if its bytes still hash to what was written.
JOURNAL_NAME = ".make_shards.journal"
# Recordings longer than this, kept whole, are counted in ConversionSummary.long_recordings:
# the loader takes one window of such a recording per epoch and leaves the rest unused.
LONG_RECORDING_SECONDS = 30.0


class NothingUsable(RuntimeError):
    """No utterance survived the scan: there is nothing to write."""


@dataclass(frozen=True)
class ShardOptions:
    """What decides the shards' bytes (all but ``max_buffer_bytes``, recorded in the index)."""

    samples_per_shard: int | None = None
    max_shard_bytes: int | None = 100_000_000
    min_duration_in_seconds: float | None = None
    max_duration_in_seconds: float | None = None
    shuffle: bool = False
    seed: int = 0
    full_decode: bool = False
    max_segment_seconds: float | None = None  # cut longer recordings into pieces (segment.py)
    max_buffer_bytes: int = 1 << 30

    def __post_init__(self):
        for name in ("samples_per_shard", "max_shard_bytes", "max_buffer_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        lo, hi = self.min_duration_in_seconds, self.max_duration_in_seconds
        cut = self.max_segment_seconds
        for name, value in (("min_duration_in_seconds", lo), ("max_duration_in_seconds", hi)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(
                f"min_duration_in_seconds {lo} >= max_duration_in_seconds {hi}: "
                f"nothing could be kept"
            )
        if cut is not None and not (math.isfinite(cut) and cut * audio.SAMPLE_RATE >= 1):
            raise ValueError(f"max_segment_seconds must be a finite number > 0, got {cut}")
        if cut is not None and lo is not None and lo >= cut:
            raise ValueError(
                f"min_duration_in_seconds {lo} >= max_segment_seconds {cut}: "
                f"every piece would be dropped"
            )

    def segment_rule(self) -> segment.Rule | None:
        """How long recordings are cut (None: kept whole)."""
        if self.max_segment_seconds is None:
            return None
        return segment.Rule(
            round(self.max_segment_seconds * audio.SAMPLE_RATE),
            round((self.min_duration_in_seconds or 0) * audio.SAMPLE_RATE),
        )

    def for_index(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "max_buffer_bytes"}


@dataclass
class ConversionSummary:
    output_dir: Path
    shards_written: int = 0
    shards_kept: int = 0
    utterances: int = 0
    seconds: float = 0.0
    bytes: int = 0
    problems: dict[str, list[Problem]] = field(default_factory=dict)
    # Utterances longer than LONG_RECORDING_SECONDS kept whole (counted without
    # max_segment_seconds only), and their seconds.
    long_recordings: int = 0
    long_seconds: float = 0.0

    def skipped(self) -> int:
        return sum(len(v) for k, v in self.problems.items() if k not in KEPT_REASONS)


class WriteJob(NamedTuple):
    path: Path
    items: list[Planned]
    data: list[bytes | None]  # each item's audio from a streamed source; None: read its path


class Written(NamedTuple):
    records: list[ShardRecord]  # every planned shard's, in shard order
    written: int  # how many of them this run wrote (the others were complete already)


class CheckJob(NamedTuple):
    path: Path
    items: list[Planned]
    written_sha256: str | None  # what the journal or index says was written, if anything


# ---------------------------------------------------------------- worker functions (picklable)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_job(job: WriteJob) -> ShardRecord:
    decoded: dict = {}  # the last long recording decoded, for its next pieces

    def samples():
        for item, data in zip(job.items, job.data):
            yield item.utt_id, _flac_of(item, data, decoded), item.meta, item.num_samples

    return write_shard(job.path, samples(), audio.SAMPLE_RATE)


def _flac_of(item: Planned, data: bytes | None, decoded: dict) -> bytes:
    """The FLAC bytes of a planned utterance: the file's own, converted, or a piece of the
    decoded recording (``decoded`` keeps the last recording decoded, keyed by where it is)."""
    if item.span is None and not item.convert:
        return read_file(item.path) if data is None else data
    source = item.path if data is None else data
    if item.span is None:
        return audio.to_target_flac(source, item.excerpt)[0]
    key = (item.source, item.location, item.excerpt)
    if decoded.get("key") != key:
        decoded.clear()  # one recording in memory at a time
        decoded.update(key=key, samples=audio.decode_target(source, item.excerpt))
    return audio.encode_flac(decoded["samples"][item.span.start : item.span.stop])


def _check_job(job: CheckJob) -> ShardRecord | None:
    """The record of an existing shard that is intact and holds the planned samples, else None.

    Intact: its sha256 is the one recorded when it was written (journal or index). Planned:
    the same ids in the same order, the same metadata bytes and FLAC sizes.
    """
    if job.written_sha256 is None or file_sha256(job.path) != job.written_sha256:
        return None
    try:
        with open(job.path, "rb") as f:
            got = [
                (key, len(parts.get(AUDIO_EXT, b"")), parts.get(META_EXT))
                for key, parts in iter_samples(f, job.path.name)
            ]
    except Exception:  # any damage (bad tar, bad name, I/O) means: write it again
        return None
    if got != [(p.utt_id, p.flac_size, p.meta) for p in job.items]:
        return None
    return record_for(job.path, [p.num_samples for p in job.items], audio.SAMPLE_RATE)


# ---------------------------------------------------------------- plan and write


def plan_shards(planned: list[Planned], options: ShardOptions) -> list[list[Planned]]:
    """Order by id (or a seeded shuffle of that order) and cut into shards by the limits.

    The shuffle moves the pieces of a long recording together, in order: the write pass
    decodes a recording once for its pieces in a shard, not once per piece.
    """
    ordered = sorted(planned, key=lambda p: p.utt_id)
    if options.shuffle:
        groups = [list(g) for _, g in itertools.groupby(ordered, key=_recording_of)]
        random.Random(options.seed).shuffle(groups)
        ordered = [item for group in groups for item in group]
    shards: list[list[Planned]] = []
    used = 0  # bytes of the members in the last shard
    for item in ordered:
        size = member_bytes(item.flac_size) + member_bytes(len(item.meta))
        full = shards and (
            (options.samples_per_shard and len(shards[-1]) >= options.samples_per_shard)
            or (options.max_shard_bytes and archive_bytes(used + size) > options.max_shard_bytes)
        )
        if not shards or full:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += size
    return shards


def _recording_of(item: Planned) -> tuple:
    """What a piece is cut from; for any other utterance, the utterance itself."""
    if item.span is None:
        return (item.utt_id,)
    return item.source, item.location, item.excerpt


def _windows(
    todo: list[int], shards: list[list[Planned]], sources: Sequence[Source], budget: int
) -> Iterator[list[int]]:
    """Consecutive shards whose streamed audio fits ``budget`` bytes (at least one shard)."""
    window: list[int] = []
    used = 0
    for index in todo:
        size = sum(p.flac_size for p in shards[index] if sources[p.source].streamed)
        if window and used + size > budget:
            yield window
            window, used = [], 0
        window.append(index)
        used += size
    if window:
        yield window


def _fetch(items: Iterable[Planned], sources: Sequence[Source]) -> dict[str, bytes]:
    """Re-read streamed sources for the audio of ``items``, stopping once all are found.

    Returns each item's audio by its id; the pieces of one recording share its bytes.
    """
    wanted: dict[int, dict[str, list[str]]] = {}  # source -> location -> ids
    for item in items:
        if sources[item.source].streamed:
            wanted.setdefault(item.source, {}).setdefault(item.location, []).append(item.utt_id)
    got: dict[str, bytes] = {}
    for index, ids in sorted(wanted.items()):
        left = dict(ids)
        for event in sources[index].events():
            if isinstance(event, AudioFound) and event.location in left:
                got.update((utt_id, event.data) for utt_id in left.pop(event.location))
                if not left:
                    break
        if left:
            raise RuntimeError(
                f"{sources[index].location} changed while converting: "
                f"{len(left)} utterances seen in the scan are gone"
            )
    return got


def _prepare_output(output_dir: Path, names: set[str], overwrite: bool) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"{output_dir}: output folder is not writable ({exc})") from None
    for stale in output_dir.glob("*.tmp"):
        stale.unlink()
    foreign = sorted(p.name for p in output_dir.glob("shard-*.tar") if p.name not in names)
    if foreign and not overwrite:
        raise FileExistsError(
            f"{output_dir} holds {len(foreign)} shard(s) this run would not write "
            f"(first: {foreign[0]}), left by a run with other inputs or options; use an empty "
            f"folder or pass --overwrite to delete them"
        )
    for name in foreign:
        (output_dir / name).unlink()


def _journal(journal, record: ShardRecord) -> None:
    journal.write(json.dumps({"file": record.file, "sha256": record.sha256}) + "\n")
    journal.flush()


def _written_hashes(output_dir: Path) -> dict[str, str]:
    """sha256 of each shard as written, from index.json and an unfinished run's journal."""
    known: dict[str, str] = {}
    with contextlib.suppress(ShardFormatError):  # no usable index: the journal alone vouches
        known.update((e["file"], e["sha256"]) for e in read_index(output_dir)["shards"])
    journal = output_dir / JOURNAL_NAME
    if journal.exists():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                known[entry["file"]] = entry["sha256"]
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the kill
    return known


def _split_totals(shards: list[list[Planned]]) -> dict[str, SplitTotal]:
    """Utterances and seconds per split, summed in shard order."""
    totals: dict[str, SplitTotal] = {}
    for items in shards:
        for item in items:
            utterances, seconds = totals.get(item.split, SplitTotal(0, 0.0))
            totals[item.split] = SplitTotal(
                utterances + 1, seconds + item.num_samples / audio.SAMPLE_RATE
            )
    return totals


def convert(
    sources: Sequence[Source],
    output_dir: Path,
    options: ShardOptions,
    num_workers: int = 1,
    overwrite: bool = False,
    progress: Callable | None = None,
) -> ConversionSummary:
    """Scan ``sources``, write the planned shards into ``output_dir`` and its index.json.

    ``progress(stage, utterances, seconds, total=None)`` is called as work is done (once with
    ``total``, the planned utterances, before the write stage); ``overwrite`` lets
    the run delete shards in ``output_dir`` that its plan does not name. Re-running after a
    kill keeps the complete shards it verifies and gives byte-identical output.
    """
    output_dir = Path(output_dir)
    report = progress or (lambda stage, n, seconds, total=None: None)
    mapper = Mapper(num_workers)
    try:
        scanned = scan(
            sources,
            options.full_decode,
            mapper,
            lambda n, samples: report("scan", n, samples / audio.SAMPLE_RATE),
            options.segment_rule(),
        )
        planned = select(scanned, options.min_duration_in_seconds, options.max_duration_in_seconds)
        problems = scanned.problems
        del scanned
        if not planned:
            raise NothingUsable("no usable utterance was found in the inputs")
        long = (
            []
            if options.max_segment_seconds is not None
            else [
                p.num_samples
                for p in planned
                if p.num_samples > LONG_RECORDING_SECONDS * audio.SAMPLE_RATE
            ]
        )
        shards = plan_shards(planned, options)
        paths = [output_dir / shard_name(i) for i in range(len(shards))]
        _prepare_output(output_dir, {p.name for p in paths}, overwrite)
        report("write", 0, 0.0, total=len(planned))
        done = _write_shards(sources, shards, paths, options.max_buffer_bytes, mapper, report)
    finally:
        mapper.close()

    by_reason: dict[str, list[Problem]] = {}
    for problem in problems:
        by_reason.setdefault(problem.reason, []).append(problem)
    records = done.records
    write_index(
        output_dir,
        build_index(
            records,
            _split_totals(shards),
            by_reason,
            options.for_index(),
            KEPT_REASONS,
            audio.SAMPLE_RATE,
        ),
    )
    (output_dir / JOURNAL_NAME).unlink()
    return ConversionSummary(
        output_dir,
        shards_written=done.written,
        shards_kept=len(shards) - done.written,
        utterances=sum(r.num_utterances for r in records),
        seconds=sum(r.seconds for r in records),
        bytes=sum(r.bytes for r in records),
        problems=by_reason,
        long_recordings=len(long),
        long_seconds=sum(long) / audio.SAMPLE_RATE,
    )


def _write_shards(
    sources: Sequence[Source],
    shards: list[list[Planned]],
    paths: list[Path],
    budget: int,
    mapper: Mapper,
    report: Callable,
) -> Written:
    """Write each planned shard that is not already complete and intact, journalling each."""
    output_dir = paths[0].parent
    records: list[ShardRecord | None] = [None] * len(shards)
    hashes = _written_hashes(output_dir)
    existing = [i for i, p in enumerate(paths) if p.exists()]
    checks = mapper.map(
        _check_job, [CheckJob(paths[i], shards[i], hashes.get(paths[i].name)) for i in existing]
    )
    for i, record in zip(existing, checks):
        records[i] = record
        if record:
            report("write", len(shards[i]), record.seconds)
    todo = [i for i, r in enumerate(records) if r is None]
    with open(output_dir / JOURNAL_NAME, "w", encoding="utf-8") as journal:
        for record in records:
            if record:
                _journal(journal, record)
        if todo:
            (output_dir / INDEX_NAME).unlink(missing_ok=True)  # never beside new shards
        for window in _windows(todo, shards, sources, budget):
            fetched = _fetch((p for i in window for p in shards[i]), sources)
            jobs = [
                WriteJob(paths[i], shards[i], [fetched.pop(p.utt_id, None) for p in shards[i]])
                for i in window
            ]
            for i, record in zip(window, mapper.map(_write_job, jobs, chunksize=1)):
                records[i] = record
                _journal(journal, record)
                report("write", record.num_utterances, record.seconds)
    return Written(records, len(todo))


# ---------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    shards: int = 0
    utterances: int = 0
    errors: list[str] = field(default_factory=list)


class VerifyJob(NamedTuple):
    path: Path
    entry: dict  # the shard's entry in index.json, checked by shards.check_index


class ShardVerified(NamedTuple):
    utterances: int  # samples read from the shard
    errors: list[str]


def _verify_shard(job: VerifyJob) -> ShardVerified:
    path, entry = job
    name = entry["file"]
    if not path.exists():
        return ShardVerified(0, [f"{name}: missing (listed in {INDEX_NAME})"])
    errors: list[str] = []
    if path.stat().st_size != entry["bytes"]:
        errors.append(f"{name}: {path.stat().st_size} bytes, index says {entry['bytes']}")
    if file_sha256(path) != entry["sha256"]:
        errors.append(f"{name}: sha256 differs from the index")
    expected = entry["num_samples"]
    count = 0
    try:
        with open(path, "rb") as f:
            for key, parts in iter_samples(f, name):
                if count < len(expected):
                    errors += _verify_sample(name, key, parts, expected[count])
                count += 1
    except ShardFormatError as exc:  # its message names the shard
        errors.append(str(exc))
    except OSError as exc:
        errors.append(f"{name}: unreadable ({exc.strerror or exc})")
    if count != len(expected):
        errors.append(f"{name}: {count} samples, the index lists {len(expected)}")
    return ShardVerified(count, errors)


def _verify_sample(name: str, key: str, parts: dict[str, bytes], expected: int) -> list[str]:
    """The loader's check (``shards.check_sample``), then a full decode of the FLAC."""
    extra = sorted(set(parts) - {AUDIO_EXT, META_EXT})
    errors = (
        [f"{name}: sample {key} has members {sorted(parts)}, expected flac and json"]
        if extra
        else []
    )
    try:
        info = audio.probe(check_sample(parts, expected), full_decode=True)
    except (BadSample, audio.AudioError) as exc:
        return errors + [f"{name}: sample {key}: {exc}"]
    if not info.is_target or info.num_samples != expected:
        errors.append(f"{name}: sample {key}: {info} disagrees with the index's {expected} samples")
    return errors


def verify(output_dir: Path, num_workers: int = 1) -> VerifyReport:
    """Check shards against index.json: size, sha256, counts, lengths, every FLAC decodes."""
    output_dir = Path(output_dir)
    index = read_index(output_dir)
    report = VerifyReport(shards=len(index["shards"]))
    mapper = Mapper(num_workers)
    try:
        jobs = [VerifyJob(output_dir / e["file"], e) for e in index["shards"]]
        for verified in mapper.map(_verify_shard, jobs):
            report.utterances += verified.utterances
            report.errors += verified.errors
    finally:
        mapper.close()
    if report.utterances != index["totals"]["utterances"]:
        report.errors.append(
            f"index totals say {index['totals']['utterances']} utterances, "
            f"shards hold {report.utterances}"
        )
    return report


def format_summary(summary: ConversionSummary) -> str:
    """The table printed at the end of a conversion."""
    rows = [
        ("output", str(summary.output_dir)),
        (
            "shards",
            (
                f"{summary.shards_written + summary.shards_kept} "
                f"({summary.shards_written} written, {summary.shards_kept} kept)"
            ),
        ),
        ("utterances", f"{summary.utterances}"),
        ("audio", f"{summary.seconds / 3600:.3f} h"),
        ("bytes", f"{summary.bytes / 1e6:.1f} MB"),
    ]
    for reason, items in sorted(summary.problems.items()):
        kind = "kept" if reason in KEPT_REASONS else "skipped"
        example = next((p.utt_id or p.location for p in items), "")
        rows.append((f"{kind}: {reason}", f"{len(items)}  (e.g. {example})"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"{'total skipped':<{width}}  {summary.skipped()} (details in index.json)")
    return "\n".join(lines)
