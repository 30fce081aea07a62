import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from broadface.data import FaceFolder, ImageDecodeError, RecordIODataset, pack_folder
from broadface.data.mxrecord import MAGIC, RecordReader, RecordWriter, frame, pack, read_index, unpack

from tests.helpers import NAMES

FIXTURES = Path(__file__).parent / "fixtures"
MAGIC_BYTES = struct.pack("<I", MAGIC)
# Payloads of tests/data/fixtures/mxnet_1.9.1_written.rec, written by mxnet 1.9.1's
# MXIndexedRecordIO: key 0 = IRHeader(2, [7, 9]); keys 1..6 = IRHeader(0, float(k % 2), k, 0) + payload;
# key 7 = IRHeader(0, [1, 2, 3], 7, 0) + b"arr".
MX_PAYLOADS = [b"abcd" + MAGIC_BYTES + b"xyz", MAGIC_BYTES * 2 + b"12345678", b"\0" * 3, MAGIC_BYTES,
               b"12" + MAGIC_BYTES + b"34", bytes(range(256)) * 3 + MAGIC_BYTES]


def _mx_records():
    yield 0, pack([7, 9], b"")
    for k, p in enumerate(MX_PAYLOADS, 1):
        yield k, pack(float(k % 2), p, id=k)
    yield 7, pack([1.0, 2.0, 3.0], b"arr", id=7)


def test_byte_identical_to_mxnet_writer(tmp_path):
    expected = (FIXTURES / "mxnet_1.9.1_written.rec").read_bytes()
    assert b"".join(frame(r) for _, r in _mx_records()) == expected
    with open(tmp_path / "x.rec", "wb") as f:
        w = RecordWriter(f)
        for k, r in _mx_records():
            w.write(k, r)
    with open(tmp_path / "x.idx", "wb") as f:
        w.write_index(f)
    assert (tmp_path / "x.idx").read_bytes() == (FIXTURES / "mxnet_1.9.1_written.idx").read_bytes()


def test_reads_mxnet_written_records():
    idx = read_index(FIXTURES / "mxnet_1.9.1_written.idx")
    reader = RecordReader(FIXTURES / "mxnet_1.9.1_written.rec")
    headers = {k: unpack(reader.read(off)) for k, off in idx.items()}
    assert headers[0][0].flag == 2 and headers[0][0].label.tolist() == [7.0, 9.0]
    for k, p in enumerate(MX_PAYLOADS, 1):
        h, payload = headers[k]
        assert (h.flag, h.label, h.id, payload) == (0, float(k % 2), k, p)
    assert headers[7][0].flag == 3 and headers[7][0].label.tolist() == [1, 2, 3] and headers[7][1] == b"arr"


def test_magic_split_roundtrip_random(tmp_path):
    rng = np.random.default_rng(0)
    recs = []
    for n in range(40):
        b = bytearray(rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8).tobytes())
        for pos in range(0, len(b) - 3, 4):
            if rng.random() < 0.3:
                b[pos:pos + 4] = MAGIC_BYTES
        recs.append(bytes(b))
    with open(tmp_path / "r.rec", "wb") as f:
        w = RecordWriter(f)
        for k, r in enumerate(recs):
            w.write(k, r)
    reader = RecordReader(tmp_path / "r.rec")
    assert [reader.read(off) for _, off in w.index] == recs


def test_pack_then_read_equals_folder(small_folder, tmp_path):
    # One PNG and one grayscale image among the JPEGs: stored as-is, decoded to RGB.
    src = sorted((small_folder / NAMES[2]).iterdir())[0]
    Image.open(src).save(small_folder / NAMES[2] / "zz.png")
    Image.open(src).convert("L").save(small_folder / NAMES[0] / "zz_gray.jpg")
    folder = FaceFolder(small_folder)
    s = pack_folder(small_folder, tmp_path / "rec")
    assert (s.num_images, s.num_classes, s.size, s.skipped) == (len(folder), 3, (112, 112), [])
    assert (tmp_path / "rec" / "property").read_text().strip() == "3,112,112"
    ds = RecordIODataset(tmp_path / "rec")
    assert len(ds) == len(folder) and ds.targets == folder.targets and ds.classes == NAMES
    assert ds.header0 == (len(folder) + 1, len(folder) + 4)
    for i, (path, label) in enumerate(folder.samples):
        assert ds.read_record(i) == (label, Path(path).read_bytes())
        assert torch.equal(ds[i][0], folder[i][0])
    # identity records: [first, last+1) keys of each class
    idx, reader = read_index(tmp_path / "rec" / "train.idx"), RecordReader(tmp_path / "rec" / "train.rec")
    for c in range(3):
        h, _ = unpack(reader.read(idx[len(folder) + 1 + c]))
        keys = [k + 1 for k, t in enumerate(folder.targets) if t == c]
        assert h.label.tolist() == [keys[0], keys[-1] + 1]
    # prefix and .rec forms
    assert len(RecordIODataset(tmp_path / "rec" / "train")) == len(RecordIODataset(tmp_path / "rec" / "train.rec"))


def test_pack_bad_images(small_folder, tmp_path):
    bad = small_folder / NAMES[1] / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 junk")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        pack_folder(small_folder, tmp_path / "rec")
    s = pack_folder(small_folder, tmp_path / "rec", skip_bad=True)
    assert s.skipped == [str(bad)] and len(RecordIODataset(tmp_path / "rec")) == 9
    with pytest.raises(ValueError, match="already exists"):
        pack_folder(small_folder, tmp_path / "rec", skip_bad=True)
    assert pack_folder(small_folder, tmp_path / "rec", skip_bad=True, overwrite=True).num_images == 9


def _write_rec(dirpath, labels, payload=b"", header0=True, prop=None):
    dirpath.mkdir(parents=True, exist_ok=True)
    with open(dirpath / "train.rec", "wb") as f:
        w = RecordWriter(f)
        first = 1 if header0 else 0
        if header0:
            w.write(0, pack([len(labels) + 1, len(labels) + 1], b""))
        for k, label in enumerate(labels, first):
            w.write(k, pack(label, payload))
    with open(dirpath / "train.idx", "wb") as f:
        w.write_index(f)
    if prop:
        (dirpath / "property").write_text(prop)


def test_labels_checked_against_property(lfw_dir, tmp_path):
    jpg = (lfw_dir / "Al_Gore" / "Al_Gore_0001.jpg").read_bytes()
    _write_rec(tmp_path / "a", [0.0, 1.0, 5.0], jpg, prop="3,112,112")
    ds = RecordIODataset(tmp_path / "a")
    assert ds[1][1] == 1
    with pytest.raises(ValueError, match=r"train.rec record 3: label 5.0 .* 0..2"):
        ds[2]
    _write_rec(tmp_path / "b", [0.0, 1.5], jpg, prop="3,112,112")
    with pytest.raises(ValueError, match="record 2: label 1.5"):
        RecordIODataset(tmp_path / "b").targets
    # array labels (flag > 0): label[0] is the class, as in insightface
    _write_rec(tmp_path / "c", [[2.0, 9.0]], jpg, prop="3,112,112")
    assert RecordIODataset(tmp_path / "c")[0][1] == 2


def test_without_header_record_or_property(lfw_dir, tmp_path):
    jpg = (lfw_dir / "Al_Gore" / "Al_Gore_0001.jpg").read_bytes()
    _write_rec(tmp_path / "d", [0.0, 3.0, 1.0], jpg, header0=False)
    ds = RecordIODataset(tmp_path / "d")
    assert ds.header0 is None and ds.keys == [0, 1, 2] and ds.targets == [0, 3, 1] and len(ds.classes) == 4


def test_missing_files_and_corrupt_records(small_folder, tmp_path):
    pack_folder(small_folder, tmp_path / "rec")
    (tmp_path / "rec" / "train.idx").rename(tmp_path / "rec" / "moved.idx")
    with pytest.raises(FileNotFoundError, match=r"train.idx is missing"):
        RecordIODataset(tmp_path / "rec")
    with pytest.raises(FileNotFoundError, match="nothing.rec"):
        RecordIODataset(tmp_path / "nothing")
    (tmp_path / "rec" / "moved.idx").rename(tmp_path / "rec" / "train.idx")
    (tmp_path / "rec" / "property").write_text("three,112,112")
    with pytest.raises(ValueError, match="property: expected 'num_classes,height,width'"):
        RecordIODataset(tmp_path / "rec")
    # a record whose image bytes are garbage: raise names the record, skip substitutes
    _write_rec(tmp_path / "e", [0.0, 1.0], b"garbage", prop="2,112,112")
    with pytest.raises(ImageDecodeError, match="record 1"):
        RecordIODataset(tmp_path / "e")[0]
    with pytest.raises(ValueError, match="none of the 2 images"):
        RecordIODataset(tmp_path / "e", on_error="skip")[0]
    # an index pointing into the middle of a record
    (tmp_path / "e" / "train.idx").write_text("0\t0\n1\t4\n2\t4\n")
    with pytest.raises(ValueError, match="no RecordIO magic at byte 4"):
        RecordIODataset(tmp_path / "e")[0]
    (tmp_path / "e" / "train.idx").write_text("0\t0\n1 x\n")
    with pytest.raises(ValueError, match=r"train.idx:2: expected 'key<TAB>offset'"):
        RecordIODataset(tmp_path / "e")
