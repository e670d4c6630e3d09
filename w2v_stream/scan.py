"""The conversion's first pass: read every source once and decide what goes into shards.

``scan`` reads every source, probes each utterance's audio in worker processes (header plus
a decode of its tail, or a full decode) and joins transcripts; it keeps only small facts, no
audio. ``select`` turns those facts into ``Planned`` utterances (everything needed to write
one again) and a ``Problem`` for each utterance left out or changed, with its reason.
``Mapper`` is the process pool both passes of the conversion use.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple, Sequence

from . import audio, segment
from .events import AudioFound, Event, Problem, Source, TranscriptFound
from .shards import ShardFormatError, check_id, encode_metadata

# Problems that are notes on utterances kept (the others mean an utterance was left out).
KEPT_REASONS = frozenset({"converted", "no_transcript", "segmented"})
SCAN_BATCH_BYTES = 32 << 20  # audio bytes handed to the workers at once while scanning
SCAN_BATCH_ITEMS = 512  # utterances handed to the workers at once while scanning
SCAN_IN_FLIGHT = 2  # batches probed while the walk reads on


class Piece(NamedTuple):
    """One piece of a long recording cut by ``segment.cut``: its samples and FLAC's size."""

    span: segment.Span
    flac_size: int


class Probe(NamedTuple):
    """What probing one utterance's audio found."""

    info: audio.AudioInfo | None  # None when the audio is unreadable
    convert: bool  # not 16 kHz mono FLAC with its length in the header: re-encoded
    flac_size: int  # bytes of the FLAC that goes into the shard
    num_samples: int
    error: str | None  # why the audio is unreadable
    # A recording cut into pieces (empty: kept whole), and the pieces too short to keep.
    pieces: tuple[Piece, ...] = ()
    dropped: tuple[segment.Span, ...] = ()


class ProbeOptions(NamedTuple):
    """How utterances are probed: decoded fully or not, long ones cut by ``rule`` or not."""

    full_decode: bool = False
    rule: segment.Rule | None = None


class Made(NamedTuple):
    """A sample's metadata made ahead by a walking worker, with the text it joined."""

    text: str | None
    meta: bytes


class Found(NamedTuple):
    """One utterance's audio seen by the scan (its bytes dropped), with its probe."""

    source: int  # index into the sources list
    event: AudioFound
    probe: Probe
    made: Made | None  # None when the audio is unreadable or came from a streamed source


class Scanned(NamedTuple):
    """Everything the scan keeps."""

    found: list[Found]
    transcripts: dict[str, str]  # id -> the first transcript line seen for it
    problems: list[Problem]


class _WalkedPiece(NamedTuple):
    events: list[Event]
    probes: list[Probe]  # one per AudioFound in events, in order
    made: list[Made | None]  # one per AudioFound in events, in order


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
    excerpt: audio.Excerpt | None = None  # the part of the file that is the utterance
    span: segment.Span | None = None  # the piece of the decoded utterance that is this one


class Mapper:
    """Ordered map over a process pool (or in-process for one worker)."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.pool = (
            multiprocessing.get_context("fork").Pool(num_workers) if num_workers > 1 else None
        )

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


# ---------------------------------------------------------------- worker functions (picklable)


def _probe(event: AudioFound, options: ProbeOptions) -> Probe:
    """Probe one utterance's audio, from its file (``event.path``) or its bytes
    (``event.data``); decode, and cut it into pieces, when it is an excerpt or longer than
    ``options.rule`` allows."""
    path, data, rule = event.path, event.data, options.rule
    try:
        info = audio.probe(path if data is None else data, full_decode=options.full_decode)
        long = (
            rule is not None
            and info.num_samples * audio.SAMPLE_RATE > rule.max_samples * info.sample_rate
        )
        if event.excerpt is None and not long:
            if info.is_target:
                size = os.stat(path).st_size if data is None else len(data)
                return Probe(info, False, size, info.num_samples, None)
            flac, num_samples = audio.to_target_flac(path if data is None else data)
            return Probe(info, True, len(flac), num_samples, None)
        signal = audio.decode_target(path if data is None else data, event.excerpt)
        pieces = segment.cut(signal, rule) if rule is not None else None
        if pieces is None or len(pieces.kept) + len(pieces.dropped) == 1:
            return Probe(info, True, len(audio.encode_flac(signal)), signal.shape[0], None)
        kept = tuple(
            Piece(span, len(audio.encode_flac(signal[span.start : span.stop])))
            for span in pieces.kept
        )
        return Probe(
            info,
            True,
            sum(p.flac_size for p in kept),
            signal.shape[0],
            None,
            kept,
            tuple(pieces.dropped),
        )
    except (audio.AudioError, OSError) as exc:
        return Probe(None, False, 0, 0, str(exc))


def _probe_job(job: tuple[AudioFound, ProbeOptions]) -> Probe:
    return _probe(*job)


def _walk_probe_job(job: tuple[Source, object, ProbeOptions]) -> _WalkedPiece:
    """The events of one piece of a folder source, the probe of each audio event, and its
    metadata made ahead with the transcript this piece holds.

    Encoding the metadata here takes it off the main process, whose ``select`` runs on one
    core while the workers wait; ``select`` keeps it when the text it joins is the same.
    """
    source, part, options = job
    events = list(source.events(part))
    texts: dict[str, str] = {}
    for event in events:
        if isinstance(event, TranscriptFound):
            texts.setdefault(event.utt_id, event.text)
    audio_events = [e for e in events if isinstance(e, AudioFound)]
    probes = [_probe(e, options) for e in audio_events]
    made = []
    for event, probe in zip(audio_events, probes):
        text = event.text if event.text is not None else texts.get(event.utt_id)
        made.append(
            None
            if probe.error is not None or probe.pieces
            else Made(text, metadata(event, text, probe))
        )
    return _WalkedPiece(events, probes, made)


# ---------------------------------------------------------------- the pass


def scan(
    sources: Sequence[Source],
    full_decode: bool,
    mapper: Mapper,
    progress: Callable[[int, int], None],
    rule: segment.Rule | None = None,
) -> Scanned:
    """Read every source once; probe audio in the workers; keep only small facts.

    Utterances longer than ``rule`` allows are cut into pieces (``Probe.pieces``).

    ``progress(utterances, samples)`` is called as utterances are probed. A folder is walked
    by the workers themselves, a piece (subfolder) each, so the main process only gathers.
    Other sources are read here and their audio goes to the workers in batches while the
    reading goes on (at most SCAN_IN_FLIGHT batches out at once, so memory stays bounded for
    sources that carry their bytes).
    """
    scanned = Scanned([], {}, [])
    in_flight: deque = deque()
    options = ProbeOptions(full_decode, rule)

    def collect(keep: int) -> None:
        while len(in_flight) > keep:
            index, events, probes = in_flight.popleft()
            for event, probe in zip(events, probes):
                # Drop the bytes now: the write pass reads them again, memory stays bounded.
                scanned.found.append(Found(index, replace(event, data=None), probe, None))
                progress(1, probe.num_samples)

    def submit(index: int, batch: list[AudioFound]) -> None:
        if batch:
            jobs = [(e, options) for e in batch]
            in_flight.append((index, batch, mapper.map(_probe_job, jobs)))
        collect(SCAN_IN_FLIGHT)

    for index, source in enumerate(sources):
        if hasattr(source, "parts"):  # a folder: workers walk its pieces and probe them
            collect(0)
            jobs = [(source, part, options) for part in source.parts()]
            for piece in mapper.map(_walk_probe_job, jobs, chunksize=1):
                _gather_piece(index, piece, scanned, progress)
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
            else:
                _note(event, scanned)
        submit(index, batch)
    collect(0)
    return scanned


def _gather_piece(index: int, piece: _WalkedPiece, scanned: Scanned, progress) -> None:
    probes, made = iter(piece.probes), iter(piece.made)
    for event in piece.events:
        if isinstance(event, AudioFound):
            probe = next(probes)
            scanned.found.append(Found(index, event, probe, next(made)))
            progress(1, probe.num_samples)
        else:
            _note(event, scanned)


def _note(event: TranscriptFound | Problem, scanned: Scanned) -> None:
    if isinstance(event, TranscriptFound):
        scanned.transcripts.setdefault(event.utt_id, event.text)
    else:
        scanned.problems.append(event)


def select(scanned: Scanned, min_seconds: float | None, max_seconds: float | None) -> list[Planned]:
    """Join transcripts, drop bad, duplicate and out-of-range utterances (and pieces); say
    why for each in ``scanned.problems``."""
    planned: list[Planned] = []
    problems = scanned.problems
    seen: set[str] = set()
    for found in scanned.found:
        event, probe = found.event, found.probe
        utt_id = event.utt_id
        if not _new_id(utt_id, event.location, seen, problems):
            continue
        if probe.error is not None:
            problems.append(Problem("unreadable_audio", utt_id, event.location, probe.error))
            continue
        if probe.pieces:
            _note_converted(found, problems)
            planned += _plan_pieces(found, seen, min_seconds, max_seconds, problems)
            continue
        if not _within(
            utt_id, event.location, probe.num_samples, min_seconds, max_seconds, problems
        ):
            continue
        text = event.text if event.text is not None else scanned.transcripts.get(utt_id)
        if text is None and event.source is None:  # a layout that keeps transcripts
            problems.append(
                Problem(
                    "no_transcript",
                    utt_id,
                    event.location,
                    "no transcript line; kept with text null",
                )
            )
        _note_converted(found, problems)
        # A walking worker made it ahead from the same facts; only the text may differ (a
        # transcript line elsewhere that came first).
        made = found.made
        meta = made.meta if made is not None and made.text == text else metadata(event, text, probe)
        planned.append(
            Planned(
                utt_id,
                found.source,
                event.split,
                event.location,
                event.path,
                probe.convert,
                probe.flac_size,
                probe.num_samples,
                meta,
                event.excerpt,
            )
        )
    for utt_id in sorted(set(scanned.transcripts) - seen):
        problems.append(Problem("transcript_without_audio", utt_id, "", "no audio file found"))
    return planned


def _new_id(utt_id: str, location: str, seen: set[str], problems: list[Problem]) -> bool:
    """True for a safe id not seen before (and now seen); else False, with the problem."""
    try:
        check_id(utt_id)
    except ShardFormatError as exc:
        problems.append(Problem("unsafe_id", None, location, str(exc)))
        return False
    if utt_id in seen:
        problems.append(
            Problem(
                "duplicate_id",
                utt_id,
                location,
                "an utterance with this id came earlier; the first is kept",
            )
        )
        return False
    seen.add(utt_id)
    return True


def _within(
    utt_id: str,
    location: str,
    num_samples: int,
    min_seconds: float | None,
    max_seconds: float | None,
    problems: list[Problem],
) -> bool:
    """True when the duration limits keep it; else False, with the problem."""
    seconds = num_samples / audio.SAMPLE_RATE
    if min_seconds is not None and seconds < min_seconds:
        problems.append(
            Problem(
                "too_short",
                utt_id,
                location,
                f"{seconds:.2f} s < --min_duration_in_seconds {min_seconds}",
                seconds,
            )
        )
        return False
    if max_seconds is not None and seconds > max_seconds:
        problems.append(
            Problem(
                "too_long",
                utt_id,
                location,
                f"{seconds:.2f} s > --max_duration_in_seconds {max_seconds}",
                seconds,
            )
        )
        return False
    return True


def _note_converted(found: Found, problems: list[Problem]) -> None:
    if found.probe.convert:
        info = found.probe.info
        why = "" if info.length_in_header else " (no length in its header)"
        part = " (a part of it)" if found.event.excerpt is not None else ""
        problems.append(
            Problem(
                "converted",
                found.event.utt_id,
                found.event.location,
                f"{info.format} {info.sample_rate} Hz {info.channels} ch"
                f"{why}{part} → FLAC 16000 Hz mono",
            )
        )


def _plan_pieces(
    found: Found,
    seen: set[str],
    min_seconds: float | None,
    max_seconds: float | None,
    problems: list[Problem],
) -> list[Planned]:
    """A long recording's pieces, numbered in order from 0 (kept and dropped alike, so a
    piece's id does not depend on the others)."""
    event, probe = found.event, found.probe
    rate = audio.SAMPLE_RATE
    spans = sorted([(p.span, p) for p in probe.pieces] + [(s, None) for s in probe.dropped])
    problems.append(
        Problem(
            "segmented",
            event.utt_id,
            event.location,
            f"{probe.num_samples / rate:.2f} s cut into {len(probe.pieces)} "
            f"pieces ({len(probe.dropped)} too short, dropped)",
        )
    )
    planned = []
    for number, (span, piece) in enumerate(spans):
        piece_id = f"{event.utt_id}-{number:05d}"
        seconds = (span.stop - span.start) / rate
        if piece is None:
            problems.append(
                Problem(
                    "short_piece",
                    piece_id,
                    event.location,
                    f"{seconds:.2f} s from {span.start / rate:.2f} s < "
                    f"--min_duration_in_seconds {min_seconds}",
                    seconds,
                )
            )
            continue
        if not (
            _new_id(piece_id, event.location, seen, problems)
            and _within(
                piece_id, event.location, span.stop - span.start, min_seconds, max_seconds, problems
            )
        ):
            continue
        planned.append(
            Planned(
                piece_id,
                found.source,
                event.split,
                event.location,
                event.path,
                True,
                piece.flac_size,
                span.stop - span.start,
                metadata(replace(event, utt_id=piece_id), None, probe, piece),
                event.excerpt,
                span,
            )
        )
    return planned


def metadata(
    event: AudioFound, text: str | None, probe: Probe, piece: Piece | None = None
) -> bytes:
    """A sample's JSON member: canonical bytes, the same whichever process makes them.

    For a ``piece`` of a long recording, ``event`` carries the piece's id. ``source`` names
    the file of an utterance whose id is not a LibriSpeech name, or of a piece;
    ``source_offset`` is where a piece or an excerpt starts in it, in 16 kHz samples.
    """
    rate = audio.SAMPLE_RATE
    num_samples = probe.num_samples if piece is None else piece.span.stop - piece.span.start
    meta = {
        "id": event.utt_id,
        "speaker_id": event.speaker_id,
        "chapter_id": event.chapter_id,
        "split": event.split,
        "text": text,
        "sample_rate": rate,
        "num_samples": num_samples,
        "duration": round(num_samples / rate, 6),
        "converted": probe.convert,
    }
    if event.source is not None or piece is not None:
        meta["source"] = event.source or event.location
    if event.excerpt is not None or piece is not None:
        meta["source_offset"] = (round(event.excerpt.start * rate) if event.excerpt else 0) + (
            piece.span.start if piece else 0
        )
    if probe.convert:
        info = probe.info
        meta["original"] = {
            "format": info.format,
            "sample_rate": info.sample_rate,
            "channels": info.channels,
        }
        if not info.length_in_header:
            meta["original"]["length_in_header"] = False
    return encode_metadata(meta)
