"""TFRecord framing without TensorFlow: read (with both CRCs checked), index and write.

A TFRecord file is a sequence of records, each framed as

  uint64 little-endian  length
  uint32 little-endian  masked CRC32C of the 8 length bytes
  bytes[length]         payload (here a serialized Waymo ``Frame`` proto)
  uint32 little-endian  masked CRC32C of the payload

with ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32)`` and CRC32C the Castagnoli CRC
(datasets.md §2.2). A truncated file or a flipped byte raises ``TFRecordError`` naming the file and the byte offset of
the bad record, so that callers can skip (and count) the rest of a damaged segment instead of parsing garbage.

CRC32C comes from the ``google-crc32c`` package (C extension, ~GB/s); without it a table-driven pure-Python CRC is
used, which is correct but slow (~5 MB/s) and logged once as a warning.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import BinaryIO, Iterable, Iterator

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")

def _make_table() -> list[int]:
  poly = 0x82F63B78  # Reflected Castagnoli polynomial.
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _make_table()


def crc32c_python(data: bytes | memoryview) -> int:
  """CRC32C (Castagnoli) of ``data``, table-driven pure Python (the fallback; ~5 MB/s)."""
  crc = 0xFFFFFFFF
  table = _TABLE
  for b in bytes(data):
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


try:
  import google_crc32c as _gcrc

  def crc32c(data: bytes | memoryview) -> int:
    """CRC32C (Castagnoli) of ``data`` (google-crc32c, C extension)."""
    return _gcrc.value(bytes(data) if isinstance(data, memoryview) else data)

except ImportError:  # pragma: no cover - exercised only where google-crc32c is missing.
  logging.getLogger(__name__).warning(
      "google-crc32c is not installed; TFRecord CRCs use a slow pure-Python CRC32C (pip install google-crc32c)")
  crc32c = crc32c_python


def masked_crc32c(data: bytes | memoryview) -> int:
  """The TFRecord-masked CRC32C of ``data``."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class TFRecordError(ValueError):
  """A TFRecord file is truncated or corrupt; the message names the file and the record's byte offset.

  ``reason`` is "truncated record" (the file ends inside a record) or "corrupt record" (a CRC mismatch: the bytes are
  there but wrong), so that callers can count the two apart.
  """

  def __init__(self, message: str, reason: str = "truncated record"):
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):  # Keeps ``reason`` through pickling (worker processes).
    return type(self), (str(self), self.reason)


def _read_header(f: BinaryIO, path: str, offset: int, verify: bool) -> int | None:
  """Reads one record header at ``offset``; returns the payload length, or None at a clean end of file."""
  header = f.read(_HEADER.size)
  if not header:
    return None
  if len(header) < _HEADER.size:
    raise TFRecordError(f"{path}: truncated record header at byte offset {offset} "
                        f"({len(header)} of {_HEADER.size} bytes)")
  length, length_crc = _HEADER.unpack(header)
  if verify and masked_crc32c(header[:8]) != length_crc:
    raise TFRecordError(f"{path}: corrupt record length at byte offset {offset} (length CRC mismatch)",
                        "corrupt record")
  return length


def _read_payload(f: BinaryIO, path: str, offset: int, length: int, verify: bool) -> bytes:
  data = f.read(length)
  footer = f.read(_FOOTER.size)
  if len(data) < length or len(footer) < _FOOTER.size:
    raise TFRecordError(f"{path}: truncated record at byte offset {offset} "
                        f"(expected {length} payload bytes + 4 CRC bytes)")
  if verify and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
    raise TFRecordError(f"{path}: corrupt record payload at byte offset {offset} (data CRC mismatch)",
                        "corrupt record")
  return data


def iter_records(path: str | os.PathLike, *, verify: bool = True) -> Iterator[bytes]:
  """Yields the payload of every record in ``path``, in file order.

  Raises:
    TFRecordError: at the first truncated or corrupt record (the records before it have been yielded).
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    offset = 0
    while True:
      length = _read_header(f, path, offset, verify)
      if length is None:
        return
      yield _read_payload(f, path, offset, length, verify)
      offset += _HEADER.size + length + _FOOTER.size


def scan_records(path: str | os.PathLike, *, verify_headers: bool = True
                 ) -> tuple[list[tuple[int, int]], TFRecordError | None]:
  """Scans the record headers of ``path``: ``([(offset, length)] of the readable records, error or None)``.

  Stops at the first corrupt header or record that runs past the end of the file and returns that error instead of
  raising, so a reader can still use the records before a truncation (a partly downloaded segment). Only headers
  (and the file size) are checked here; ``read_record`` checks the payload CRC.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  out = []
  with open(path, "rb") as f:
    offset = 0
    while True:
      f.seek(offset)
      try:
        length = _read_header(f, path, offset, verify_headers)
      except TFRecordError as e:
        return out, e
      if length is None:
        return out, None
      end = offset + _HEADER.size + length + _FOOTER.size
      if end > size:
        return out, TFRecordError(f"{path}: truncated record at byte offset {offset} "
                                  f"(record needs {end - offset} bytes, file has {size - offset} left)")
      out.append((offset, length))
      offset = end


def index_records(path: str | os.PathLike, *, verify_headers: bool = True) -> list[tuple[int, int]]:
  """``[(offset, length)]`` of every record of ``path`` for random access; TFRecordError if any is damaged."""
  out, error = scan_records(path, verify_headers=verify_headers)
  if error is not None:
    raise error
  return out


def read_record(path: str | os.PathLike, offset: int, *, verify: bool = True) -> bytes:
  """Reads the single record that starts at byte ``offset`` of ``path`` (an offset from ``index_records``)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    f.seek(offset)
    length = _read_header(f, path, offset, verify)
    if length is None:
      raise TFRecordError(f"{path}: no record at byte offset {offset} (end of file)")
    return _read_payload(f, path, offset, length, verify)


def frame_record(data: bytes) -> bytes:
  """Frames one payload as TFRecord bytes."""
  length = struct.pack("<Q", len(data))
  return length + _FOOTER.pack(masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))


class TFRecordWriter:
  """Writes TFRecord files (used by the tests to synthesize Waymo segments).

  Usage: ``with TFRecordWriter(path) as w: w.write(frame.SerializeToString())``.
  """

  def __init__(self, path: str | os.PathLike):
    self._f = open(path, "wb")

  def write(self, data: bytes) -> None:
    self._f.write(frame_record(data))

  def close(self) -> None:
    self._f.close()

  def __enter__(self) -> "TFRecordWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> None:
  """Writes ``records`` as one TFRecord file."""
  with TFRecordWriter(path) as w:
    for r in records:
      w.write(r)
