import shutil
import zipfile

import pytest
import torch

from broadface.data import DATASETS, EvalTransform, make_loader, open_dataset
from broadface.data.omniglot import TRAIN_ALPHABETS, open_omniglot


def test_lfw_and_celeba(root):
    lfw = open_dataset("lfw", "all")
    assert (len(lfw), len(lfw.classes)) == (13233, 5749)
    tr, te = open_dataset("lfw", "train", test_fold=2), open_dataset("lfw", "test", test_fold=2)
    assert len(tr) + len(te) == len(lfw) and not set(tr.classes) & set(te.classes)
    c_tr, c_te = open_dataset("celeba299", "train"), open_dataset("celeba299", "test")
    assert (len(c_tr.classes), len(c_te.classes), len(c_tr) + len(c_te)) == (149, 150, 6300)
    x, y = open_dataset("celeba299", "test", transform=EvalTransform(56))[0]
    assert x.shape == (3, 56, 56) and y == 0


def test_omniglot_counts_and_alphabet_split(root):
    full = open_dataset("omniglot", "all")
    assert (len(full), len(full.classes)) == (4840, 242)  # Greek and Latin counted once
    assert (full.class_counts() == 20).all()
    assert sum(c.startswith("Greek/") for c in full.classes) == 24
    tr, te = open_dataset("omniglot", "train"), open_dataset("omniglot", "test")
    alph = lambda ds: {c.split("/")[0] for c in ds.classes}  # noqa: E731
    assert alph(tr) == set(TRAIN_ALPHABETS) and not alph(tr) & alph(te)
    assert len(tr) + len(te) == len(full)
    x, _ = te[0]
    assert x.shape == (3, 105, 105)


def test_omniglot_reads_in_workers(root):
    te = open_dataset("omniglot", "test", transform=EvalTransform(28, channels=1))
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
        open_omniglot(tmp_path)


def test_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="celeba299.*does not exist"):
        open_dataset("celeba299", data_root=tmp_path)
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        open_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        open_dataset("lfw", "val")
    with pytest.raises(ValueError, match="lfw"):
        open_dataset("celeba299", test_fold=1)
    assert DATASETS == ("lfw", "celeba299", "omniglot")
