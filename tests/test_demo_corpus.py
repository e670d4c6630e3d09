"""The synthetic LibriSpeech: layout, real speech, seeded, LibriSpeech-like lengths."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import soundfile as sf

from w2v_stream.demo_corpus import make_demo_corpus, sample_duration

from conftest import SPLIT


def test_layout_and_audio(corpus):
    flacs = sorted((corpus / SPLIT).rglob("*.flac"))
    assert len(flacs) == 12
    for path in flacs:
        speaker, chapter, _ = path.stem.split("-")
        assert path.parent.name == chapter and path.parent.parent.name == speaker
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
        assert 1.0 <= info.duration <= 30.0
    trans = sorted((corpus / SPLIT).rglob("*.trans.txt"))
    assert len(trans) == 4
    ids = [line.split(" ")[0] for t in trans for line in t.read_text().splitlines()]
    assert sorted(ids) == [p.stem for p in flacs]


def test_it_is_speech_not_noise(corpus):
    samples, _ = sf.read(str(sorted((corpus / SPLIT).rglob("*.flac"))[0]))
    frames = samples[: len(samples) // 400 * 400].reshape(-1, 400)
    energy = (frames**2).mean(axis=1)
    # Speech has loud voiced frames and near-silent gaps: a wide dynamic range.
    assert energy.max() > 1000 * np.median(energy[energy < np.quantile(energy, 0.2)])
    assert (energy > 1e-3).mean() > 0.3


def test_seeded(tmp_path):
    a = make_demo_corpus(tmp_path / "a", "x", 1, 1, 2, seed=5)
    b = make_demo_corpus(tmp_path / "b", "x", 1, 1, 2, seed=5)
    c = make_demo_corpus(tmp_path / "c", "x", 1, 1, 2, seed=6)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]


def test_breathy_voices_do_not_follow_the_clock():
    # eSpeak NG seeds its noise generator from time(NULL) at start-up; voice variants with
    # breath noise (f2, f3) spoke differently from one second to the next until speak()
    # reseeded it. Each call runs in a fresh process, as make_demo_corpus does.
    code = (
        "import hashlib, sys; from w2v_stream.demo_corpus import SpeechSynthesizer; "
        "print(hashlib.sha256(SpeechSynthesizer.get().speak("
        "'the river under the mountain', sys.argv[1], 160, 50, int(sys.argv[2]))"
        ".tobytes()).hexdigest())"
    )

    def speak(voice: str, seed: int) -> str:
        return subprocess.run(
            [sys.executable, "-c", code, voice, str(seed)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    for voice in ("en+f2", "en-us+f3"):
        first = speak(voice, 7)
        time.sleep(1.05)  # the next start-up sees another second
        assert speak(voice, 7) == first
        assert speak(voice, 8) != first


def test_duration_mix_is_librispeech_like():
    rng = np.random.default_rng(0)
    d = np.array([sample_duration(rng) for _ in range(5000)])
    assert d.min() >= 1.0 and d.max() <= 30.0
    assert 0.75 < ((d >= 10) & (d <= 17)).mean() < 0.85
    assert (d < 5).mean() > 0.03 and (d > 20).mean() > 0.01
