import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from broadface.data import DATASETS, EvalTransform, make_loader, open_dataset
from broadface.data.omniglot import TRAIN_ALPHABETS, open_omniglot_full, open_omniglot_small
from broadface.data.rotations import RotatedClasses, rotate


def test_lfw_and_celeba(root):
    lfw = open_dataset("lfw", "all")
    assert (len(lfw), len(lfw.classes)) == (13233, 5749)
    tr, te = open_dataset("lfw", "train", test_fold=2), open_dataset("lfw", "test", test_fold=2)
    assert len(tr) + len(te) == len(lfw) and not set(tr.classes) & set(te.classes)
    c_tr, c_te = open_dataset("celeba299", "train"), open_dataset("celeba299", "test")
    assert (len(c_tr.classes), len(c_te.classes), len(c_tr) + len(c_te)) == (149, 150, 6300)
    x, y = open_dataset("celeba299", "test", transform=EvalTransform(56))[0]
    assert x.shape == (3, 56, 56) and y == 0


def _alphabets(ds) -> set[str]:
    return {c.split("/")[0] for c in ds.classes}


def test_full_omniglot_is_the_standard_split(root):
    tr, te = open_dataset("omniglot", "train"), open_dataset("omniglot", "test")
    assert (len(tr.classes), len(tr)) == (964, 19280)  # images_background
    assert (len(te.classes), len(te)) == (659, 13180)  # images_evaluation
    assert len(_alphabets(tr)) == 30 and len(_alphabets(te)) == 20
    assert not _alphabets(tr) & _alphabets(te) and not set(tr.classes) & set(te.classes)
    assert (tr.class_counts() == 20).all() and (te.class_counts() == 20).all()
    assert all("images_background.zip:" in s for s, _ in tr.samples[:50])
    assert all("images_evaluation.zip:" in s for s, _ in te.samples[:50])
    everything = open_dataset("omniglot", "all")
    assert (len(everything.classes), len(everything)) == (1623, 32460)


def test_full_omniglot_missing_zip_names_the_file_and_the_small_set(root, tmp_path):
    shutil.copy(root / "omniglot" / "images_evaluation.zip", tmp_path)
    with pytest.raises(FileNotFoundError, match="images_background.zip.*omniglot_small"):
        open_omniglot_full(tmp_path, "train")


def test_rotation_classes_labels_counts_and_exact_pixels(root):
    base = open_dataset("omniglot", "test")
    rot = open_dataset("omniglot", "test", rotations=4)
    assert (len(rot), len(rot.classes)) == (4 * 13180, 4 * 659)
    assert (rot.class_counts() == 20).all()
    # sample j = base sample j // 4 at (j % 4) * 90 degrees, label 4 * base label + j % 4
    j = 4 * 777 + 1
    img, label = rot.image(j)
    ref, ref_label = base.image(777)
    assert label == 4 * ref_label + 1 and rot.classes[label] == base.classes[ref_label] + "@90"
    a, b = np.asarray(img), np.asarray(ref)
    assert np.array_equal(a, np.rot90(b, k=1))  # 90 degrees counter-clockwise, every pixel exact
    assert np.array_equal(np.asarray(rot.image(j + 1)[0]), np.rot90(b, k=2))
    assert np.array_equal(np.asarray(rot.image(j - 1)[0]), b)
    x, y = open_dataset("omniglot", "test", transform=EvalTransform(28), rotations=4)[j]
    assert x.shape == (3, 28, 28) and y == label
    train = open_dataset("omniglot", "train", rotations=4)
    assert len(train.classes) == 3856 and not set(train.classes) & set(rot.classes)


def test_rotations_must_be_1_2_or_4():
    with pytest.raises(ValueError, match="rotations must be one of"):
        RotatedClasses(open_dataset("omniglot_small", "test"), rotations=3)
    square = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4))
    with pytest.raises(ValueError, match="multiple of 90"):
        rotate(square, 45)


def test_omniglot_small_counts_and_alphabet_split(root):
    full = open_dataset("omniglot_small", "all")
    assert (len(full), len(full.classes)) == (4840, 242)  # Greek and Latin counted once
    assert (full.class_counts() == 20).all()
    assert sum(c.startswith("Greek/") for c in full.classes) == 24
    tr, te = open_dataset("omniglot_small", "train"), open_dataset("omniglot_small", "test")
    assert (len(tr.classes), len(te.classes)) == (136, 106)
    assert _alphabets(tr) == set(TRAIN_ALPHABETS) and not _alphabets(tr) & _alphabets(te)
    assert len(tr) + len(te) == len(full)
    x, _ = te[0]
    assert x.shape == (3, 105, 105)


def test_omniglot_reads_in_workers(root):
    te = open_dataset("omniglot_small", "test", transform=EvalTransform(28, channels=1))
    kw = dict(batch_size=64, seed=0)
    a = [x for x, _ in make_loader(te, num_workers=0, **kw)][:3]
    b = [x for x, _ in make_loader(te, num_workers=2, **kw)][:3]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and a[0].shape == (64, 1, 28, 28)


def test_omniglot_conflicting_duplicate_alphabet(root, tmp_path):
    src = root / "omniglot"
    shutil.copy(src / "images_background_small1.zip", tmp_path)
    with zipfile.ZipFile(src / "images_background_small2.zip") as zin, \
            zipfile.ZipFile(tmp_path / "images_background_small2.zip", "w") as zout:
        names = [n for n in zin.namelist() if n.endswith(".png")]
        greek = next(n for n in names if "/Greek/" in n)
        for n in names:
            zout.writestr(n, zin.read(n) + (b"x" if n == greek else b""))
    with pytest.raises(ValueError, match="'Greek' differs"):
        open_omniglot_small(tmp_path)


def test_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="celeba299.*does not exist"):
        open_dataset("celeba299", data_root=tmp_path)
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        open_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        open_dataset("lfw", "val")
    with pytest.raises(ValueError, match="lfw"):
        open_dataset("celeba299", test_fold=1)
    assert DATASETS == ("lfw", "celeba299", "omniglot", "omniglot_small")
