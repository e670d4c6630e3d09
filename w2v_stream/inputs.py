"""Finding utterances in your own audio: a folder of audio files, a fairseq manifest, a lhotse
manifest.

4. A folder that is not a LibriSpeech layout: every audio file under it, recursively, in
   sorted relative-path order; hidden files and folders are skipped, and so is a symbolic
   link that leads back into a folder it is in.
5. A fairseq manifest (``train.tsv``): the root folder on the first line, then one
   ``relative/path<TAB>num_samples`` line per file.
6. A lhotse ``RecordingSet`` or ``CutSet`` manifest (``.jsonl``, ``.jsonl.gz``), read with
   lhotse itself: each recording, or each cut (its start, duration and channels), is one
   utterance.

Ids come from the relative path (``hashed_id``) or the cut's id (``utterance_id``), so they
are unique and the same from run to run; the file goes into the sample's metadata as
``source``. Each kind yields the events of ``events.py``, so the converter treats them as any
other input.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, NamedTuple, Sequence

from .audio import Excerpt
from .events import AudioFound, Event, Problem
from .shards import ShardFormatError, check_id

AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "opus", "mp3")
LHOTSE_PIP = "pip install lhotse==1.33.0"
FILES_PER_PART = 256  # files at the top of a folder walked by one worker at a time
# A hashed id is a readable part of at most _ID_STEM_CHARS, "-" and _HASH_BYTES in hex:
# at most _MAX_ID_CHARS (57), which leaves room under shards' limit of 80 for a piece
# number ("-00012") when a long recording is cut.
_ID_STEM_CHARS = 40
_HASH_BYTES = 8
_MAX_ID_CHARS = _ID_STEM_CHARS + 1 + 2 * _HASH_BYTES
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def utterance_id(name: str) -> str:
    """A manifest's id as a shard-safe id: the id itself when it is safe and leaves room for
    a piece number, else ``hashed_id`` of it."""
    try:
        if len(name) <= _MAX_ID_CHARS:
            return check_id(name)
    except ShardFormatError:
        pass
    return hashed_id(name)


def hashed_id(name: str) -> str:
    """A shard-safe id for a relative path (or any name): its readable part (``/`` becomes
    ``-``, a run of other unsafe characters ``_``, only the end kept) and a hash of the whole
    name, which keeps the ids of different names different (``a.wav`` and ``a.flac`` too)."""
    stem = _UNSAFE.sub("_", name.rsplit(".", 1)[0].replace("/", "-"))
    stem = stem[-_ID_STEM_CHARS:].lstrip("_-") or "u"
    return f"{stem}-{hashlib.blake2b(name.encode(), digest_size=_HASH_BYTES).hexdigest()}"


class AudioFolderSource:
    """Every audio file under a folder, recursively; the id is the relative path's."""

    streamed = False

    def __init__(self, root: Path, split: str, extensions: Sequence[str] = AUDIO_EXTENSIONS):
        self.root = str(root)
        self.location = self.root
        self.split = split
        self.suffixes = tuple("." + e.lower().lstrip(".") for e in extensions)

    def parts(self) -> list[tuple[Entry, ...]]:
        """The folder in pieces that workers walk on their own: each folder at the top, and
        the files between them in runs of at most FILES_PER_PART. Their events, in this
        order, are ``events()``'s."""
        parts: list[tuple[Entry, ...]] = []
        files: list[Entry] = []
        for entry in self._entries(self.root):
            if files and (entry.is_folder or len(files) == FILES_PER_PART):
                parts.append(tuple(files))
                files = []
            if entry.is_folder:
                parts.append((entry,))
            else:
                files.append(entry)
        return parts + ([tuple(files)] if files else [])

    def events(self, part: tuple[Entry, ...] | None = None) -> Iterator[Event]:
        """Every audio file's event in sorted relative-path order; one piece's with ``part``
        (see parts)."""
        try:
            top = frozenset({_identity(self.root)})
            entries = self._entries(self.root) if part is None else part
        except OSError as exc:
            yield Problem("unreadable_folder", None, self.root, str(exc))
            return
        for entry in entries:
            yield from self._walk(entry, top)

    def _walk(self, entry: Entry, ancestors: frozenset) -> Iterator[Event]:
        """``entry``'s event, or those of everything under it (``ancestors``: the folders it
        is in, to catch a link back to one of them)."""
        path = os.path.join(self.root, entry.relative)
        if not entry.is_folder:
            yield AudioFound(
                hashed_id(entry.relative), None, None, self.split, path, path=path, source=path
            )
            return
        try:
            identity = _identity(path)
            if identity in ancestors:
                yield Problem(
                    "symlink_loop", None, path, "a link back to a folder it is in; not followed"
                )
                return
            entries = self._entries(path, entry.relative + "/")
        except OSError as exc:
            yield Problem("unreadable_folder", None, path, str(exc))
            return
        for inner in entries:
            yield from self._walk(inner, ancestors | {identity})

    def _entries(self, folder: str, prefix: str = "") -> list[Entry]:
        """The folders and audio files in ``folder``, sorted by name, hidden ones left out;
        ``prefix`` is ``folder``'s path relative to the root."""
        with os.scandir(folder) as found:
            entries = [
                Entry(prefix + e.name, e.is_dir())
                for e in found
                if not e.name.startswith(".")
                and (e.is_dir() or e.name.lower().endswith(self.suffixes))
            ]
        return sorted(entries)


class Entry(NamedTuple):
    """A folder or an audio file found under an audio folder."""

    relative: str  # its path from the folder given, with "/" between names
    is_folder: bool


def _identity(path: str) -> tuple[int, int]:
    """What a folder is, whatever links lead to it: its device and inode."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


@dataclass(frozen=True)
class ManifestSource:
    """A manifest listing audio files: ``fairseq`` (``.tsv``) or ``lhotse`` (``.jsonl``,
    ``.jsonl.gz``)."""

    location: str  # the manifest's path
    split: str
    kind: str
    streamed: ClassVar[bool] = False

    def events(self) -> Iterator[Event]:
        if self.kind == "lhotse":
            return _lhotse_events(self.location, self.split)
        return self._fairseq_events()

    def _fairseq_events(self) -> Iterator[Event]:
        """The root folder, then ``relative/path<TAB>num_samples`` lines."""
        try:
            with open(self.location, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            yield Problem("bad_manifest", None, self.location, f"unreadable ({exc})")
            return
        root = lines[0].strip() if lines else ""
        if not root:
            yield Problem(
                "bad_manifest",
                None,
                self.location,
                "the first line must be the root folder of the files listed",
            )
            return
        for number, line in enumerate(lines[1:], 2):
            relative, tab, count = line.partition("\t")
            if not line.strip():
                continue
            if not tab or not relative or not count.strip().isdigit():
                yield Problem(
                    "bad_manifest_line",
                    None,
                    f"{self.location}:{number}",
                    f"expected relative/path<TAB>num_samples: {line[:60]!r}",
                )
                continue
            path = os.path.join(root, relative)
            yield AudioFound(
                hashed_id(relative), None, None, self.split, path, path=path, source=path
            )


def require_lhotse(where: str) -> None:
    """ValueError, in one line saying how to install it, when lhotse is not importable."""
    try:
        import lhotse  # noqa: F401  (only lhotse manifests need it)
    except ImportError:
        raise ValueError(f"{where}: reading a lhotse manifest needs lhotse: {LHOTSE_PIP}") from None


def _lhotse_events(manifest: str, split: str) -> Iterator[Event]:
    """A lhotse RecordingSet or CutSet manifest's utterances, read lazily."""
    from lhotse import Recording, load_manifest_lazy

    try:
        items = load_manifest_lazy(manifest)
        if items is None:
            raise ValueError("not a lhotse .jsonl or .jsonl.gz manifest")
        for item in items:
            yield _lhotse_event(item, isinstance(item, Recording), f"{manifest}#{item.id}", split)
    except Exception as exc:  # lhotse's parsers raise many kinds; what came before stays
        yield Problem(
            "bad_manifest",
            None,
            manifest,
            f"unreadable past this point ({type(exc).__name__}: {exc})",
        )


def _lhotse_event(item, is_recording: bool, location: str, split: str) -> Event:
    """One recording or cut: an utterance, or the problem that keeps it out."""
    recording = item if is_recording else getattr(item, "recording", None)
    if recording is None:
        return Problem(
            "unsupported_cut",
            None,
            location,
            f"a {type(item).__name__} has no single recording; mixed and padding cuts are not read",
        )
    sources = recording.sources
    if len(sources) != 1 or sources[0].type != "file":
        kinds = ", ".join(s.type for s in sources)
        return Problem(
            "unsupported_source",
            None,
            location,
            f"audio from {len(sources)} source(s) ({kinds}); only a recording in one file is read",
        )
    if getattr(recording, "transforms", None):
        return Problem(
            "unsupported_source",
            None,
            location,
            "the recording has transforms (speed, volume, ...); not applied",
        )
    path = str(sources[0].source)
    excerpt = None
    if not is_recording:
        wanted = item.channel if isinstance(item.channel, list) else [item.channel]
        if not set(wanted) <= set(sources[0].channels):
            return Problem(
                "bad_manifest",
                None,
                location,
                f"channels {wanted} are not in the file's {sources[0].channels}",
            )
        excerpt = Excerpt(
            float(item.start),
            float(item.duration),
            tuple(sources[0].channels.index(c) for c in wanted),
        )
    texts = [] if is_recording else [s.text for s in item.supervisions if s.text]
    return AudioFound(
        utterance_id(item.id),
        None,
        None,
        split,
        location,
        path=path,
        text=" ".join(texts) or None,
        source=path,
        excerpt=excerpt,
    )
