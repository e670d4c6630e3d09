"""Turning LibriSpeech sources into shards: scan, plan, write, index, verify.

Two passes. The scan reads every source once, probes each utterance's audio (header plus a
decode of its tail, or a full decode) and joins transcripts; it keeps only small facts. The
plan orders the good utterances by id (or a seeded shuffle of that order) and cuts them into
shards; it depends only on the inputs and options, never on the worker count. The write pass
produces each planned shard that is not already complete, fetching audio again: plain files
by path, streamed sources (archives, parquet) by re-reading them once per window of shards
that fits ``max_buffer_bytes``, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from . import __version__, audio
from .librispeech import AudioFound, Problem, Source, TranscriptFound
from .shards import (FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, ShardFormatError, ShardRecord,
                     archive_bytes, check_id, encode_metadata, file_sha256, iter_samples,
                     member_bytes, read_index, record_for, shard_name, write_index, write_shard)

# Problems that mean an utterance was left out (the rest are notes on utterances kept).
NOTE_REASONS = ("converted", "no_transcript")
MAX_LISTED = 1000  # ids listed per reason in index.json; counts are always complete
SCAN_BATCH_BYTES = 32 << 20  # audio bytes handed to the workers at once while scanning
SCAN_BATCH_ITEMS = 512  # utterances handed to the workers at once while scanning
SCAN_IN_FLIGHT = 2  # batches probed while the walk reads on
# Shards finished by a run that has not yet written index.json, with their sha256: a rerun
# keeps a shard only if its bytes still hash to what was written.
JOURNAL_NAME = ".make_shards.journal"


class NothingUsable(RuntimeError):
    """No utterance survived the scan: there is nothing to write."""


@dataclass(frozen=True)
class ShardOptions:
    samples_per_shard: int | None = None
    max_shard_bytes: int | None = 100_000_000
    min_duration_in_seconds: float | None = None
    max_duration_in_seconds: float | None = None
    shuffle: bool = False
    seed: int = 0
    full_decode: bool = False
    max_buffer_bytes: int = 1 << 30

    def __post_init__(self):
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        lo, hi = self.min_duration_in_seconds, self.max_duration_in_seconds
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_duration_in_seconds {lo} > max_duration_in_seconds {hi}")
        if self.max_buffer_bytes < 1:
            raise ValueError("max_buffer_bytes must be >= 1")

    def for_index(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "max_buffer_bytes"}


@dataclass(frozen=True)
class Planned:
    """One good utterance, everything needed to write it again."""

    utt_id: str
    source: int  # index into the sources list
    split: str
    location: str
    path: str | None  # a plain file's path (AudioFound.path)
    convert: bool
    flac_size: int
    num_samples: int
    meta: bytes  # canonical JSON


@dataclass
class ConversionSummary:
    output_dir: Path
    shards_written: int = 0
    shards_kept: int = 0
    utterances: int = 0
    seconds: float = 0.0
    bytes: int = 0
    problems: dict[str, list[Problem]] = field(default_factory=dict)

    def skipped(self) -> int:
        return sum(len(v) for k, v in self.problems.items() if k not in NOTE_REASONS)


# ---------------------------------------------------------------- worker functions (picklable)

def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _probe_job(job: tuple[str | None, bytes | None, bool]) -> tuple:
    """(info, convert, flac_size, num_samples, error) for one utterance's audio."""
    path, data, full_decode = job
    try:
        info = audio.probe(path if data is None else data, full_decode=full_decode)
        if info.is_target:
            size = os.stat(path).st_size if data is None else len(data)
            return info, False, size, info.num_samples, None
        flac, num_samples = audio.to_target_flac(_read_file(path) if data is None else data)
        return info, True, len(flac), num_samples, None
    except (audio.AudioError, OSError) as exc:
        return None, False, 0, 0, str(exc)


def _walk_probe_job(job: tuple[Source, str, bool]) -> tuple[list, list[tuple], list]:
    """The events of one piece of a folder source, the probe of each audio event, and its
    metadata made ahead as ``(text, JSON bytes)`` with the transcript this piece holds.

    Encoding the metadata here takes it off the main process, whose ``_select`` runs on one
    core while the workers wait; ``_select`` keeps it when the text it joins is the same.
    """
    source, part, full_decode = job
    events = list(source.events(part))
    texts: dict[str, str] = {}
    for event in events:
        if isinstance(event, TranscriptFound):
            texts.setdefault(event.utt_id, event.text)
    audio_events = [e for e in events if isinstance(e, AudioFound)]
    probes = [_probe_job((e.path, e.data, full_decode)) for e in audio_events]
    made = []
    for event, probed in zip(audio_events, probes):
        text = event.text if event.text is not None else texts.get(event.utt_id)
        made.append(None if probed[4] is not None else (text, _metadata(event, text, probed)))
    return events, probes, made


def _write_job(job: tuple[Path, list[tuple[Planned, bytes | None]]]) -> ShardRecord:
    path, items = job

    def samples():
        for item, data in items:
            if data is None:
                data = _read_file(item.path)
            if item.convert:
                data, _ = audio.to_target_flac(data)
            yield item.utt_id, data, item.meta, item.num_samples

    return write_shard(path, samples(), audio.SAMPLE_RATE)


def _check_job(job: tuple[Path, list[Planned], str | None]) -> ShardRecord | None:
    """The record of an existing shard that is intact and holds the planned samples, else None.

    Intact: its sha256 is the one recorded when it was written (journal or index). Planned:
    the same ids in the same order, the same metadata bytes and FLAC sizes.
    """
    path, items, written_sha256 = job
    if written_sha256 is None or file_sha256(path) != written_sha256:
        return None
    try:
        with open(path, "rb") as f:
            got = [(key, len(parts.get("flac", b"")), parts.get("json"))
                   for key, parts in iter_samples(f, path.name)]
    except Exception:  # any damage (bad tar, bad name, I/O) means: write it again
        return None
    if got != [(p.utt_id, p.flac_size, p.meta) for p in items]:
        return None
    return record_for(path, [p.num_samples for p in items], audio.SAMPLE_RATE)


class _Mapper:
    """Ordered map over a process pool (or in-process for one worker)."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.pool = (multiprocessing.get_context("fork").Pool(num_workers)
                     if num_workers > 1 else None)

    def map(self, fn: Callable, jobs: Sequence, chunksize: int | None = None) -> Iterator:
        if self.pool is None:
            return map(fn, jobs)
        # Few big chunks by default: per-chunk round trips, not the work, limit small jobs
        # (probes); big jobs (whole shards) go one at a time so no worker idles at the end.
        chunksize = chunksize or max(1, len(jobs) // (4 * self.num_workers))
        return self.pool.imap(fn, jobs, chunksize=chunksize)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


# ---------------------------------------------------------------- the passes

def _scan(sources: Sequence[Source], options: ShardOptions, mapper: _Mapper,
          progress) -> tuple[list[tuple], dict[str, str], list[Problem]]:
    """Read every source once; probe audio in the workers; keep only small facts.

    A folder is walked by the workers themselves, a piece (subfolder) each, so the main
    process only gathers. Other sources are read here and their audio goes to the workers in
    batches while the reading goes on (at most SCAN_IN_FLIGHT batches out at once, so memory
    stays bounded for sources that carry their bytes).
    """
    found: list[tuple[int, AudioFound, tuple, tuple | None]] = []
    transcripts: dict[str, str] = {}
    problems: list[Problem] = []
    in_flight: deque = deque()

    def collect(keep: int) -> None:
        while len(in_flight) > keep:
            index, events, results = in_flight.popleft()
            for event, result in zip(events, results):
                # Drop the bytes now: the write pass reads them again, memory stays bounded.
                found.append((index, AudioFound(event.utt_id, event.speaker_id,
                                                event.chapter_id, event.split, event.location,
                                                path=event.path, text=event.text), result,
                              None))
                progress(1, result[3])

    def submit(index: int, batch: list[AudioFound]) -> None:
        if batch:
            jobs = [(e.path, e.data, options.full_decode) for e in batch]
            in_flight.append((index, batch, mapper.map(_probe_job, jobs)))
        collect(SCAN_IN_FLIGHT)

    for index, source in enumerate(sources):
        if hasattr(source, "parts"):  # a folder: workers walk its pieces and probe them
            collect(0)
            jobs = [(source, part, options.full_decode) for part in source.parts()]
            for events, results, made in mapper.map(_walk_probe_job, jobs, chunksize=1):
                probed, premade = iter(results), iter(made)
                for event in events:
                    if isinstance(event, AudioFound):
                        found.append((index, event, next(probed), next(premade)))
                        progress(1, found[-1][2][3])
                    elif isinstance(event, TranscriptFound):
                        transcripts.setdefault(event.utt_id, event.text)
                    else:
                        problems.append(event)
            continue
        batch: list[AudioFound] = []
        batch_bytes = 0
        for event in source.events():
            if isinstance(event, AudioFound):
                batch.append(event)
                batch_bytes += len(event.data or b"")
                if batch_bytes >= SCAN_BATCH_BYTES or len(batch) >= SCAN_BATCH_ITEMS:
                    submit(index, batch)
                    batch, batch_bytes = [], 0
            elif isinstance(event, TranscriptFound):
                transcripts.setdefault(event.utt_id, event.text)
            else:
                problems.append(event)
        submit(index, batch)
    collect(0)
    return found, transcripts, problems


def _select(found, transcripts, options: ShardOptions,
            problems: list[Problem]) -> list[Planned]:
    """Join transcripts, drop bad, duplicate and out-of-range utterances, say why for each."""
    planned: list[Planned] = []
    seen: set[str] = set()
    lo, hi = options.min_duration_in_seconds, options.max_duration_in_seconds
    for source, event, probed, made in found:
        info, convert, flac_size, num_samples, error = probed
        utt_id = event.utt_id
        try:
            check_id(utt_id)
        except ShardFormatError as exc:
            problems.append(Problem("unsafe_id", None, event.location, str(exc)))
            continue
        if utt_id in seen:
            problems.append(Problem("duplicate_id", utt_id, event.location,
                                    "an utterance with this id came earlier; the first is kept"))
            continue
        seen.add(utt_id)
        if error is not None:
            problems.append(Problem("unreadable_audio", utt_id, event.location, error))
            continue
        seconds = num_samples / audio.SAMPLE_RATE
        if lo is not None and seconds < lo:
            problems.append(Problem("too_short", utt_id, event.location,
                                    f"{seconds:.2f} s < --min_duration_in_seconds {lo}"))
            continue
        if hi is not None and seconds > hi:
            problems.append(Problem("too_long", utt_id, event.location,
                                    f"{seconds:.2f} s > --max_duration_in_seconds {hi}"))
            continue
        text = event.text if event.text is not None else transcripts.get(utt_id)
        if text is None:
            problems.append(Problem("no_transcript", utt_id, event.location,
                                    "no transcript line; kept with text null"))
        if convert:
            why = "" if info.length_in_header else " (no length in its header)"
            problems.append(Problem("converted", utt_id, event.location,
                                    f"{info.format} {info.sample_rate} Hz {info.channels} ch"
                                    f"{why} → FLAC 16000 Hz mono"))
        # A walking worker made it ahead from the same facts; only the text may differ (a
        # transcript line elsewhere that came first).
        meta = made[1] if made is not None and made[0] == text else _metadata(event, text, probed)
        planned.append(Planned(utt_id, source, event.split, event.location, event.path, convert,
                               flac_size, num_samples, meta))
    for utt_id in sorted(set(transcripts) - seen):
        problems.append(Problem("transcript_without_audio", utt_id, "", "no audio file found"))
    return planned


def _metadata(event: AudioFound, text: str | None, probed: tuple) -> bytes:
    """A sample's JSON member: canonical bytes, the same whichever process makes them."""
    info, convert, _, num_samples, _ = probed
    meta = {"id": event.utt_id, "speaker_id": event.speaker_id,
            "chapter_id": event.chapter_id, "split": event.split, "text": text,
            "sample_rate": audio.SAMPLE_RATE, "num_samples": num_samples,
            "duration": round(num_samples / audio.SAMPLE_RATE, 6), "converted": convert}
    if convert:
        meta["original"] = {"format": info.format, "sample_rate": info.sample_rate,
                            "channels": info.channels}
        if not info.length_in_header:
            meta["original"]["length_in_header"] = False
    return encode_metadata(meta)


def plan_shards(planned: list[Planned], options: ShardOptions) -> list[list[Planned]]:
    """Order by id (or a seeded shuffle of that order) and cut into shards by the limits."""
    ordered = sorted(planned, key=lambda p: p.utt_id)
    if options.shuffle:
        random.Random(options.seed).shuffle(ordered)
    shards: list[list[Planned]] = []
    used = 0  # bytes of the members in the last shard
    for item in ordered:
        size = member_bytes(item.flac_size) + member_bytes(len(item.meta))
        full = shards and (
            (options.samples_per_shard and len(shards[-1]) >= options.samples_per_shard)
            or (options.max_shard_bytes
                and archive_bytes(used + size) > options.max_shard_bytes))
        if not shards or full:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += size
    return shards


def _windows(todo: list[int], shards: list[list[Planned]], sources: Sequence[Source],
             budget: int) -> Iterator[list[int]]:
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
    """Re-read streamed sources for the audio of ``items``, stopping once all are found."""
    wanted: dict[int, dict[str, str]] = {}
    for item in items:
        if sources[item.source].streamed:
            wanted.setdefault(item.source, {})[item.utt_id] = item.location
    got: dict[str, bytes] = {}
    for index, ids in sorted(wanted.items()):
        left = dict(ids)
        for event in sources[index].events():
            if isinstance(event, AudioFound) and left.get(event.utt_id) == event.location:
                got[event.utt_id] = event.data
                del left[event.utt_id]
                if not left:
                    break
        if left:
            raise RuntimeError(f"{sources[index].location} changed while converting: "
                               f"{len(left)} utterances seen in the scan are gone")
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
            f"folder or pass --overwrite to delete them")
    for name in foreign:
        (output_dir / name).unlink()


def _journal(journal, record: ShardRecord) -> None:
    journal.write(json.dumps({"file": record.file, "sha256": record.sha256}) + "\n")
    journal.flush()


def _written_hashes(output_dir: Path) -> dict[str, str]:
    """sha256 of each shard as written, from index.json and an unfinished run's journal."""
    known: dict[str, str] = {}
    try:
        known.update((e["file"], e["sha256"]) for e in read_index(output_dir)["shards"])
    except (ShardFormatError, KeyError, TypeError):
        pass  # no usable index: only the journal can vouch for shards
    journal = output_dir / JOURNAL_NAME
    if journal.exists():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                known[entry["file"]] = entry["sha256"]
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the kill
    return known


def convert(sources: Sequence[Source], output_dir: Path, options: ShardOptions,
            num_workers: int = 1, overwrite: bool = False,
            progress: Callable | None = None) -> ConversionSummary:
    """Scan ``sources``, write the planned shards into ``output_dir`` and its index.json.

    ``progress(stage, utterances, seconds)`` is called as work is done; ``overwrite`` lets
    the run delete shards in ``output_dir`` that its plan does not name. Re-running after a
    kill keeps the complete shards it verifies and gives byte-identical output.
    """
    output_dir = Path(output_dir)
    report = progress or (lambda stage, n, seconds: None)
    mapper = _Mapper(num_workers)
    try:
        found, transcripts, problems = _scan(
            sources, options, mapper,
            lambda n, samples: report("scan", n, samples / audio.SAMPLE_RATE))
        planned = _select(found, transcripts, options, problems)
        del found
        if not planned:
            raise NothingUsable("no usable utterance was found in the inputs")
        shards = plan_shards(planned, options)
        paths = [output_dir / shard_name(i) for i in range(len(shards))]
        _prepare_output(output_dir, {p.name for p in paths}, overwrite)

        records: list[ShardRecord | None] = [None] * len(shards)
        written = _written_hashes(output_dir)
        existing = [i for i, p in enumerate(paths) if p.exists()]
        checks = mapper.map(_check_job, [(paths[i], shards[i], written.get(paths[i].name))
                                         for i in existing])
        for i, record in zip(existing, checks):
            records[i] = record
            if record:
                report("write", len(shards[i]), record.seconds)
        todo = [i for i, r in enumerate(records) if r is None]
        journal_path = output_dir / JOURNAL_NAME
        with open(journal_path, "w", encoding="utf-8") as journal:
            for record in records:
                if record:
                    _journal(journal, record)
            if todo:
                (output_dir / INDEX_NAME).unlink(missing_ok=True)  # never beside new shards
            for window in _windows(todo, shards, sources, options.max_buffer_bytes):
                fetched = _fetch((p for i in window for p in shards[i]), sources)
                jobs = [(paths[i], [(p, fetched.pop(p.utt_id, None)) for p in shards[i]])
                        for i in window]
                for i, record in zip(window, mapper.map(_write_job, jobs, chunksize=1)):
                    records[i] = record
                    _journal(journal, record)
                    report("write", record.num_utterances, record.seconds)
    finally:
        mapper.close()

    by_reason: dict[str, list[Problem]] = {}
    for problem in problems:
        by_reason.setdefault(problem.reason, []).append(problem)
    write_index(output_dir, build_index(records, shards, by_reason, options))
    journal_path.unlink()
    return ConversionSummary(
        output_dir, shards_written=len(todo), shards_kept=len(shards) - len(todo),
        utterances=sum(r.num_utterances for r in records),
        seconds=sum(r.seconds for r in records), bytes=sum(r.bytes for r in records),
        problems=by_reason)


def build_index(records: list[ShardRecord], shards: list[list[Planned]],
                problems: dict[str, list[Problem]], options: ShardOptions) -> dict:
    lengths = [n for r in records for n in r.num_samples]
    bins = Counter(int(n // audio.SAMPLE_RATE) for n in lengths)
    splits: dict[str, list[float]] = {}
    for items in shards:
        for item in items:
            entry = splits.setdefault(item.split, [0, 0.0])
            entry[0] += 1
            entry[1] += item.num_samples / audio.SAMPLE_RATE
    seconds = sum(lengths) / audio.SAMPLE_RATE
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"w2v_stream {__version__} tools/make_shards.py",
        "sample_rate": audio.SAMPLE_RATE,
        "options": options.for_index(),
        "shards": [r.to_json() for r in records],
        "totals": {"shards": len(records), "utterances": len(lengths),
                   "seconds": round(seconds, 3), "hours": round(seconds / 3600, 4),
                   "bytes": sum(r.bytes for r in records),
                   "min_seconds": round(min(lengths) / audio.SAMPLE_RATE, 4),
                   "max_seconds": round(max(lengths) / audio.SAMPLE_RATE, 4)},
        "splits": {k: {"utterances": n, "hours": round(s / 3600, 4)}
                   for k, (n, s) in sorted(splits.items())},
        "duration_histogram": {"bin_seconds": 1,
                               "counts": [bins.get(b, 0) for b in range(max(bins) + 1)]},
        "problems": {reason: {"count": len(items), "kept": reason in NOTE_REASONS,
                              "items": [{"id": p.utt_id, "location": p.location,
                                         "detail": p.detail} for p in items[:MAX_LISTED]]}
                     for reason, items in sorted(problems.items())},
    }


# ---------------------------------------------------------------- verification

@dataclass
class VerifyReport:
    shards: int = 0
    utterances: int = 0
    errors: list[str] = field(default_factory=list)


def _verify_shard(job: tuple[Path, dict]) -> tuple[int, list[str]]:
    path, entry = job
    errors: list[str] = []
    name = entry.get("file", "?")
    if not path.exists():
        return 0, [f"{name}: missing"]
    if path.stat().st_size != entry.get("bytes"):
        errors.append(f"{name}: {path.stat().st_size} bytes, index says {entry.get('bytes')}")
    if file_sha256(path) != entry.get("sha256"):
        errors.append(f"{name}: sha256 differs from the index")
    lengths: list[int] = []
    try:
        with open(path, "rb") as f:
            for key, parts in iter_samples(f, name):
                if set(parts) != {"flac", "json"}:
                    errors.append(f"{name}: sample {key} has members {sorted(parts)}, "
                                  f"expected flac and json")
                    continue
                try:
                    meta = json.loads(parts["json"])
                    info = audio.probe(parts["flac"], full_decode=True)
                except (ValueError, audio.AudioError) as exc:
                    errors.append(f"{name}: sample {key}: {exc}")
                    continue
                if not info.is_target or info.num_samples != meta.get("num_samples"):
                    errors.append(f"{name}: sample {key}: {info} disagrees with its metadata "
                                  f"{meta.get('num_samples')} samples")
                lengths.append(int(meta.get("num_samples", -1)))
    except Exception as exc:  # tarfile raises many kinds; each is a broken shard here
        errors.append(f"{name}: unreadable tar ({exc})")
    if lengths != entry.get("num_samples"):
        errors.append(f"{name}: {len(lengths)} samples whose lengths differ from the index "
                      f"({entry.get('num_utterances')} listed)")
    return len(lengths), errors


def verify(output_dir: Path, num_workers: int = 1) -> VerifyReport:
    """Check shards against index.json: size, sha256, counts, lengths, every FLAC decodes."""
    output_dir = Path(output_dir)
    index = read_index(output_dir)
    report = VerifyReport(shards=len(index["shards"]))
    mapper = _Mapper(num_workers)
    try:
        jobs = [(output_dir / e["file"], e) for e in index["shards"]]
        for count, errors in mapper.map(_verify_shard, jobs):
            report.utterances += count
            report.errors += errors
    finally:
        mapper.close()
    if report.utterances != index["totals"]["utterances"]:
        report.errors.append(f"index totals say {index['totals']['utterances']} utterances, "
                             f"shards hold {report.utterances}")
    return report


def format_summary(summary: ConversionSummary) -> str:
    """The table printed at the end of a conversion."""
    rows = [("output", str(summary.output_dir)),
            ("shards", f"{summary.shards_written + summary.shards_kept} "
                       f"({summary.shards_written} written, {summary.shards_kept} kept)"),
            ("utterances", f"{summary.utterances}"),
            ("audio", f"{summary.seconds / 3600:.3f} h"),
            ("bytes", f"{summary.bytes / 1e6:.1f} MB")]
    for reason, items in sorted(summary.problems.items()):
        kind = "kept" if reason in NOTE_REASONS else "skipped"
        example = next((p.utt_id or p.location for p in items), "")
        rows.append((f"{kind}: {reason}", f"{len(items)}  (e.g. {example})"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"{'total skipped':<{width}}  {summary.skipped()} (details in index.json)")
    return "\n".join(lines)
