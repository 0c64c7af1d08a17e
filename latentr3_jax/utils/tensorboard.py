"""Scalar curves in TensorBoard's event-file format, written without TensorFlow.

An event file is a sequence of records. Each record is framed as

  length        8 bytes, unsigned little-endian: the size of the payload
  length CRC    4 bytes, little-endian: masked CRC-32C of the 8 length bytes
  payload       `length` bytes: one serialized `Event` protobuf message
  payload CRC   4 bytes, little-endian: masked CRC-32C of the payload

CRC-32C is the Castagnoli polynomial (0x82F63B78 in its bit-reversed form). The stored
value is not the raw checksum but a "masked" one: rotated right by 15 bits, plus the
constant 0xa282ead8, modulo 2**32. A reader recomputes both checksums and stops at the
first record that does not match, so a file cut short by a crash still reads up to its
last whole record.

The payloads use only a handful of protobuf fields, which are encoded here by hand:

  Event          1: wall_time (double)   2: step (int64)   3: file_version (string)
                 5: summary (Summary)
  Summary        1: value (repeated Summary.Value)
  Summary.Value  1: tag (string)          2: simple_value (float)

The first record of a file carries only wall_time and file_version "brain.Event:2"; each
later record is one step's worth of scalars. A file is named
`events.out.tfevents.<unix seconds>.<hostname>.<pid>.<n>`; TensorBoard reads every file
whose name contains "tfevents", so `tensorboard --logdir DIR` finds these.
"""

from __future__ import annotations

import math
import numbers
import os
import socket
import struct
import time
from typing import Any, Mapping

FILE_VERSION = "brain.Event:2"
_FLOAT32_MAX = 3.4028234663852886e38


# ----------------------------------------------------------------------------- CRC-32C

def _make_crc_table() -> tuple:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as used by TFRecord framing."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The checksum as stored in a record: rotated right by 15 bits, plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One TFRecord: length, its checksum, the payload, its checksum."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length))
            + payload + struct.pack("<I", masked_crc32c(payload)))


# ----------------------------------------------------------------------------- protobuf

def _varint(n: int) -> bytes:
    if n < 0:                       # int64 fields: negative numbers as 64-bit two's complement
        n += 1 << 64
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _float32(x: float) -> bytes:
    if math.isfinite(x) and abs(x) > _FLOAT32_MAX:
        x = math.copysign(math.inf, x)   # struct refuses finite values float32 cannot hold
    return struct.pack("<f", x)


def encode_event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """A serialized Event holding any of: step, file_version, a Summary of scalars."""
    out = _key(1, 1) + struct.pack("<d", float(wall_time))
    if step is not None:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode("utf-8"))
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode("utf-8")) + _key(2, 5) + _float32(v))
            for tag, v in scalars.items())
        out += _bytes_field(5, summary)
    return out


# ----------------------------------------------------------------------------- values

def scalar_value(x: Any) -> float | None:
    """`x` as a float when it is a real number (Python, numpy or a 0-d array); None for
    bools, strings and anything else. NaN and infinities are kept."""
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    try:
        return float(x)
    except OverflowError:           # an int too large for a double
        return math.inf if x > 0 else -math.inf


def flatten_scalars(record: Mapping, prefix: str = "", skip: tuple = ()) -> dict:
    """The numeric leaves of `record` by tag: nested dicts joined with '/', every tag
    under `prefix` when one is given. Top-level keys in `skip` are left out."""
    out: dict = {}

    def walk(d: Mapping, path: str) -> None:
        for k, v in d.items():
            tag = f"{path}/{k}" if path else str(k)
            if isinstance(v, Mapping):
                walk(v, tag)
            else:
                value = scalar_value(v)
                if value is not None:
                    out[tag] = value

    walk({k: v for k, v in record.items() if k not in skip}, prefix)
    return out


# ----------------------------------------------------------------------------- writer

class EventWriter:
    """Writes scalars to a new event file in `logdir` (created if missing).

    Each `scalars` call becomes one record and is flushed at once, so a crash loses at
    most the record being written. Values that are not real numbers (strings, bools,
    None, ...) are skipped; NaN and infinities are written as they are.
    """

    _count = 0

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        stamp, host, pid = int(time.time()), socket.gethostname(), os.getpid()
        while True:
            EventWriter._count += 1
            name = f"events.out.tfevents.{stamp:010d}.{host}.{pid}.{EventWriter._count}"
            try:
                self._f = open(os.path.join(logdir, name), "xb")
                break
            except FileExistsError:
                continue
        self.path = self._f.name
        self._write(encode_event(time.time(), file_version=FILE_VERSION))

    def _write(self, payload: bytes) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: event writer is closed")
        self._f.write(frame_record(payload))
        self._f.flush()

    def scalars(self, values: Mapping[str, Any], step: int,
                wall_time: float | None = None) -> None:
        """Write the numeric entries of `values` (tag -> number) as one step's record.
        Nothing is written when none of them is a number."""
        kept = {str(t): f for t, v in values.items() if (f := scalar_value(v)) is not None}
        if kept:
            self._write(encode_event(time.time() if wall_time is None else wall_time,
                                     int(step), scalars=kept))

    def scalar(self, tag: str, value: Any, step: int, wall_time: float | None = None) -> None:
        self.scalars({tag: value}, step, wall_time)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
