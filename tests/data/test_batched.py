"""The batched fetch: a whole batch decoded at once gives the per-sample path's batches bit for bit (real faces
through the direct path; every odd image through the per-sample path in its slot), for any thread count, and
fails as the per-sample path does."""
from __future__ import annotations

import io
import shutil

import pytest
import torch
from PIL import Image

from broadface.data import FaceFolder, RecordIODataset, TrainTransform, epoch_order, make_loader, pack_folder
from broadface.data import batched
from broadface.data.base import ImageDataset
from broadface.data.images import ImageDecodeError, decode_pixels
from broadface.data.loader import collate_images

pytest.importorskip("simplejpeg")


def per_sample(batch):
    """The package's collate under another name: make_loader then takes the per-sample path."""
    return collate_images(batch)


def batches(ds, **kw):
    kw = {"batch_size": 16, "seed": 3, "epoch": 1, **kw}
    return [(x.clone(), y.clone()) for x, y in make_loader(ds, **kw)]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (x1, y1), (x2, y2) in zip(a, b):
        assert x1.dtype == x2.dtype and x1.shape == x2.shape and torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.fixture(scope="module")
def celeba(root, tmp_path_factory):
    """Real 112 px CelebA-299 faces of 10 identities, as a folder and packed as RecordIO."""
    src, dst = root / "celeba299" / "aligned-112x112", tmp_path_factory.mktemp("celeba") / "faces"
    for name in sorted(p.name for p in src.iterdir())[:10]:
        shutil.copytree(src / name, dst / name)
    rec = tmp_path_factory.mktemp("rec")
    pack_folder(dst, rec)
    return dst, rec


@pytest.mark.parametrize("kind", ["folder", "recordio"])
@pytest.mark.parametrize("pixels", [True, False])
def test_real_faces_batched_equal_the_per_sample_batches(celeba, kind, pixels, monkeypatch):
    tf = TrainTransform(112, pixels=pixels)
    ds = FaceFolder(celeba[0], tf) if kind == "folder" else RecordIODataset(celeba[1], tf)
    assert batched.can_fetch_batch(ds)
    ref = batches(ds, collate_fn=per_sample)
    if pixels:  # each face is its decoded pixels in C x H x W, mirrored or not, about half of them mirrored
        first = epoch_order(len(ds), 3, 1)[:16].tolist()
        faces = [torch.from_numpy(decode_pixels(ds.encoded(i)[0])).permute(2, 0, 1) for i in first]
        mirrored = [torch.equal(x, f.flip(-1)) for x, f in zip(ref[0][0], faces)]
        assert all(m or torch.equal(x, f) for m, x, f in zip(mirrored, ref[0][0], faces)) and 3 < sum(mirrored) < 13
    with monkeypatch.context() as m:
        m.setattr(ImageDataset, "_decoded", lambda self, i: pytest.fail(f"sample {i} left the direct path"))
        for threads in (1, 2, 3):
            assert_same(batches(ds, threads=threads), ref)


def test_workers_and_threads_do_not_change_the_batches(celeba):
    ds = FaceFolder(celeba[0], TrainTransform(112, pixels=True))
    ref = batches(ds, collate_fn=per_sample, start_batch=1)
    assert_same(batches(ds, start_batch=1, num_workers=2, threads=2), ref)  # two workers of two threads


def _odd_folder(face: Image.Image, root) -> None:
    """One class of plain faces, one of everything the direct path leaves to the per-sample path."""
    plain, odd = root / "plain", root / "z_odd"  # the odd class last: its images fill the batch's last slice
    plain.mkdir(parents=True)
    odd.mkdir()
    for i in range(5):
        face.rotate(7 * i).save(plain / f"{i}.jpg", quality=90)
    face.save(odd / "a.png")
    face.resize((64, 64)).save(odd / "b_small.jpg")  # resized by the transform
    face.convert("CMYK").save(odd / "c_cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    face.transpose(Image.ROTATE_90).save(odd / "d_exif.jpg", exif=exif.tobytes())
    buf = io.BytesIO()
    face.save(buf, format="JPEG")
    (odd / "e_truncated.jpg").write_bytes(buf.getvalue()[:700])


@pytest.mark.parametrize("mask_prob", [0.0, 0.5])
def test_odd_images_skips_and_masks_take_the_per_sample_path_in_their_slot(lfw_dir, tmp_path, mask_prob, monkeypatch):
    _odd_folder(Image.open(lfw_dir / "Al_Gore" / "Al_Gore_0001.jpg").convert("RGB"), tmp_path)
    runs, decoded, real = [], [], ImageDataset._decoded

    def spy(self, i, *encoded):  # records each per-sample decode
        decoded.append(self.source(i))
        return real(self, i, *encoded)

    for collate in (per_sample, None, None):
        ds = FaceFolder(tmp_path, TrainTransform(112, pixels=True, mask_prob=mask_prob), on_error="skip")
        threads = 2 if len(runs) == 2 else 1
        with monkeypatch.context() as m:
            m.setattr(ImageDataset, "_decoded", spy)
            runs.append((batches(ds, batch_size=5, collate_fn=collate, threads=threads), ds.skipped))
    (ref, skipped), *others = runs
    assert [p.rsplit("/", 1)[1] for p in skipped] == ["e_truncated.jpg"]
    if mask_prob == 0:  # the batched runs decode only the odd images per sample
        assert sorted(p.rsplit("/", 2)[1] for p in decoded[len(ds):]) == ["z_odd"] * 10
    read, real_encoded, per_sample_calls = [], FaceFolder.encoded, len(decoded)
    monkeypatch.setattr(FaceFolder, "encoded", lambda self, i: read.append(self.source(i)) or real_encoded(self, i))
    monkeypatch.setattr(ImageDataset, "_decoded", spy)
    assert_same(batches(ds, batch_size=5), ref)  # ds has flagged the truncated file: it is not read again
    assert not any(p.endswith("e_truncated.jpg") for p in read)
    # every readable file read once (the per-sample path decodes the bytes the fetch read), the truncated
    # file's substitute once more, in the truncated file's slot
    assert len(set(read)) == 9 and len(read) == 10
    per_sample_slots = len(decoded) - per_sample_calls  # the 5 odd images, and the faces their mask draw covers
    assert per_sample_slots == 5 if mask_prob == 0 else 5 < per_sample_slots < 10
    for got, got_skipped in others:
        assert_same(got, ref)
        assert got_skipped == skipped


def test_a_forked_worker_makes_its_own_fetch_threads(celeba):
    """A SeededDataset that already fetched in the main process (its thread pool started) and is then forked
    into a worker: the worker's batches come (a pool inherited without its threads would never answer)."""
    from torch.utils.data import DataLoader

    from broadface.data.loader import EpochBatchSampler, SeededDataset

    ds = FaceFolder(celeba[0], TrainTransform(112, pixels=True))
    seeded = SeededDataset(ds, 3, 1, batched=True, threads=2)
    first = collate_images(seeded.__getitems__(list(range(16))))
    loader = DataLoader(seeded, batch_sampler=EpochBatchSampler(len(ds), 16, False, 3, 1, True), num_workers=1,
                        collate_fn=collate_images, multiprocessing_context="fork", timeout=60)
    x, y = next(iter(loader))
    assert torch.equal(x, first[0]) and torch.equal(y, first[1])


def test_an_unreadable_image_raises_naming_it_from_any_slice(lfw_dir, tmp_path):
    _odd_folder(Image.open(lfw_dir / "Al_Gore" / "Al_Gore_0001.jpg").convert("RGB"), tmp_path)
    ds = FaceFolder(tmp_path, TrainTransform(112, pixels=True))
    for threads in (1, 2):
        with pytest.raises(ImageDecodeError, match="e_truncated.jpg"):
            batches(ds, batch_size=len(ds), shuffle=False, threads=threads)  # the bad file is in the last slice


def test_other_collates_and_transforms_keep_the_per_sample_path(celeba, monkeypatch):
    monkeypatch.setattr(batched, "fetch_batch", lambda *a, **k: pytest.fail("took the batched fetch"))
    from broadface.data import loader

    monkeypatch.setattr(loader, "fetch_batch", batched.fetch_batch)
    ds = FaceFolder(celeba[0], TrainTransform(112, pixels=True))
    batches(ds, collate_fn=per_sample)
    for tf in (TrainTransform(112, channels=1), TrainTransform(None), lambda img, generator=None: torch.zeros(1)):
        assert not batched.can_fetch_batch(FaceFolder(celeba[0], tf))
    with pytest.raises(pytest.fail.Exception, match="batched"):
        batches(ds)
    with pytest.raises(ValueError, match="threads"):
        make_loader(ds, 4, threads=0)
