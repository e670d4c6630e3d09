"""FLAC's two ends read without decoding: what quick_check vouches for, and what it refuses."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from w2v_stream import audio, flac


def _crc16_bitwise(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


@pytest.mark.parametrize("size", [1, 2, 255, 256, 257, 3000, 65536])
def test_crc16_matches_the_bitwise_definition(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert flac.crc16(data) == _crc16_bitwise(data)


def _flac(tmp_path, seconds=3.3, rate=16000, channels=1, name="a.flac"):
    rng = np.random.default_rng(1)
    samples = (rng.standard_normal((int(seconds * rate), channels)) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC", subtype="PCM_16")
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 2)])
def test_vouches_for_whole_files_with_the_decoders_facts(tmp_path, rate, channels):
    path = _flac(tmp_path, rate=rate, channels=channels)
    info = flac.quick_check(path)
    assert flac.quick_check_bytes(path.read_bytes()) == info  # the same from memory
    with sf.SoundFile(path) as f:
        assert info is not None
        assert (info.sample_rate, info.channels, info.num_samples) == (
            f.samplerate,
            f.channels,
            f.frames,
        )


def test_refuses_every_truncation_and_damage_and_the_decoder_then_says_why(tmp_path):
    path = _flac(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.flac"
    for end in list(range(len(data) - 2500, len(data), 13)) + [len(data) // 2, 41, 0]:
        cut.write_bytes(data[:end])
        assert flac.quick_check(cut) is None, end
        assert flac.quick_check_bytes(data[:end]) is None, end
        for given in (cut, data[:end]):  # a path, or the bytes from an archive
            with pytest.raises(audio.AudioError):
                audio.probe(given)
    flipped = bytearray(data)
    flipped[-40] ^= 0x01  # a bit of the last frame
    cut.write_bytes(bytes(flipped))
    assert flac.quick_check(cut) is None and flac.quick_check_bytes(bytes(flipped)) is None
    cut.write_bytes(data + b"TAG" + bytes(125))  # an ID3v1 tag after the audio: not vouched
    assert flac.quick_check(cut) is None
    cut.write_bytes(b"RIFF" + data[4:])
    assert flac.quick_check(cut) is None
    assert audio.probe(path).num_samples == flac.quick_check(path).num_samples
    assert audio.probe(data).num_samples == flac.quick_check(path).num_samples


def test_a_streamed_flac_gets_its_length_back_from_its_last_frame(tmp_path):
    whole = _flac(tmp_path).read_bytes()
    streamed = bytearray(whole)
    streamed[21] &= 0xF0  # STREAMINFO's 36-bit length zeroed, as a streaming encoder leaves it
    streamed[22:26] = bytes(4)
    assert flac.parse_streaminfo(bytes(streamed)).num_samples == 0
    assert flac.with_length(bytes(streamed)) == whole
    assert flac.with_length(bytes(streamed[:-30])) is None  # its last frame cut: no length
    assert flac.with_length(whole) is None  # nothing to give


def test_the_loaders_decode_gives_libsndfiles_floats_and_names_faults(tmp_path):
    data = _flac(tmp_path, seconds=3.3).read_bytes()
    whole = sf.read(io.BytesIO(data), dtype="float32")[0]
    n = whole.shape[0]
    out = np.full(n, 9.0, dtype=np.float32)
    audio.read_into(data, out, 0, 16000, n)
    assert np.array_equal(out, whole)
    piece = np.empty(5000, dtype=np.float32)
    audio.read_into(data, piece, 12345, 16000, n)  # a crop: seek, then decode
    assert np.array_equal(piece, whole[12345:17345])
    with pytest.raises(audio.AudioFormatError, match="expected 22050 Hz"):
        audio.read_into(data, out, 0, 22050, n)
    with pytest.raises(audio.AudioError, match="the index"):
        audio.read_into(data, out[:-1], 0, 16000, n - 1)
    with pytest.raises(audio.AudioError, match="lost sync"):  # dr_flac stops short
        audio.read_into(data[: len(data) // 2], out, 0, 16000, n)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # dr_flac drops the frame; libsndfile names the fault
    with pytest.raises(audio.AudioError):
        audio.read_into(bytes(flipped), out, 0, 16000, n)
    with pytest.raises(audio.AudioError, match="not a readable audio file"):
        audio.read_into(b"garbage" * 50, out, 0, 16000, n)
