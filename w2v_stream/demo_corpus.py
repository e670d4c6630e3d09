"""A synthetic LibriSpeech: real synthetic speech in the OpenSLR layout, made offline.

eSpeak NG (bundled with its voice data in the ``espeakng-loader`` wheel) is driven through
ctypes, resampled from 22,050 Hz to 16 kHz with soxr and stored as 16-bit FLAC in
``<split>/<speaker>/<chapter>/<spk>-<chap>-<utt>.flac`` with ``<spk>-<chap>.trans.txt``.
Durations follow LibriSpeech's shape (most 10–17 s, a tail from 1 s to ~30 s). Everything is
a function of the seed. Also writes the same utterances as an OpenSLR ``.tar.gz`` and as
Hugging Face ``librispeech_asr`` parquet, so the three input kinds can be compared.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soxr

from .audio import SAMPLE_RATE, encode_flac

_WORDS = """the of and to a in that he was it his is with as had for you her not at but be
on him she by which all this so have from they were my one me said there when an or no then
would if we them been their what are out up into more man could time over upon some now very
little about old only day great its like who any much made before two long good well down our
other eyes away first came through your men night say might see must house never where after
should hand again know life thought back went these face head being how light still voice upon
water under while world without young river morning country brother garden window silence
together something nothing everything evening children mother father letter heart door table
across behind beneath between toward forest mountain village kingdom journey answer question
""".split()
# eSpeak voices and variants: a speaker is one voice, one variant, one pitch and one rate.
_VOICES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc")
_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4", "klatt", "Andy", "Annie", "Alex")


class SpeechSynthesizer:
    """eSpeak NG through ctypes, synchronous, one process-wide engine.

    The engine keeps state between utterances that no call resets (its output depends on
    what it said before), so ``make_demo_corpus`` speaks each utterance in a freshly forked
    process: same seed, same bytes. Its own random generator (breath noise of voice variants
    such as f2 and f3) is seeded from the clock at start-up; ``speak`` reseeds it each time.
    """

    _instance: SpeechSynthesizer | None = None

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        retrieval = 1  # AUDIO_OUTPUT_RETRIEVAL: samples come to our callback
        self.rate = self.lib.espeak_Initialize(retrieval, 0, data_parent, 0)
        if self.rate <= 0:
            raise RuntimeError("eSpeak NG failed to initialise from the espeakng-loader wheel")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
        )

        def collect(wav, count, _events):
            if count > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
            return 0  # keep synthesising

        self._callback = callback_type(collect)  # held: C keeps only a raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]

    @classmethod
    def get(cls) -> SpeechSynthesizer:
        if cls._instance is None:
            cls._instance = SpeechSynthesizer()
        return cls._instance

    def speak(
        self, text: str, voice: str, words_per_minute: int, pitch: int, seed: int = 0
    ) -> np.ndarray:
        """Synthesize ``text``; returns int16 samples at ``self.rate`` Hz, a function of
        the arguments (``seed`` drives the engine's noise)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(1, words_per_minute, 0)  # espeakRATE
        self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH, 0-100
        self.lib.espeak_ng_SetRandSeed(seed)
        self._chunks = []
        encoded = text.encode()
        self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, 1, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


@dataclass(frozen=True)
class Speaker:
    speaker_id: int
    voice: str
    words_per_minute: int
    pitch: int


def sample_duration(rng: np.random.Generator) -> float:
    """A LibriSpeech-like utterance length in seconds: mostly 10–17 s, tails to 1 s and 30 s."""
    kind = rng.random()
    if kind < 0.80:
        return float(np.clip(rng.normal(14.0, 1.8), 10.0, 17.0))
    if kind < 0.95:
        return float(rng.uniform(1.0, 10.0))
    return float(rng.uniform(17.0, 30.0))


def synthesize_utterance(speaker: Speaker, seconds: float, seed: int) -> tuple[np.ndarray, str]:
    """Speech close to ``seconds`` long (never longer), 16 kHz float32, and its transcript.

    Words are drawn until the speech fills the target; the rest is quiet room noise split
    between the start and the end, as in read speech.
    """
    rng = np.random.default_rng(seed)
    engine = SpeechSynthesizer.get()
    target = int(seconds * SAMPLE_RATE)
    words = max(1, round(seconds * speaker.words_per_minute / 60 * 0.85))
    for _ in range(6):
        text = " ".join(rng.choice(_WORDS, size=words))
        raw = engine.speak(text, speaker.voice, speaker.words_per_minute, speaker.pitch, seed)
        speech = soxr.resample(
            raw.astype(np.float32) / 32768.0, engine.rate, SAMPLE_RATE, quality="HQ"
        )
        if speech.shape[0] <= target or words == 1:
            break
        words = max(1, int(words * target / speech.shape[0]))
    speech = speech[:target]
    lead = int(rng.integers(0, target - speech.shape[0] + 1))
    noise = rng.normal(0.0, 0.002, size=target).astype(np.float32)
    noise[lead : lead + speech.shape[0]] += speech
    return noise, text.upper()


def _speak_job(job: tuple[Speaker, float, int, Path]) -> str:
    speaker, seconds, seed, path = job
    samples, text = synthesize_utterance(speaker, seconds, seed)
    path.write_bytes(encode_flac(samples))
    return text


def make_demo_corpus(
    root: Path,
    split: str = "dev-clean",
    num_speakers: int = 4,
    chapters_per_speaker: int = 2,
    utterances_per_chapter: int = 5,
    seed: int = 0,
    num_workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write a LibriSpeech-layout split under ``root/split``; returns the FLAC paths.
    ``progress(n)`` is called as utterances are spoken."""
    rng = np.random.default_rng(seed)
    split_dir = Path(root) / split
    paths: list[Path] = []
    jobs: list[tuple[Speaker, float, int, Path]] = []
    chapters: list[tuple[Path, list[str]]] = []
    for s in range(num_speakers):
        speaker = Speaker(
            speaker_id=100 + 37 * s + int(rng.integers(0, 30)),
            voice=f"{_VOICES[s % len(_VOICES)]}+{_VARIANTS[s % len(_VARIANTS)]}",
            words_per_minute=int(rng.integers(140, 190)),
            pitch=int(rng.integers(30, 70)),
        )
        for c in range(chapters_per_speaker):
            chapter_id = 1000 + 113 * c + int(rng.integers(0, 100))
            chapter_dir = split_dir / str(speaker.speaker_id) / str(chapter_id)
            chapter_dir.mkdir(parents=True, exist_ok=True)
            ids = [
                f"{speaker.speaker_id}-{chapter_id}-{u:04d}" for u in range(utterances_per_chapter)
            ]
            chapters.append((chapter_dir / f"{speaker.speaker_id}-{chapter_id}.trans.txt", ids))
            for utt_id in ids:
                paths.append(chapter_dir / f"{utt_id}.flac")
                jobs.append((speaker, sample_duration(rng), int(rng.integers(2**31)), paths[-1]))
    # One fresh process per utterance (maxtasksperchild=1): the engine starts clean each time.
    with multiprocessing.get_context("fork").Pool(num_workers, maxtasksperchild=1) as pool:
        texts = {}
        for path, text in zip(paths, pool.imap(_speak_job, jobs, chunksize=1)):
            texts[path] = text
            if progress:
                progress(1)
    for trans, ids in chapters:
        trans.write_text(
            "".join(f"{i} {texts[trans.parent / f'{i}.flac']}\n" for i in ids), encoding="utf-8"
        )
    return paths


def write_openslr_archive(root: Path, split: str, archive: Path) -> Path:
    """Pack ``root/split`` as OpenSLR does: ``LibriSpeech/<split>/...`` inside a .tar.gz."""
    split_dir = Path(root) / split
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(split_dir.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=f"LibriSpeech/{split}/{path.relative_to(split_dir)}")
    return archive


_HF_NAMES = {
    "dev-clean": "validation.clean",
    "dev-other": "validation.other",
    "test-clean": "test.clean",
    "test-other": "test.other",
    "train-clean-100": "train.clean.100",
    "train-clean-360": "train.clean.360",
    "train-other-500": "train.other.500",
}


def write_hf_parquet(root: Path, split: str, out_dir: Path, rows_per_file: int = 0) -> list[Path]:
    """Write ``root/split`` in the Hugging Face ``librispeech_asr`` parquet layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split_dir = Path(root) / split
    rows = []
    for trans in sorted(split_dir.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            utt_id, _, text = line.partition(" ")
            flac = trans.parent / f"{utt_id}.flac"
            speaker, chapter, _ = utt_id.split("-")
            rows.append(
                {
                    "file": str(flac),
                    "audio": {"bytes": flac.read_bytes(), "path": flac.name},
                    "text": text,
                    "speaker_id": int(speaker),
                    "chapter_id": int(chapter),
                    "id": utt_id,
                }
            )
    per_file = rows_per_file or len(rows)
    count = -(-len(rows) // per_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"{_HF_NAMES.get(split, split)}-{i:05d}-of-{count:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[i * per_file : (i + 1) * per_file]), path)
        paths.append(path)
    return paths
