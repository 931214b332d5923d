"""TFRecord framing: round trip, known CRC32C vectors, corruption and truncation detection."""
import os
import struct

import pytest

from cvd_storm_jax.data_pipelines import tfrecord


def test_crc32c_known_vectors():
  # RFC 3720 / iSCSI check value, and the all-zero 32-byte vector from RFC 3720 B.4.
  assert tfrecord.crc32c(b"123456789") == 0xE3069283
  assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA
  assert tfrecord.crc32c_python(b"123456789") == 0xE3069283
  assert tfrecord.crc32c_python(bytes(32)) == 0x8A9136AA
  data = os.urandom(1000)
  assert tfrecord.crc32c(data) == tfrecord.crc32c_python(data)


def test_masked_crc_matches_hand_formula():
  crc = tfrecord.crc32c(b"abc")
  assert tfrecord.masked_crc32c(b"abc") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _write(tmp_path, records):
  path = tmp_path / "x.tfrecord"
  tfrecord.write_records(path, records)
  return path


def test_round_trip_and_index(tmp_path):
  records = [b"", b"hello", os.urandom(5000)]
  path = _write(tmp_path, records)
  assert list(tfrecord.iter_records(path)) == records
  index = tfrecord.index_records(path)
  assert [n for _, n in index] == [0, 5, 5000]
  assert index[1][0] == 16  # Header 12 + empty payload + footer 4.
  for (offset, _), r in zip(index, records):
    assert tfrecord.read_record(path, offset) == r
  assert os.path.getsize(path) == sum(16 + len(r) for r in records)


def test_flipped_payload_byte_is_caught(tmp_path):
  path = _write(tmp_path, [b"first", b"second record"])
  raw = bytearray(path.read_bytes())
  second = 16 + 5
  raw[second + 12 + 3] ^= 0x01
  path.write_bytes(bytes(raw))
  it = tfrecord.iter_records(path)
  assert next(it) == b"first"
  with pytest.raises(tfrecord.TFRecordError, match=rf"x.tfrecord.*offset {second}.*data CRC"):
    next(it)
  with pytest.raises(tfrecord.TFRecordError, match="data CRC"):
    tfrecord.read_record(path, second)
  # Without verification the corrupt payload comes back (proves the check, not the framing, caught it).
  assert len(list(tfrecord.iter_records(path, verify=False))) == 2


def test_flipped_length_byte_is_caught(tmp_path):
  path = _write(tmp_path, [b"first"])
  raw = bytearray(path.read_bytes())
  raw[0] ^= 0x02
  path.write_bytes(bytes(raw))
  with pytest.raises(tfrecord.TFRecordError, match="offset 0.*length CRC"):
    list(tfrecord.iter_records(path))
  with pytest.raises(tfrecord.TFRecordError, match="length CRC"):
    tfrecord.index_records(path)


@pytest.mark.parametrize("cut", [1, 4, 10])
def test_truncated_file_is_caught(tmp_path, cut):
  path = _write(tmp_path, [b"a" * 100, b"b" * 100])
  raw = path.read_bytes()
  path.write_bytes(raw[:-cut])
  with pytest.raises(tfrecord.TFRecordError, match=r"truncated record at byte offset 116"):
    list(tfrecord.iter_records(path))
  with pytest.raises(tfrecord.TFRecordError, match="truncated"):
    tfrecord.index_records(path)


def test_truncated_header_is_caught(tmp_path):
  path = _write(tmp_path, [b"a"])
  with open(path, "ab") as f:
    f.write(struct.pack("<I", 7))  # Half a header.
  with pytest.raises(tfrecord.TFRecordError, match="truncated record header at byte offset 17"):
    list(tfrecord.iter_records(path))


def test_scan_keeps_records_before_truncation(tmp_path):
  path = _write(tmp_path, [b"a" * 10, b"b" * 10, b"c" * 10])
  path.write_bytes(path.read_bytes()[:-3])
  index, error = tfrecord.scan_records(path)
  assert [o for o, _ in index] == [0, 26]
  assert isinstance(error, tfrecord.TFRecordError) and "offset 52" in str(error)
  assert tfrecord.read_record(path, 26) == b"b" * 10
