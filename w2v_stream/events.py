"""What reading an input yields: the events every source kind shares, and the Source protocol.

A source (a LibriSpeech layout in ``librispeech.py``, an audio folder or a manifest in
``inputs.py``) yields ``AudioFound``, ``TranscriptFound`` and ``Problem`` events in a
deterministic order; the converter (``scan.py``, ``convert.py``) consumes them, whatever the
kind of input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Union

from .audio import Excerpt


@dataclass(frozen=True)
class AudioFound:
    utt_id: str
    speaker_id: int | None  # None for inputs that do not say (audio folders, manifests)
    chapter_id: int | None
    split: str
    location: str  # human-readable: a path, "archive.tar.gz:member", "file.parquet#row"
    # Set when the audio can be re-read at random (a plain file). A str, not a Path: events
    # cross between processes by the thousand, and a Path is slower to unpickle.
    path: str | None = None
    data: bytes | None = None  # set when the audio came from a stream
    text: str | None = None  # set when the layout keeps text beside the audio (parquet)
    # The file the utterance came from, recorded in its metadata as "source": set by inputs
    # whose ids are made from paths or manifest ids rather than taken from LibriSpeech names.
    source: str | None = None
    excerpt: Excerpt | None = None  # the part of the file that is the utterance (None: all)


@dataclass(frozen=True)
class TranscriptFound:
    utt_id: str
    text: str
    location: str


@dataclass(frozen=True)
class Problem:
    reason: str  # a short stable key: "unreadable_audio", "broken_archive", ...
    utt_id: str | None
    location: str
    detail: str
    seconds: float | None = None  # audio left out by it, when its length is known


Event = Union[AudioFound, TranscriptFound, Problem]


class Source(Protocol):
    """One input: yields events; ``streamed`` sources must be re-read to get audio again."""

    location: str
    streamed: bool

    def events(self) -> Iterator[Event]: ...
