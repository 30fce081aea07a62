import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from broadface.data import FaceFolder, TrainTransform, epoch_order, make_loader
from broadface.data.splits import celeba299_split


@pytest.fixture(scope="module")
def faces(root):
    """A small real set: 8 CelebA-299 identities at 28x28 with random flips."""
    path = root / "celeba299" / "aligned-112x112"
    train, _ = celeba299_split(sorted(p.name for p in path.iterdir()))
    return FaceFolder(path, TrainTransform(28), classes=train[:8])


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_order_depends_only_on_seed_and_epoch():
    torch.manual_seed(123)
    a = epoch_order(100, seed=7, epoch=3)
    torch.manual_seed(999)
    assert torch.equal(a, epoch_order(100, seed=7, epoch=3))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_order(100, seed=7, epoch=4))
    assert not torch.equal(a, epoch_order(100, seed=8, epoch=3))
    assert torch.equal(epoch_order(5, 7, 3, shuffle=False), torch.arange(5))


def test_resume_mid_epoch_equals_uninterrupted(faces):
    """k steps + resume at (epoch, k) + the rest == one uninterrupted pass, over two epochs."""
    kw = dict(batch_size=16, seed=5, drop_last=True)
    full = [b for e in (0, 1) for b in batches(make_loader(faces, epoch=e, **kw))]
    n = len(make_loader(faces, **kw))
    k = 3
    head = batches(make_loader(faces, epoch=0, **kw))[:k]
    tail = batches(make_loader(faces, epoch=0, start_batch=k, **kw)) + batches(make_loader(faces, epoch=1, **kw))
    assert len(make_loader(faces, epoch=0, start_batch=k, **kw)) == n - k
    assert same(head + tail, full)
    # Epochs differ in order and in augmentation of the same sample.
    assert not torch.equal(full[0][1], full[n][1])


def test_workers_do_not_change_the_batches(faces):
    kw = dict(batch_size=10, seed=1, epoch=2, start_batch=1)
    assert same(batches(make_loader(faces, num_workers=0, **kw)), batches(make_loader(faces, num_workers=2, **kw)))


def test_each_epoch_flips_each_sample_independently(faces):
    def by_index(epoch):
        loader = make_loader(faces, batch_size=len(faces), shuffle=False, seed=3, epoch=epoch)
        return next(iter(loader))[0]

    e0, e1 = by_index(0), by_index(1)
    diff = [not torch.equal(a, b) for a, b in zip(e0, e1)]
    assert 0 < sum(diff) < len(diff)  # some samples flipped differently, not all
    assert torch.equal(e0, by_index(0))


def test_loader_leaves_global_rng_alone(faces):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    batches(make_loader(faces, batch_size=32, seed=9))
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])


class GlobalRandom(Dataset):
    """A foreign dataset drawing from the global RNGs (no generator support)."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.rand(2) + random.random() + float(np.random.rand()), i


def test_foreign_dataset_is_seeded_per_sample():
    kw = dict(batch_size=4, seed=2)
    full = batches(make_loader(GlobalRandom(), **kw))
    resumed = batches(make_loader(GlobalRandom(), **kw))[:2] + batches(make_loader(GlobalRandom(), start_batch=2, **kw))
    assert same(full, resumed)
    workers = batches(make_loader(GlobalRandom(), num_workers=2, **kw))
    assert same(full, workers)


def test_drop_last_and_bounds(faces):
    n = len(faces)
    assert len(make_loader(faces, 7, drop_last=True)) == n // 7
    assert len(make_loader(faces, 7, drop_last=False)) == -(-n // 7)
    seen = torch.cat([y for _, y in make_loader(faces, 7, shuffle=False)])
    assert seen.tolist() == faces.targets
    assert len(make_loader(faces, 7, drop_last=True, start_batch=n // 7)) == 0
    with pytest.raises(ValueError, match="start_batch"):
        make_loader(faces, 7, drop_last=True, start_batch=n // 7 + 1)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(faces, 0)
    loader = make_loader(faces, 8)
    assert loader.dataset.classes == faces.classes and loader.batch_sampler.num_batches == len(loader)


def test_collate_matches_default_collate(faces, monkeypatch):
    """float32 and uint8 image batches take the NumPy path in the main process, with default_collate's result."""
    from torch.utils.data import default_collate

    from broadface.data import loader
    from broadface.data.loader import collate_images

    items = [faces[i] for i in range(5)]
    pixels = [(torch.full((3, 2, 2), i, dtype=torch.uint8), i) for i in range(3)]
    ref_x, ref_y = default_collate(items)
    ref_pixels = default_collate(pixels)[0]
    with monkeypatch.context() as m:  # the fast path never falls back
        m.setattr(loader, "default_collate", lambda batch: pytest.fail("took default_collate"))
        x, y = collate_images(items)
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y) and y.dtype == torch.int64
        x, y = collate_images(pixels)
        assert x.dtype == torch.uint8 and torch.equal(x, ref_pixels) and y.tolist() == [0, 1, 2]
    odd = [(torch.zeros(2, dtype=torch.float64), 1), (torch.ones(2, dtype=torch.float64), 2)]
    assert collate_images(odd)[0].dtype == torch.float64  # falls back to default_collate
