"""Finding LibriSpeech utterances in the three layouts users have, and ``open_sources``,
which turns every kind of input (these, and your own audio's kinds in ``inputs.py``) into
sources.

1. An OpenSLR split folder (``.../LibriSpeech/train-clean-100``) or the ``LibriSpeech`` root.
2. An OpenSLR split archive (``train-clean-100.tar.gz``), read as a stream: nothing is
   extracted, only one member is in memory at a time.
3. The Hugging Face ``librispeech_asr`` parquet layout (columns ``file``, ``audio``
   {``bytes``, ``path``}, ``text``, ``speaker_id``, ``chapter_id``, ``id``), a file or a folder.

Every source yields the same three kinds of event (``AudioFound``, ``TranscriptFound``,
``Problem``) in a deterministic order; joining transcripts to audio is the caller's job, since
in an archive a chapter's transcript may come before or after its audio.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple, Sequence

from .events import AudioFound, Event, Problem, Source, TranscriptFound
from .inputs import AUDIO_EXTENSIONS, AudioFolderSource, ManifestSource, require_lhotse
from .shards import ShardFormatError, check_id

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3")
TRANSCRIPT_SUFFIX = ".trans.txt"
_LIBRISPEECH_ID = re.compile(r"(\d+)-(\d+)-(\d+)")
# A split folder's name as it can appear in an archive member's path.
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NUMBER = re.compile(r"[0-9]+")  # a speaker or chapter folder
# Hugging Face split names (file names like "train.clean.100-00000-of-00014.parquet", or
# folders "clean/train.100/") to the OpenSLR ones used in ids and metadata.
_HF_SPLITS = {
    "train.clean.100": "train-clean-100",
    "train.clean.360": "train-clean-360",
    "train.other.500": "train-other-500",
    "validation.clean": "dev-clean",
    "validation.other": "dev-other",
    "test.clean": "test-clean",
    "test.other": "test-other",
    "clean/train.100": "train-clean-100",
    "clean/train.360": "train-clean-360",
    "other/train.500": "train-other-500",
    "clean/validation": "dev-clean",
    "other/validation": "dev-other",
    "clean/test": "test-clean",
    "other/test": "test-other",
}


def parse_utterance_name(stem: str, location: str) -> tuple[str, int, int] | Problem:
    """``"103-1240-0000"`` → (id, speaker, chapter), or a Problem for anything else."""
    match = _LIBRISPEECH_ID.fullmatch(stem)
    if not match:
        return Problem(
            "unrecognised_name", None, location, f"{stem!r} is not <speaker>-<chapter>-<utterance>"
        )
    return stem, int(match.group(1)), int(match.group(2))


def parse_transcript(text: str, location: str) -> Iterator[TranscriptFound | Problem]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        utt_id, _, words = line.strip().partition(" ")
        if not _LIBRISPEECH_ID.fullmatch(utt_id):
            yield Problem(
                "bad_transcript_line",
                None,
                f"{location}:{number}",
                f"line does not start with an utterance id: {line[:60]!r}",
            )
            continue
        yield TranscriptFound(utt_id, words.strip(), f"{location}:{number}")


def _audio_from_name(name: str, split: str, location: str, **where) -> AudioFound | Problem:
    parsed = parse_utterance_name(name.rsplit("/", 1)[-1].rsplit(".", 1)[0], location)
    if isinstance(parsed, Problem):
        return parsed
    utt_id, speaker, chapter = parsed
    return AudioFound(utt_id, speaker, chapter, split, location, **where)


class FolderSource:
    """An OpenSLR split folder: ``<split>/<speaker>/<chapter>/<id>.flac`` + ``.trans.txt``."""

    streamed = False

    def __init__(self, split_dir: Path):
        self.split_dir = Path(split_dir)
        self.location = str(self.split_dir)
        self.split = self.split_dir.name

    def parts(self) -> list[str]:
        """The folder in pieces that workers can walk on their own: ``""`` (the files at the
        top), then each subfolder. Their events, in this order, are ``events()``'s."""
        with os.scandir(self.split_dir) as entries:
            return ["", *sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))]

    def events(self, part: str | None = None) -> Iterator[Event]:
        """Every file's event in path order; only one piece's with ``part`` (see parts)."""
        if part is None:
            walk = os.walk(self.split_dir)
        elif part == "":
            top, _, names = next(os.walk(self.split_dir), (str(self.split_dir), [], []))
            walk = [(top, [], names)]
        else:
            walk = os.walk(os.path.join(self.split_dir, part))
        # Plain strings, sorted by path components as pathlib sorts.
        files = [(top.split(os.sep), top, name) for top, _, names in walk for name in names]
        files.sort(key=lambda f: (f[0], f[2]))
        for _, top, name in files:
            location = os.path.join(top, name)
            if name.endswith(TRANSCRIPT_SUFFIX):
                with open(location, encoding="utf-8", errors="replace") as f:
                    yield from parse_transcript(f.read(), location)
            elif os.path.splitext(name)[1].lower() in AUDIO_SUFFIXES:
                yield _audio_from_name(name, self.split, location, path=location)


class ArchiveSource:
    """An OpenSLR archive (``.tar.gz``/``.tgz``/``.tar``) read once, front to back."""

    streamed = True

    def __init__(self, archive: Path, splits: tuple[str, ...] = ()):
        self.archive = Path(archive)
        self.location = str(self.archive)
        self.splits = splits

    def events(self) -> Iterator[Event]:
        try:
            with tarfile.open(self.archive, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name
                    is_audio = PurePosixPath(name).suffix.lower() in AUDIO_SUFFIXES
                    if not (is_audio or name.endswith(TRANSCRIPT_SUFFIX)):
                        continue
                    location = f"{self.archive}:{name}"
                    split = member_split(name)
                    if isinstance(split, str) and self.splits and split not in self.splits:
                        continue
                    if not isinstance(split, str):
                        yield Problem(split.reason, None, location, split.detail)
                        continue
                    data = tar.extractfile(member).read()
                    if is_audio:
                        yield _audio_from_name(name, split, location, data=data)
                    else:
                        yield from parse_transcript(
                            data.decode("utf-8", errors="replace"), location
                        )
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            yield Problem(
                "broken_archive",
                None,
                self.location,
                f"archive unreadable past this point ({exc}); what came before it was kept",
            )


class _Misplaced(NamedTuple):
    reason: str
    detail: str


def member_split(name: str) -> str | _Misplaced:
    """The split of an archive member ``[...]/<split>/<speaker>/<chapter>/<file>``, or why
    it cannot be used: an absolute path or one with ``..`` (``unsafe_member``), or a path not
    under a split, a speaker and a chapter folder (``misplaced_member``)."""
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        return _Misplaced("unsafe_member", "absolute path or '..' in an archive member name")
    parts = [p for p in parts if p not in ("", ".")]
    # "LibriSpeech" is the corpus root that holds the split folders, never a split.
    if (
        len(parts) < 4
        or not _SPLIT_NAME.fullmatch(parts[-4])
        or parts[-4].lower() == "librispeech"
        or not _NUMBER.fullmatch(parts[-3])
        or not _NUMBER.fullmatch(parts[-2])
    ):
        return _Misplaced(
            "misplaced_member", "not under <split>/<speaker>/<chapter>/ (the OpenSLR layout)"
        )
    return parts[-4]


class ParquetSource:
    """A Hugging Face ``librispeech_asr`` parquet file, read in small row batches."""

    streamed = True
    COLUMNS = ("id", "speaker_id", "chapter_id", "text", "audio")
    BATCH_ROWS = 32

    def __init__(self, path: Path, split: str | None = None):
        self.path = Path(path)
        self.location = str(self.path)
        self.split = split or split_from_parquet_path(self.path)

    def events(self) -> Iterator[Event]:
        import pyarrow.parquet as pq  # only parquet inputs need pyarrow

        try:
            reader = pq.ParquetFile(self.path)
            missing = [c for c in self.COLUMNS if c not in reader.schema_arrow.names]
            if missing:
                yield Problem(
                    "bad_parquet",
                    None,
                    self.location,
                    f"missing columns {missing}; expected the librispeech_asr layout",
                )
                return
            row = 0
            for batch in reader.iter_batches(
                batch_size=self.BATCH_ROWS, columns=list(self.COLUMNS)
            ):
                for record in batch.to_pylist():
                    yield self._event(record, f"{self.location}#{row}")
                    row += 1
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            yield Problem("bad_parquet", None, self.location, f"unreadable parquet ({exc})")

    def _event(self, record: dict, location: str) -> Event:
        utt_id = str(record.get("id") or "")
        try:
            check_id(utt_id)
        except ShardFormatError as exc:
            return Problem("unsafe_id", None, location, str(exc))
        audio = record.get("audio") or {}
        data = audio.get("bytes") if isinstance(audio, dict) else None
        if not data:
            return Problem("missing_audio", utt_id, location, "row has no audio bytes")
        try:
            speaker, chapter = int(record["speaker_id"]), int(record["chapter_id"])
        except (TypeError, ValueError, KeyError):
            return Problem("bad_metadata", utt_id, location, "speaker_id/chapter_id not integers")
        text = record.get("text")
        return AudioFound(
            utt_id,
            speaker,
            chapter,
            self.split,
            location,
            data=bytes(data),
            text=None if text is None else str(text),
        )


def split_from_parquet_path(path: Path) -> str:
    """The OpenSLR split name from a Hugging Face parquet path, or the file's stem."""
    posix = Path(path).as_posix()
    stem = Path(path).name.split("-")[0]
    if stem in _HF_SPLITS:
        return _HF_SPLITS[stem]
    for hf, split in _HF_SPLITS.items():
        if "/" in hf and f"/{hf}/" in f"/{posix}":
            return split
    return stem.split(".")[0]


def is_split_folder(path: Path) -> bool:
    """True for ``<split>/`` holding ``<speaker>/<chapter>/`` folders of digits whose first
    chapter holds an utterance or transcript named for them (``<speaker>-<chapter>-0000.flac``,
    ``<speaker>-<chapter>.trans.txt``): a folder of your own audio sorted into numbered
    folders (years, months) is not taken for one."""
    for speaker in sorted(p for p in path.iterdir() if p.is_dir() and p.name.isdigit()):
        for chapter in sorted(p for p in speaker.iterdir() if p.is_dir() and p.name.isdigit()):
            named = re.compile(rf"{speaker.name}-{chapter.name}(-\d+\.\w+|\.trans\.txt)")
            return any(named.fullmatch(f.name) for f in chapter.iterdir())
    return False


def open_sources(
    inputs: list[str],
    splits: tuple[str, ...] = (),
    split_name: str | None = None,
    audio_extensions: Sequence[str] = AUDIO_EXTENSIONS,
) -> list[Source]:
    """Turn command-line inputs into sources; raise ValueError for an input we can't use.

    LibriSpeech layouts are read here; a folder that is none of them, a fairseq ``.tsv`` and a
    lhotse ``.jsonl``/``.jsonl.gz`` are read by ``inputs.py``, their split named by
    ``split_name`` (default ``train``), their audio files found by ``audio_extensions``.
    """
    sources: list[Source] = []
    own_split = split_name or "train"
    for raw in inputs:
        path = Path(raw)
        name = path.name.lower()
        if not path.exists():
            raise ValueError(f"{raw}: no such file or folder")
        if path.is_file() and name.endswith((".tar.gz", ".tgz", ".tar")):
            sources.append(ArchiveSource(path, splits))
        elif path.is_file() and name.endswith(".parquet"):
            sources.append(ParquetSource(path, split_name))
        elif path.is_file() and name.endswith(".tsv"):
            sources.append(ManifestSource(str(path), own_split, "fairseq"))
        elif path.is_file() and name.endswith((".jsonl", ".jsonl.gz")):
            require_lhotse(raw)
            sources.append(ManifestSource(str(path), own_split, "lhotse"))
        elif path.is_dir() and is_split_folder(path):
            sources.append(FolderSource(path))
        elif path.is_dir():
            sources.extend(
                _sources_in_folder(path, splits, split_name, own_split, audio_extensions)
            )
        else:
            raise ValueError(
                f"{raw}: not a folder, .tar.gz/.tgz/.tar archive, .parquet, "
                f"fairseq .tsv or lhotse .jsonl/.jsonl.gz manifest"
            )
    if splits:  # parquet files name their split; keep the asked-for ones
        sources = [s for s in sources if not isinstance(s, ParquetSource) or s.split in splits]
    return sources


def _sources_in_folder(
    path: Path,
    splits: tuple[str, ...],
    split_name: str | None,
    own_split: str,
    audio_extensions: Sequence[str],
) -> list[Source]:
    """A LibriSpeech root (split folders one level down), a folder of parquet files, or else
    a folder of your own audio."""
    # Split folders are looked for one level down before any search for parquet, which
    # walks the whole tree (a LibriSpeech root holds every utterance's file).
    found = sorted(p for p in path.iterdir() if p.is_dir() and is_split_folder(p))
    if found and splits:
        absent = [s for s in splits if not (path / s).is_dir()]
        if absent:
            raise ValueError(f"{path}: no split folder(s) {absent} inside")
        found = [path / s for s in splits]
    if found:
        return [FolderSource(p) for p in found]
    files = sorted(path.rglob("*.parquet"))
    if files:
        return [ParquetSource(f, split_name) for f in files]
    return [AudioFolderSource(path, own_split, audio_extensions)]
