import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import broadface.data.folder as folder_mod
from broadface.data import FaceFolder, ImageDecodeError

from tests.helpers import NAMES


def test_lfw_listing_is_lazy_sorted_and_labelled(lfw_dir, monkeypatch):
    def no_decode(*a, **k):
        raise AssertionError("listing must not decode images")

    monkeypatch.setattr(Image, "open", no_decode)
    ds = FaceFolder(lfw_dir)
    assert len(ds) == 13233 and len(ds.classes) == 5749  # shared/data/README.md
    assert ds.classes == sorted(ds.classes)
    assert ds.targets == [label for _, label in ds.samples]
    for path, label in ds.samples[::97]:
        assert path.split("/")[-2] == ds.classes[label]
    gore = ds.class_to_idx["Al_Gore"]
    files = [p for p, label in ds.samples if label == gore]
    assert files == sorted(files) and len(files) == len(list((lfw_dir / "Al_Gore").iterdir()))


def test_item_is_chw_float_and_label(small_folder):
    ds = FaceFolder(small_folder)
    x, y = ds[4]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32 and isinstance(y, int)
    assert 0.0 <= x.min() and x.max() <= 1.0
    ref = np.asarray(Image.open(ds.samples[4][0]).convert("RGB"), dtype=np.float32) / 255
    assert torch.equal(x, torch.from_numpy(ref).permute(2, 0, 1))
    assert ds.classes == NAMES and y == 1


@pytest.mark.parametrize("mode,ext", [("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("1", ".bmp"),
                                      ("L", ".pgm"), ("I;16", ".png"), ("LA", ".png")])
def test_modes_promoted_to_rgb(small_folder, tmp_path, mode, ext):
    src = Image.open(next((small_folder / NAMES[0]).iterdir())).convert("RGB")
    img = src.convert("P", palette=Image.ADAPTIVE) if mode == "P" else src.convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img, dtype=np.uint16) * 257)  # 16-bit grayscale
    (tmp_path / "c" / "a").mkdir(parents=True)
    img.save(tmp_path / "c" / "a" / f"x{ext}")
    x, _ = FaceFolder(tmp_path / "c")[0]
    assert x.shape == (3, 112, 112)
    if mode in ("L", "I;16"):
        gray = torch.from_numpy(np.asarray(src.convert("L"), dtype=np.float32) / 255)
        assert torch.equal(x[0], gray) and torch.equal(x[1], x[2])


def test_class_subset_and_errors(small_folder, tmp_path):
    ds = FaceFolder(small_folder, classes=["Al_Gore", "Abdullah_Gul"])
    assert ds.classes == ["Al_Gore", "Abdullah_Gul"] and set(ds.targets) == {0, 1}
    assert all(p.split("/")[-2] == ds.classes[label] for p, label in ds.samples)
    with pytest.raises(ValueError, match="not found.*Nobody"):
        FaceFolder(small_folder, classes=["Nobody"])
    with pytest.raises(ValueError, match="duplicate"):
        FaceFolder(small_folder, classes=["Al_Gore", "Al_Gore"])
    (small_folder / "Empty_Person").mkdir()
    (small_folder / "Empty_Person" / "notes.txt").write_text("no image")
    with pytest.raises(ValueError, match="Empty_Person: class folder holds no image"):
        FaceFolder(small_folder)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        FaceFolder(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match="missing"):
        FaceFolder(tmp_path / "missing")


def _corrupt(small_folder):
    bad = small_folder / NAMES[1] / "zz_corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = sorted((small_folder / NAMES[1]).glob("*_0001.jpg"))[0]
    trunc = small_folder / NAMES[1] / "zz_truncated.jpg"
    trunc.write_bytes(good.read_bytes()[:2000])
    return bad, trunc


def test_corrupt_raises_naming_file(small_folder):
    bad, trunc = _corrupt(small_folder)
    ds = FaceFolder(small_folder)
    idx = {p: i for i, (p, _) in enumerate(ds.samples)}
    for f in (bad, trunc):
        with pytest.raises(ImageDecodeError, match=f.name):
            ds[idx[str(f)]]
    assert issubclass(ImageDecodeError, ValueError)


def test_skip_substitutes_next_readable_with_its_own_label(small_folder):
    bad, trunc = _corrupt(small_folder)
    ds = FaceFolder(small_folder, on_error="skip")
    ref = FaceFolder(small_folder)
    i_bad = [p for p, _ in ds.samples].index(str(bad))
    assert ds.samples[i_bad + 2][0] == ref.samples[i_bad + 2][0] and ds.source(i_bad + 1) == str(trunc)
    x, y = ds[i_bad]  # bad and truncated are consecutive -> both skipped
    x_ref, y_ref = ref[i_bad + 2]
    assert torch.equal(x, x_ref) and y == y_ref
    assert ds.skipped == [str(bad), str(trunc)]
    assert ds[i_bad + 1][1] == y_ref  # flagged files are not retried


def test_skips_in_worker_processes_reach_the_main_process(small_folder):
    bad, trunc = _corrupt(small_folder)
    ds = FaceFolder(small_folder, on_error="skip")
    labels = torch.cat([y for _, y in DataLoader(ds, batch_size=4, num_workers=2)])
    assert len(labels) == len(ds) and sorted(ds.skipped) == sorted([str(bad), str(trunc)])


def test_all_bad_in_skip_mode_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 images"):
        FaceFolder(tmp_path, on_error="skip")[0]
    with pytest.raises(ValueError, match="on_error"):
        FaceFolder(tmp_path, on_error="ignore")


def test_from_samples(small_folder):
    files = sorted(str(p) for p in small_folder.rglob("*.jpg"))
    ds = FaceFolder.from_samples([(files[0], 2), (files[5], 0)], classes=["a", "b", "c"])
    assert len(ds) == 2 and ds.targets == [2, 0] and ds[0][1] == 2
    assert FaceFolder.from_samples([(files[0], 3)]).classes == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="outside the 2 classes"):
        FaceFolder.from_samples([(files[0], 2)], classes=["a", "b"])
    with pytest.raises(ValueError, match="non-negative int"):
        FaceFolder.from_samples([(files[0], -1)])
    with pytest.raises(ValueError, match="empty"):
        FaceFolder.from_samples([])


def test_pickle_roundtrip(small_folder):
    ds = FaceFolder(small_folder, on_error="skip")
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.samples == ds.samples and torch.equal(clone[3][0], ds[3][0])


def test_extensions_filter(small_folder):
    jpg = small_folder / NAMES[0] / "Abdullah_Gul_0001.jpg"
    (small_folder / NAMES[0] / "extra.PNG").write_bytes(jpg.read_bytes())
    assert len(FaceFolder(small_folder)) == 10
    assert len(FaceFolder(small_folder, extensions=["jpg"])) == 9
    assert folder_mod.list_images(small_folder / NAMES[0], [".png"]) == ["extra.PNG"]
