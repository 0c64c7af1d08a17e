"""The TensorFlow-free event writer, read back by the real `tensorboard` package."""

import glob
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from latentr3_jax.train import runs
from latentr3_jax.utils import tensorboard as tb

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator, event_file_loader  # noqa: E402
from tensorboard.compat.tensorflow_stub import errors as tb_errors  # noqa: E402
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_records  # noqa: E402


def _f32(x):
    return float(np.float32(x))


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def _events(path):
    """The Event protos as stored (the legacy loader does not convert simple_value)."""
    return list(event_file_loader.LegacyEventFileLoader(path).Load())


def _scalars(logdir):
    """{tag: [(step, value)]} as TensorBoard's accumulator sees the directory."""
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _only_file(logdir):
    files = glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))
    assert len(files) == 1, files
    return files[0]


# ----------------------------------------------------------------------------- CRC-32C

def test_crc32c_known_vectors():
    assert tb.crc32c(b"123456789") == 0xE3069283
    assert tb.crc32c(bytes(32)) == 0x8A9136AA
    assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tb.crc32c(bytes(range(32))) == 0x46DD794E
    assert tb.crc32c(b"") == 0


def test_crc32c_matches_tensorboards_own():
    r = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 100, 1000):
        data = r.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tb.crc32c(data) == tb_records.crc32c(data)
        assert tb.masked_crc32c(data) == tb_records.masked_crc32c(data)


def test_varint_and_negative_step():
    assert tb._varint(0) == b"\x00"
    assert tb._varint(300) == b"\xac\x02"
    assert tb._varint(-1) == b"\xff" * 9 + b"\x01"      # int64 -1: ten bytes


# ----------------------------------------------------------------------------- files

def test_scalars_read_back_by_tensorboard(tmp_path):
    written = {}
    r = np.random.default_rng(1)
    with tb.EventWriter(str(tmp_path)) as w:
        for step in range(0, 50, 5):
            values = {"train/loss": float(r.normal()), "train/lr": 10.0 ** -step,
                      "valid/loss": np.float64(r.normal() * 1e3), "count": np.int32(step * 7)}
            w.scalars(values, step)
            for k, v in values.items():
                written.setdefault(k, []).append((step, _f32(v)))
        w.scalar("big", 2 ** 80, step=-3)                 # negative step, int past float32
        w.scalar("huge", 1e300, step=7)                   # float32 overflow: infinity
        written["big"] = [(-3, _f32(2 ** 80))]
        written["huge"] = [(7, math.inf)]
    assert _scalars(tmp_path) == written


def test_first_record_is_the_file_version_then_one_record_per_call(tmp_path):
    with tb.EventWriter(str(tmp_path)) as w:
        w.scalars({"a": 1.0, "b": 2}, step=3, wall_time=1234.5)
        w.scalars({"a": 4.0}, step=4)
    path = _only_file(tmp_path)
    assert os.path.basename(path).startswith("events.out.tfevents.")
    events = _events(path)
    assert len(events) == 3
    assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 0
    assert not events[0].HasField("summary")
    e = events[1]
    assert e.step == 3 and e.wall_time == 1234.5
    assert [(v.tag, v.simple_value) for v in e.summary.value] == [("a", 1.0), ("b", 2.0)]
    assert events[2].step == 4


def test_non_numbers_skipped_non_finite_kept(tmp_path):
    with tb.EventWriter(str(tmp_path)) as w:
        w.scalars({"nan": math.nan, "inf": math.inf, "ninf": -np.inf, "flag": True,
                   "npflag": np.bool_(False), "text": "hello", "none": None, "list": [1.0],
                   "zero_d": np.array(2.5)}, step=1)
        w.scalars({"text": "only strings"}, step=2)      # nothing numeric: no record
        w.scalar("flag", False, step=3)
    got = _scalars(tmp_path)
    assert set(got) == {"nan", "inf", "ninf", "zero_d"}
    assert math.isnan(got["nan"][0][1]) and got["inf"] == [(1, math.inf)]
    assert got["ninf"] == [(1, -math.inf)] and got["zero_d"] == [(1, 2.5)]
    assert len(_events(_only_file(tmp_path))) == 2      # file version + one step


def test_each_call_is_on_disk_before_close(tmp_path):
    w = tb.EventWriter(str(tmp_path / "logs"))
    w.scalar("loss", 0.5, step=1)
    assert _scalars(tmp_path / "logs") == {"loss": [(1, 0.5)]}   # read while still open
    w.scalar("loss", 0.25, step=2)
    assert _scalars(tmp_path / "logs") == {"loss": [(1, 0.5), (2, 0.25)]}
    w.close()
    w.close()                                            # closing twice is harmless
    with pytest.raises(ValueError, match="closed"):
        w.scalar("loss", 0.1, step=3)


def test_two_writers_in_one_directory_get_their_own_files(tmp_path):
    a, b = tb.EventWriter(str(tmp_path)), tb.EventWriter(str(tmp_path))
    assert a.path != b.path
    a.close()
    b.close()


# ----------------------------------------------------------------------------- checksums

def _write_two(path):
    with tb.EventWriter(str(path)) as w:
        w.scalar("x", 1.0, step=1)
        w.scalar("x", 2.0, step=2)
    return _only_file(path)


def _record_offsets(data):
    """Start of each record in a framed file (walking the length fields)."""
    out, i = [], 0
    while i < len(data):
        out.append(i)
        (n,) = struct.unpack("<Q", data[i:i + 8])
        i += 8 + 4 + n + 4
    assert i == len(data)
    return out


def _read_all_strict(path):
    reader = tb_records.PyRecordReader_New(path, 0, None, None)
    n = 0
    while True:
        try:
            reader.GetNext()
        except tb_errors.OutOfRangeError:
            return n
        n += 1


@pytest.mark.parametrize("where", ["length", "length_crc", "payload", "payload_crc"])
def test_a_flipped_byte_fails_the_readers_checksum(tmp_path, where):
    path = _write_two(tmp_path)
    data = bytearray(open(path, "rb").read())
    starts = _record_offsets(bytes(data))
    assert len(starts) == 3 and _read_all_strict(path) == 3
    last = starts[-1]
    (n,) = struct.unpack("<Q", data[last:last + 8])
    pos = {"length": last, "length_crc": last + 9, "payload": last + 12 + n // 2,
           "payload_crc": last + 12 + n + 1}[where]
    data[pos] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(tb_errors.DataLossError, match="crc32"):
        _read_all_strict(path)
    # the loader keeps what came before the damaged record and drops the rest
    assert [e.step for e in _events(path)] == [0, 1]
    assert _scalars(tmp_path) == {"x": [(1, 1.0)]}


def test_a_file_cut_mid_record_keeps_its_whole_records(tmp_path):
    path = _write_two(tmp_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-5])
    assert _scalars(tmp_path) == {"x": [(1, 1.0)]}


# ----------------------------------------------------------------------------- run directory

def test_metrics_writer_mirrors_records_to_tensorboard(tmp_path):
    w = runs.MetricsWriter(str(tmp_path))
    w.write({"split": "valid", "step": 0, "loss": 3.0})
    w.write({"split": "train", "batch": 1, "step": 1, "epoch": 0, "loss": np.float32(2.5),
             "skipped": 0, "rate": {"tokens_per_s": 100.0}, "note": "text", "ok": True})
    w.write({"split": "train", "batch": 2, "step": 2, "epoch": 0, "loss": math.nan})
    w.write({"split": "valid", "step": 2, "epoch": 0, "loss": 2.0})
    w.write({"event": "early_stop", "step": 2, "best_step": 2})   # a marker, not a curve
    w.write({"step": "not a step", "loss": 9.0})
    w.write({"loss": 9.0})
    w.write({"step": 5, "misc": 1.5})                              # no split: no prefix
    w.close()
    got = _scalars(tmp_path / runs.TENSORBOARD)
    assert set(got) == {"valid/loss", "valid/epoch", "train/loss", "train/epoch",
                        "train/skipped", "train/rate/tokens_per_s", "misc"}
    assert got["valid/loss"] == [(0, 3.0), (2, 2.0)]
    assert got["train/loss"][0] == (1, 2.5) and math.isnan(got["train/loss"][1][1])
    assert got["train/rate/tokens_per_s"] == [(1, 100.0)]
    assert got["misc"] == [(5, 1.5)]
    assert len(runs.read_metrics(str(tmp_path))) == 8              # the JSON lines are unchanged


def test_disabled_metrics_writer_writes_nothing(tmp_path):
    w = runs.MetricsWriter(str(tmp_path), enabled=False)
    w.write({"split": "train", "step": 1, "loss": 1.0})
    w.close()
    assert os.listdir(tmp_path) == []


def test_package_never_imports_tensorflow_or_protobuf():
    code = ("import sys; import latentr3_jax.utils.tensorboard; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorboard', 'google')]; print(bad); assert not bad; "
            "import latentr3_jax.train.runs; "      # jax and orbax bring protobuf themselves
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorboard')]; "
            "print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout + out.stderr
