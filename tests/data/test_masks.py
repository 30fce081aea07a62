"""Synthetic face masks: determinism, lower-face coverage, eyes untouched, transform contract, grid CLI."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from broadface.data.masks import MASK_STYLES, MaskAugment, apply_mask, default_landmarks, render_mask
from broadface.data.masks_grid import STYLES, add_masks_parser

FACES = ["AJ_Cook/AJ_Cook_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0010.jpg", "Al_Gore/Al_Gore_0002.jpg"]


@pytest.fixture(scope="module")
def faces(request) -> list[np.ndarray]:
    root = request.getfixturevalue("root") / "lfw" / "aligned-112x112"
    return [np.asarray(Image.open(root / f).convert("RGB")) for f in FACES]


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=2)


def test_same_rng_same_mask_different_rng_different_mask(faces):
    img = faces[0]
    a = apply_mask(img, np.random.default_rng(7))
    b = apply_mask(img, np.random.default_rng(7))
    c = apply_mask(img, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_augment_is_deterministic_under_a_seed_and_per_sample(faces):
    runs = [[MaskAugment(prob=0.5, seed=3)(f) for f in faces * 4] for _ in range(2)]
    for x, y in zip(*runs):
        np.testing.assert_array_equal(x, y)
    aug = MaskAugment(prob=1.0, seed=3)
    forward = [aug(f, rng=aug.rng_for(i, epoch=2)) for i, f in enumerate(faces)]
    backward = [aug(f, rng=aug.rng_for(i, epoch=2)) for i, f in reversed(list(enumerate(faces)))][::-1]
    for x, y in zip(forward, backward):
        np.testing.assert_array_equal(x, y)  # a sample's mask depends only on (seed, epoch, index)
    assert not np.array_equal(aug(faces[0], rng=aug.rng_for(0, epoch=0)), forward[0])


@pytest.mark.parametrize("style", MASK_STYLES)
@pytest.mark.parametrize("size", [112, 224])
def test_masks_cover_nose_and_mouth(style, size):
    lm = default_landmarks(size, size)
    nose, mouth_l, mouth_r = lm[2], lm[3], lm[4]
    s = size / 112
    for seed in range(15):
        _, alpha = render_mask((size, size), np.random.default_rng(seed), style=style)
        for x, y in (nose, mouth_l, mouth_r, (mouth_l + mouth_r) / 2, nose + (0, 8 * s)):
            assert alpha[int(round(y)), int(round(x))] > 0.99, (style, seed, x, y)
        lower = alpha[int(68 * s):int(104 * s), int(34 * s):int(78 * s)]  # nose tip to below the lips
        assert (lower > 0.95).mean() > 0.97


@pytest.mark.parametrize("style", MASK_STYLES)
def test_eyes_and_forehead_untouched(faces, style):
    for seed in range(12):
        for img in faces:
            ch = _changed(apply_mask(img, np.random.default_rng(seed), style=style), img)
            assert not ch[:50].any(), "rows above the eye line changed"
            for ex, ey in default_landmarks(112, 112)[:2]:  # 20 x 12 box round each eye
                assert not ch[int(ey) - 8:int(ey) + 4, int(ex) - 10:int(ex) + 10].any()
            assert ch[60:112].mean() > 0.5  # and the lower face really is masked


def test_prob_zero_is_identity_and_prob_one_always_masks(faces):
    off, on = MaskAugment(prob=0.0), MaskAugment(prob=1.0, seed=1)
    pil = Image.fromarray(faces[1])
    for img in faces:
        assert off(img) is img
        assert _changed(on(img), img).mean() > 0.2
    assert off(pil) is pil
    out = on(pil)
    assert isinstance(out, Image.Image) and out.size == pil.size and out.mode == "RGB"


def test_input_is_not_modified_and_bad_inputs_raise(faces):
    img = faces[2].copy()
    out = apply_mask(img, np.random.default_rng(0))
    np.testing.assert_array_equal(img, faces[2])
    assert out.dtype == np.uint8 and out.shape == img.shape
    with pytest.raises(ValueError, match="uint8"):
        apply_mask(img.astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="style"):
        apply_mask(img, np.random.default_rng(0), style="balaclava")
    with pytest.raises(ValueError, match="prob"):
        MaskAugment(prob=1.5)
    with pytest.raises(ValueError, match="landmarks"):
        apply_mask(img, np.random.default_rng(0), landmarks=np.zeros((3, 2)))


def test_mask_follows_given_landmarks_on_a_raw_photo(root):
    lfw = root / "lfw"
    rel = "AJ_Cook/AJ_Cook_0001.jpg"
    with open(lfw / "landmarks_mtcnn5.tsv") as f:
        row = next(r for r in csv.DictReader(f, delimiter="\t") if r["path"] == rel)
    lm = np.array([float(row[k]) for k in ("lex", "ley", "rex", "rey", "nx", "ny", "mlx", "mly", "mrx", "mry")],
                  np.float32).reshape(5, 2)
    raw = np.asarray(Image.open(lfw / "raw-sample" / rel).convert("RGB"))
    _, alpha = render_mask(raw.shape[:2], np.random.default_rng(0), landmarks=lm, style="surgical")
    for x, y in lm[2:]:
        assert alpha[int(y), int(x)] > 0.99
    assert alpha[:int(lm[:2, 1].min()) - 2].max() == 0  # nothing above the eyes of the raw photo
    assert alpha[:, :60].max() == 0 and alpha[:, 200:].max() == 0  # nor far to the sides of a 90-px-wide face


def test_grid_command_writes_a_contact_sheet(root, tmp_path: Path):
    parser = argparse.ArgumentParser()
    add_masks_parser(parser.add_subparsers())
    out = tmp_path / "grid.png"
    args = parser.parse_args(["masks", "--grid", str(out), "--n", "6", "--cols", "3", "--scale", "1",
                              "--data-root", str(root)])
    assert args.func(args) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (2 * 112 + 2, 3 * 112 + 4, 3)
    assert STYLES == MASK_STYLES
    args = parser.parse_args(["masks", "--grid", str(out), "--faces", str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="nope"):
        args.func(args)
