"""FLAC structure read without decoding: the header's facts and an intact last frame.

The shard tool must know that every input FLAC is whole before it plans shards. Decoding the
last sample through libsndfile proves it, but costs a seek (a bisection over the file) that
is slow next to copying the file. ``quick_check`` reads the two ends of the file instead:
the STREAMINFO block (rate, channels, length) and the last frame, whose header CRC-8, CRC-16
over the whole frame and sample position must all agree with STREAMINFO. It only ever
vouches for a file; anything it cannot vouch for (no STREAMINFO length, tags after the audio,
a truncated or damaged end) returns None and goes to the decoder, which says what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

TAIL_BYTES = 64 * 1024  # the last frame must lie within this many final bytes
UNKNOWN_FRAME_BYTES = 16 * 1024  # what is read when STREAMINFO gives no maximum frame size
MAX_CANDIDATES = 64  # sync codes tried, from the end back


class StreamInfo(NamedTuple):
    sample_rate: int
    channels: int
    bits_per_sample: int
    num_samples: int  # per channel; 0 when the encoder did not know
    min_block: int
    max_block: int
    max_frame: int  # bytes; 0 when the encoder did not know


def quick_check(path: str | Path) -> StreamInfo | None:
    """STREAMINFO of a FLAC file whose last frame is intact and ends the stream, else None.
    Only the file's two ends are read."""
    try:
        with open(path, "rb", buffering=0) as f:
            info = _with_length(f.read(42))
            if info is None:
                return None
            f.seek(max(os.fstat(f.fileno()).st_size - _tail_bytes(info), 42))
            return _vouched(info, f.read())
    except OSError:
        return None


def quick_check_bytes(data: bytes) -> StreamInfo | None:
    """``quick_check`` for a FLAC held in memory (from an archive or a parquet row)."""
    info = _with_length(data[:42])
    if info is None:
        return None
    return _vouched(info, data[max(len(data) - _tail_bytes(info), 42) :])


def _with_length(head: bytes) -> StreamInfo | None:
    """STREAMINFO when it gives the stream's length (only then can the last frame prove it)."""
    info = parse_streaminfo(head)
    return info if info is not None and info.num_samples else None


def _tail_bytes(info: StreamInfo) -> int:
    """How much of the end holds the last frame (its header's worst case included)."""
    return min(info.max_frame + 16 if info.max_frame else UNKNOWN_FRAME_BYTES, TAIL_BYTES)


def _vouched(info: StreamInfo, tail: bytes) -> StreamInfo | None:
    return info if tail and last_frame_ends_stream(tail, info) else None


def parse_streaminfo(head: bytes) -> StreamInfo | None:
    """The STREAMINFO block that must open a FLAC stream (``fLaC`` + a 34-byte block)."""
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0:
        return None
    if int.from_bytes(head[5:8], "big") != 34:
        return None
    block = int.from_bytes(head[8:42], "big")  # 272 bits, most significant first
    min_block = block >> 256
    max_block = (block >> 240) & 0xFFFF
    max_frame = (block >> 192) & 0xFFFFFF
    rate = (block >> 172) & 0xFFFFF
    channels = ((block >> 169) & 0x7) + 1
    bits = ((block >> 164) & 0x1F) + 1
    total = (block >> 128) & 0xFFFFFFFFF
    if rate == 0 or min_block < 16 or max_block < min_block:
        return None
    return StreamInfo(rate, channels, bits, total, min_block, max_block, max_frame)


def last_frame_ends_stream(tail: bytes, info: StreamInfo) -> bool:
    """True when ``tail`` ends with a whole frame (CRCs good) holding the stream's last sample."""
    end = last_frame_end(tail, info)
    return end is not None and end == info.num_samples


def last_frame_end(tail: bytes, info: StreamInfo) -> int | None:
    """The sample after the last one of the whole frame (CRCs good) that ends ``tail``."""
    data = np.frombuffer(tail, np.uint8)
    syncs = np.flatnonzero((data[:-1] == 0xFF) & ((data[1:] & 0xFE) == 0xF8))
    for pos in syncs[::-1][:MAX_CANDIDATES]:
        header = _frame_header(tail, int(pos), info)
        if header is None:
            continue
        if crc16(data[pos:]) != 0:  # a frame's CRC-16 covers it whole, its own CRC included
            continue
        first_sample, block = header
        return first_sample + block
    return None


def with_length(data: bytes) -> bytes | None:
    """FLAC bytes whose STREAMINFO says no length (a streaming encoder's), given the length
    their last frame ends at; None when the last frame cannot be found (truncated, damaged).
    libsndfile cannot read such a stream to its end; with the length it reads it as any."""
    info = parse_streaminfo(data[:42])
    if info is None or info.num_samples:
        return None
    end = last_frame_end(data[max(len(data) - TAIL_BYTES, 42) :], info)
    if end is None:
        return None
    # The 36-bit length sits in the low 4 bits of byte 21 and bytes 22..25.
    length = (data[21] & 0xF0) << 32 | end
    return data[:21] + length.to_bytes(5, "big") + data[26:]


def _frame_header(tail: bytes, pos: int, info: StreamInfo) -> tuple[int, int] | None:
    """(first sample, block size) of a frame header at ``pos`` with a good CRC-8, else None."""
    head = tail[pos : pos + 16]
    if len(head) < 6:
        return None
    variable = head[1] & 0x01
    block_code, rate_code = head[2] >> 4, head[2] & 0x0F
    channel_code, size_code = head[3] >> 4, (head[3] >> 1) & 0x07
    if block_code == 0 or rate_code == 15 or channel_code > 10 or size_code == 3 or head[3] & 1:
        return None
    number, i = _utf8_number(head, 4)
    if number is None:
        return None
    if block_code == 1:
        block = 192
    elif block_code <= 5:
        block = 576 << (block_code - 2)
    elif block_code == 6:
        block, i = head[i] + 1, i + 1
    elif block_code == 7:
        block, i = int.from_bytes(head[i : i + 2], "big") + 1, i + 2
    else:
        block = 256 << (block_code - 8)
    i += {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
    if i >= len(head) or crc8(head[:i]) != head[i]:
        return None
    if variable:
        return number, block
    if info.min_block != info.max_block:
        return None  # a fixed-size stream whose block size STREAMINFO does not pin down
    return number * info.max_block, block


def _utf8_number(head: bytes, i: int) -> tuple[int | None, int]:
    """FLAC's UTF-8-like coded frame or sample number starting at ``head[i]``."""
    first = head[i]
    if first < 0x80:
        return first, i + 1
    extra = next((n for n in range(1, 7) if first & (0x80 >> (n + 1)) == 0), None)
    if extra is None or first & 0x40 == 0 or i + 1 + extra > len(head):
        return None, i
    value = first & (0x3F >> extra)
    for byte in head[i + 1 : i + 1 + extra]:
        if byte & 0xC0 != 0x80:
            return None, i
        value = (value << 6) | (byte & 0x3F)
    return value, i + 1 + extra


def crc8(data: bytes) -> int:
    """FLAC's header CRC-8 (polynomial 0x07, initial value 0)."""
    crc = 0
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc


def _crc8_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return table


_CRC8 = _crc8_table()

# CRC-16 (polynomial 0x8005, initial value 0, no reflection) in numpy. With a zero initial
# value the CRC is linear in the message: it is the XOR over its bytes of each byte's CRC
# followed by as many zero bytes as come after it. _BYTE_AT[k][b] is that for byte b with k
# zeros after it (k < 256); a message is cut into 256-byte blocks, each block's CRC is carried
# over the zeros of the blocks after it by _CARRY (images of the 16 state bits).
_BLOCK = 256


def _crc16_tables(max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    table = np.zeros(256, np.uint32)
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table[byte] = crc

    def zero_byte(state: np.ndarray) -> np.ndarray:
        return ((state << 8) & 0xFFFF) ^ table[state >> 8]

    byte_at = np.zeros((_BLOCK, 256), np.uint32)
    byte_at[0] = table
    for k in range(1, _BLOCK):
        byte_at[k] = zero_byte(byte_at[k - 1])
    step = np.uint32(1) << np.arange(16, dtype=np.uint32)  # the 16 unit states
    for _ in range(_BLOCK):
        step = zero_byte(step)
    carry = np.zeros((max_blocks, 16), np.uint32)
    carry[0] = np.uint32(1) << np.arange(16, dtype=np.uint32)
    for j in range(1, max_blocks):
        carry[j] = _apply(step, carry[j - 1])
    return byte_at[::-1].copy(), carry


def _apply(images: np.ndarray, states: np.ndarray) -> np.ndarray:
    """The linear map with these 16 bit images, applied to each state."""
    bits = (states[:, None] >> np.arange(16, dtype=np.uint32)) & 1
    return np.bitwise_xor.reduce(np.where(bits == 1, images[None, :], 0), axis=1)


_BYTE_AT_REVERSED, _CARRY = _crc16_tables(-(-TAIL_BYTES // _BLOCK) + 1)
_COLUMNS = np.arange(_BLOCK)[None, :]
_BITS = np.arange(16, dtype=np.uint32)


def crc16(data: np.ndarray | bytes) -> int:
    """FLAC's frame CRC-16 of ``data`` (at most TAIL_BYTES bytes)."""
    data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    if data.size == 0:
        return 0
    blocks = -(-data.size // _BLOCK)
    padded = np.zeros(blocks * _BLOCK, np.uint8)  # leading zeros leave a zero-init CRC alone
    padded[-data.size :] = data
    rows = padded.reshape(blocks, _BLOCK)
    per_block = np.bitwise_xor.reduce(_BYTE_AT_REVERSED[_COLUMNS, rows], axis=1)
    images = _CARRY[blocks - 1 :: -1]  # (blocks, 16): how each block's CRC is carried
    bits = (per_block[:, None] >> _BITS) & 1
    return int(np.bitwise_xor.reduce((images * bits).ravel()))
