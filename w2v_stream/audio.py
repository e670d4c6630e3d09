"""Audio bytes in, audio facts out: probing, checking and converting to 16 kHz mono FLAC.

Owns every call into soundfile, dr_flac and soxr, so the rules for what counts as good audio
live in one place: shards are built and verified through libsndfile; the loader decodes
through dr_flac (``read_into``), falling back to libsndfile for anything dr_flac refuses.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# dr_flac, inside miniaudio's wheel: the loader's FLAC decoder
from miniaudio import ffi as _ffi, lib as _drflac

from . import flac

SAMPLE_RATE = 16_000
# Samples read at the end of a file to prove it is not truncated: reading the last sample
# makes libFLAC find and decode the whole last frame, so even one missing byte is caught.
TAIL_CHECK_SAMPLES = 1


class AudioError(ValueError):
    """The bytes are not audio that can be used (empty, truncated, garbage)."""


@dataclass(frozen=True)
class AudioInfo:
    format: str  # soundfile's container name: "FLAC", "WAV", ...
    sample_rate: int
    channels: int
    num_samples: int  # per channel
    length_in_header: bool = True  # False: a streamed FLAC whose STREAMINFO has no length

    @property
    def is_target(self) -> bool:
        """True when the bytes can be stored as they are: 16 kHz mono FLAC whose header says
        its length (the loader checks every utterance's header against the index)."""
        return (
            self.format == "FLAC"
            and self.sample_rate == SAMPLE_RATE
            and self.channels == 1
            and self.length_in_header
        )


# libsndfile reports SF_COUNT_MAX frames for a FLAC whose STREAMINFO gives no length.
_UNKNOWN_LENGTH = 1 << 62


class AudioFormatError(AudioError):
    """Audio that decodes but is not in the format asked for (rate, channels)."""


def probe(data: bytes | str | Path, full_decode: bool = False) -> AudioInfo:
    """Read the header and prove the audio decodes to its end.

    ``data`` is the file's bytes or its path (a ``str`` is a path). A FLAC is first checked
    without decoding (``flac.quick_check``: STREAMINFO and a last frame whose CRCs and
    position agree); what that cannot vouch for is opened by libsndfile, which reads only the
    header and the tail.

    By default only the last frame is decoded: that catches truncated and empty files at a
    tiny fraction of a full decode. ``full_decode`` decodes everything (and
    checks the FLAC frame CRCs on the way).
    """
    is_path = not isinstance(data, (bytes, bytearray, memoryview))
    if not full_decode:  # the FLAC's two ends, when they vouch for it
        quick = flac.quick_check(data) if is_path else flac.quick_check_bytes(bytes(data))
        if quick is not None:
            return AudioInfo("FLAC", quick.sample_rate, quick.channels, quick.num_samples)
    if is_path:
        if os.stat(data).st_size == 0:
            raise AudioError("empty file")
        source = os.fspath(data)
    elif not data:
        raise AudioError("empty file")
    else:
        source = io.BytesIO(data)
    try:
        with sf.SoundFile(source) as f:
            info = AudioInfo(f.format, f.samplerate, f.channels, f.frames)
            if info.num_samples >= _UNKNOWN_LENGTH:  # a streaming encoder's FLAC
                raw = Path(data).read_bytes() if is_path else data
                whole = probe(_with_length(raw), full_decode=True)
                return AudioInfo(
                    info.format,
                    info.sample_rate,
                    info.channels,
                    whole.num_samples,
                    length_in_header=False,
                )
            if full_decode or info.num_samples <= 0:
                decoded = f.read(dtype="int16", always_2d=True).shape[0]
                if info.num_samples > 0 and decoded != info.num_samples:
                    raise AudioError(f"decoded {decoded} of {info.num_samples} samples: truncated")
                info = AudioInfo(info.format, info.sample_rate, info.channels, decoded)
            else:
                start = max(0, info.num_samples - TAIL_CHECK_SAMPLES)
                f.seek(start)
                tail = f.read(dtype="int16", always_2d=True).shape[0]
                if tail != info.num_samples - start:
                    raise AudioError(
                        f"decoded {start + tail} of {info.num_samples} samples: truncated"
                    )
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"truncated or corrupt: {_short(exc)}") from None
    if info.num_samples <= 0:
        raise AudioError("no samples")
    return info


@dataclass(frozen=True)
class Excerpt:
    """The part of a recording that is one utterance (a manifest's cut): from ``start``
    seconds for ``duration`` seconds (None: to the end), mixing ``channels`` (None: all)."""

    start: float = 0.0
    duration: float | None = None
    channels: tuple[int, ...] | None = None


# How much shorter than its manifest says an excerpt may end up: encoders pad or trim a few
# milliseconds, and manifests round durations.
EXCERPT_TOLERANCE_SECONDS = 0.025


def decode_target(data: bytes | str, excerpt: Excerpt | None = None) -> np.ndarray:
    """Decode any audio soundfile reads (bytes, or a file's path as a ``str``), or its
    ``excerpt``, mix to mono, resample to 16 kHz.

    Returns float32 samples, the signal a shard stores (16-bit sources come back exactly).
    Deterministic for the same input.
    """
    samples, rate = decode(data, excerpt)
    if samples.shape[0] == 0:
        raise AudioError("no samples")
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return mono


def to_target_flac(data: bytes | str, excerpt: Excerpt | None = None) -> tuple[bytes, int]:
    """``decode_target`` encoded as 16-bit FLAC: the FLAC bytes and their number of samples."""
    mono = decode_target(data, excerpt)
    return encode_flac(mono), int(mono.shape[0])


def encode_flac(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono float samples in [-1, 1] (clipped) or int16 → 16-bit FLAC bytes."""
    if samples.dtype != np.int16:
        samples = np.clip(samples, -1.0, 1.0).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode(data: bytes | str, excerpt: Excerpt | None = None) -> tuple[np.ndarray, int]:
    """Decode audio bytes or a file (its path as a ``str``: an excerpt is read without reading
    the rest), or their ``excerpt``, to float32 samples (frames, channels) and their sample
    rate."""
    is_path = isinstance(data, str)
    try:
        with sf.SoundFile(data if is_path else io.BytesIO(data)) as f:
            if f.frames < _UNKNOWN_LENGTH:
                return _read_excerpt(f, excerpt), f.samplerate
        return decode(_with_length(Path(data).read_bytes() if is_path else data), excerpt)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(_short(exc)) from None


def _read_excerpt(f: sf.SoundFile, excerpt: Excerpt | None) -> np.ndarray:
    """The samples of ``excerpt`` (all of them for None) from an open file: (frames, channels)
    float32; AudioError when the excerpt lies outside the recording."""
    if excerpt is None:
        return f.read(dtype="float32", always_2d=True)
    rate = f.samplerate
    start = round(excerpt.start * rate)
    if not 0 <= start < f.frames:
        raise AudioError(
            f"the excerpt starts at {excerpt.start:.3f} s, outside the recording "
            f"(0 to {f.frames / rate:.3f} s)"
        )
    channels = list(excerpt.channels) if excerpt.channels is not None else None
    if channels is not None and not all(0 <= c < f.channels for c in channels):
        raise AudioError(f"the excerpt takes channels {channels}; the recording has {f.channels}")
    frames = -1 if excerpt.duration is None else round(excerpt.duration * rate)
    f.seek(start)
    samples = f.read(frames, dtype="float32", always_2d=True)
    if frames > samples.shape[0] + EXCERPT_TOLERANCE_SECONDS * rate:
        raise AudioError(
            f"the excerpt ends at {excerpt.start + excerpt.duration:.3f} s, past "
            f"the end of the recording ({f.frames / rate:.3f} s)"
        )
    return samples if channels is None else samples[:, channels]


def _with_length(data: bytes) -> bytes:
    """A streaming encoder's FLAC (no length in STREAMINFO) given its length: libsndfile
    cannot read such a stream to its end (its seek to the end fails)."""
    patched = flac.with_length(data)
    if patched is None:
        raise AudioError(
            "FLAC without a length in its header whose last frame cannot be "
            "read: truncated or corrupt"
        )
    return patched


def read_into(data: bytes, out: np.ndarray, start: int, sample_rate: int, num_samples: int) -> None:
    """Decode samples ``start .. start + len(out)`` of 16-bit mono FLAC bytes into ``out``.

    ``out`` is a contiguous float32 slice (a row of a batch): no buffer of its own, no copy.
    The header must say ``sample_rate`` Hz, one channel and ``num_samples`` samples
    (AudioFormatError otherwise); a file that stops early raises AudioError.

    The loader's hot path: dr_flac (through miniaudio's bindings) decodes the same FLAC to
    the same float32 values as libsndfile (sample / 32768), faster. What
    dr_flac will not open, or decodes short (it drops a frame whose CRC fails), goes to
    libsndfile, which either reads it after all or names the fault.
    """
    handle = _drflac.ma_dr_flac_open_memory(data, len(data), _ffi.NULL)
    if handle != _ffi.NULL:
        try:
            _check_header(
                handle.sampleRate,
                handle.channels,
                handle.totalPCMFrameCount,
                sample_rate,
                num_samples,
            )
            if not start or _drflac.ma_dr_flac_seek_to_pcm_frame(handle, start):
                target = _ffi.from_buffer("float[]", out, require_writable=True)
                if (
                    _drflac.ma_dr_flac_read_pcm_frames_f32(handle, out.shape[0], target)
                    == out.shape[0]
                ):
                    return
        finally:
            _drflac.ma_dr_flac_close(handle)
    _read_into_libsndfile(data, out, start, sample_rate, num_samples)


def _read_into_libsndfile(
    data: bytes, out: np.ndarray, start: int, sample_rate: int, num_samples: int
) -> None:
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            _check_header(f.samplerate, f.channels, f.frames, sample_rate, num_samples)
            if start:
                f.seek(start)
            got = f.read(out.shape[0], dtype="float32", out=out).shape[0]
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(_short(exc)) from None
    if got != out.shape[0]:
        raise AudioError(f"decoded {start + got} of {num_samples} samples: truncated")


def _check_header(
    rate: int, channels: int, frames: int, sample_rate: int, num_samples: int
) -> None:
    """What a shard's FLAC header must say: the expected rate, mono, the index's length."""
    if rate != sample_rate or channels != 1:
        raise AudioFormatError(f"{rate} Hz, {channels} channels; expected {sample_rate} Hz mono")
    if frames != num_samples:
        raise AudioError(f"header says {frames} samples, the index {num_samples}")


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "the decoder failed"
    text = re.sub(r"^Error opening <[^>]*>: ", "", text)
    if "Format not recognised" in text or "unknown format" in text.lower():
        return "not a readable audio file"
    return text[:200]
