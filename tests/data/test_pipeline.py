"""The one image pipeline: resize and normalisation against independent references, and every consumer
(training transforms, evaluation images, the CLI's file reader, the teacher cache view) agreeing with it."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from broadface.data.folder import FaceFolder
from broadface.data.images import decode_image, read_rgb
from broadface.data.pipeline import (Preprocessing, load_images, normalize, normalize_batch, pixels_chw, resize,
                                     resize_batch)
from broadface.data.seeding import generator_for
from broadface.data.transforms import EvalTransform, TrainTransform
from broadface.eval.images import EvalImages
from tests.helpers import reference_input


@pytest.fixture(scope="module")
def face_file(root):
    return root / "lfw" / "aligned-112x112" / "Al_Gore" / "Al_Gore_0001.jpg"


@pytest.fixture(scope="module")
def raw_file(root):  # a 250 x 250 photo: every size below is a real downscale
    return sorted((root / "lfw" / "raw-sample" / "AJ_Cook").iterdir())[0]


def test_resize_fixed_values_are_antialiased_bilinear():
    """[0, 0, 255, 255] halved: the triangle filter widened by the scale factor covers 3 input pixels,
    weights (.75, .75, .25) / 1.75 -> 255 * .25 / 1.75 = 36.4 and 255 * 1.5 / 1.75 = 218.6.
    Nearest neighbour and OpenCV's INTER_LINEAR (no antialiasing) both give [0, 255]."""
    img = Image.fromarray(np.array([[0, 0, 255, 255]] * 4, np.uint8))
    out = np.asarray(resize(img, 2))
    np.testing.assert_array_equal(out, [[36, 219], [36, 219]])
    np.testing.assert_array_equal(np.asarray(resize(img.transpose(Image.TRANSPOSE), 2)), [[36, 36], [219, 219]])
    assert resize(img, (4, 4)) is img  # already that size: untouched


@pytest.mark.parametrize("size", [112, 56, 28])
def test_prepared_input_equals_an_independent_reference(raw_file, size):
    """Pillow's antialiased bilinear resize and (x/255 - 0.5)/0.5, written out in tests/helpers.py."""
    x = Preprocessing(size)(read_rgb(raw_file))
    ref = reference_input(raw_file, size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
    # the reference is not blind to the resize: the non-antialiased OpenCV resize (the old evaluation
    # path) and nearest neighbour are far from it
    arr = read_rgb(raw_file)
    for interp in (cv2.INTER_LINEAR, cv2.INTER_NEAREST):
        other = torch.from_numpy(cv2.resize(arr, (size, size), interpolation=interp).transpose(2, 0, 1) / 127.5 - 1)
        assert (other.float() - ref).abs().max() > 0.1


@pytest.mark.parametrize("size", [112, 56, 28])
def test_training_and_evaluation_preprocessing_agree(face_file, tmp_path, size):
    """Every route an image takes into a model gives the same tensor, bit for bit."""
    pil = decode_image(face_file)
    train = TrainTransform(size, flip_p=0.0)(pil, generator=generator_for(0))
    routes = {
        "eval transform": EvalTransform(size)(pil),
        "training transform (mask_prob=0, no flip)": train,
        "preprocessing on the array": Preprocessing(size)(read_rgb(face_file)),
        "evaluation images (file)": EvalImages([face_file], size)[0][0],
        "evaluation images (bytes)": EvalImages([face_file.read_bytes()], size)[0][0],
        "load_images": load_images([face_file], Preprocessing(size))[0],
        "dataset item": FaceFolder.from_samples([(face_file, 0)], transform=EvalTransform(size))[0][0],
    }
    from broadface.cli._inference import _PathDataset
    from broadface.train.teacher_cache import _TeacherView

    routes["CLI file reader"] = _PathDataset([face_file], Preprocessing(size))[0][0]
    routes["distillation teacher cache"] = _TeacherView([FaceFolder.from_samples([(face_file, 0)])],
                                                        Preprocessing(size))[0]
    for name, x in routes.items():
        assert torch.equal(x, train), name
    # and a flipped training view is exactly the mirrored image
    flipped = TrainTransform(size, flip_p=1.0)(pil, generator=generator_for(0))
    assert torch.equal(flipped, train.flip(-1))


def test_normalisation_values_mean_std_and_channel_order():
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30  # R, G, B
    default = Preprocessing(2)(img)
    np.testing.assert_allclose(default[:, 0, 0], [10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1], rtol=1e-6)
    assert Preprocessing(2)(np.zeros((2, 2, 3), np.uint8)).eq(-1).all()
    assert Preprocessing(2)(np.full((2, 2, 3), 255, np.uint8)).eq(1).all()
    bgr = Preprocessing(2, mean=(1, 2, 3), std=(2, 4, 6), bgr=True)(img)  # mean/std in the model's (B, G, R) order
    np.testing.assert_allclose(bgr[:, 0, 0], [(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 6], rtol=1e-6)
    gray = normalize(Image.fromarray(img).convert("L"))
    assert gray.shape == (1, 2, 2)


def test_batch_normalisation_of_pixels_equals_the_per_image_path_bit_for_bit(raw_file):
    rgb = read_rgb(raw_file)
    images = [rgb, rgb[::-1].copy(), np.full_like(rgb, 255), np.zeros_like(rgb)]
    pixels = torch.stack([pixels_chw(a) for a in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, *rgb.shape[:2])
    assert torch.equal(pixels[0], torch.from_numpy(rgb).permute(2, 0, 1))
    for mean, std in (((127.5,) * 3, (127.5,) * 3), ((123.7, 116.3, 103.5), (58.4, 57.1, 57.4))):
        want = torch.stack([normalize(a, mean, std) for a in images])
        got = normalize_batch(pixels, mean, std)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    assert torch.equal(normalize_batch(pixels_chw(gray)[None]), normalize(gray)[None])
    with pytest.raises(ValueError, match="uint8 batch"):
        normalize_batch(pixels.float())
    with pytest.raises(ValueError, match="uint8 batch"):
        normalize_batch(pixels[0])


def test_batch_normalizer_builds_its_constants_once_per_device_and_channels(monkeypatch):
    """A step's normaliser keeps its constants (on a GPU each build is a synchronising host-to-device copy)."""
    from broadface.data import pipeline

    built = []
    real = pipeline._batch_constants
    monkeypatch.setattr(pipeline, "_batch_constants", lambda *a: built.append(a[2:]) or real(*a))
    norm = pipeline.BatchNormalizer()
    rgb, gray = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8), torch.zeros((2, 1, 4, 4), dtype=torch.uint8)
    out = [(norm(rgb), norm(gray)) for _ in range(3)]
    assert built == [(3, torch.device("cpu")), (1, torch.device("cpu"))]
    for a, b in out:
        assert torch.equal(a, normalize_batch(rgb)) and torch.equal(b, normalize_batch(gray))


def test_preprocessing_validates_and_describes():
    pre = Preprocessing(112)
    assert pre.size == (112, 112) and pre.describe() == "112x112 RGB, (x - 127.5) / 127.5"
    assert Preprocessing((112, 96), mean=(0, 0, 0), std=255, bgr=True).describe() == "112x96 BGR, (x - 0) / 255"
    assert Preprocessing(112, mean=(123.7, 116.3, 103.5)).describe().endswith("(x - (123.7, 116.3, 103.5)) / 127.5")
    with pytest.raises(ValueError, match="std must be positive"):
        Preprocessing(112, std=0)
    with pytest.raises(ValueError, match="one number or three"):
        Preprocessing(112, mean=(1, 2))
    with pytest.raises(ValueError, match="image size"):
        Preprocessing(0)
    with pytest.raises(ValueError, match="square"):
        _ = Preprocessing((112, 96)).side
    with pytest.raises(ValueError, match="uint8"):
        pre(np.zeros((4, 4, 3), np.float32))


def test_resize_batch_goes_through_the_pipeline(face_file):
    """A student batch at 56 re-prepared for a 28-px BGR teacher equals the pipeline on the 56-px pixels."""
    student = Preprocessing(56)
    teacher = Preprocessing(28, mean=(0, 0, 0), std=(255, 255, 255), bgr=True)
    batch = torch.stack([student(read_rgb(face_file))])
    assert resize_batch(batch, student, student) is batch
    pixels = np.asarray(resize(decode_image(face_file), 56))
    assert torch.equal(resize_batch(batch, student, teacher)[0], teacher(pixels))


def test_exif_orientation_is_applied(face_file):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view) decodes upright."""
    upright = decode_image(face_file)
    stored = upright.transpose(Image.ROTATE_90)  # what a camera writes before tagging orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif.tobytes())
    decoded = decode_image(buf.getvalue())
    assert decoded.size == upright.size
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))  # PNG: lossless, so exact
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), np.asarray(upright))


def test_load_images_errors_name_the_file(face_file, tmp_path):
    batch = load_images([face_file, face_file.read_bytes()], Preprocessing(56))
    assert batch.shape == (2, 3, 56, 56) and torch.equal(batch[0], batch[1])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_images([bad])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_images([tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="no paths"):
        load_images([])


@pytest.mark.parametrize("mean,std", [((127.5,) * 3, (127.5,) * 3), ((0.0,) * 3, (255.0,) * 3),
                                      ((123.7, 116.3, 103.5), (58.4, 57.1, 57.4))])
def test_batch_normalizer_on_the_cpu_is_one_table_pass_with_the_same_bits(monkeypatch, mean, std):
    """Channels sharing mean and std: one cv2.LUT pass; the floats of ``x / std − mean / std`` in float32
    for every uint8 value, recomputed here in NumPy. Per-channel values (no shared table) and a
    non-contiguous batch take the arithmetic path, with the same result."""
    from broadface.data import pipeline

    calls = []
    real = pipeline.cv2.LUT
    monkeypatch.setattr(pipeline.cv2, "LUT", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g)
    pixels[0] = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)  # every value in every channel
    x, s = pixels.numpy().astype(np.float32), np.float32(std).reshape(1, 3, 1, 1)
    want = torch.from_numpy(x / s - np.float32(mean).reshape(1, 3, 1, 1) / s)
    norm = pipeline.BatchNormalizer(mean, std)
    got = norm(pixels)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert len(calls) == (1 if len(set(std)) == 1 and len(set(mean)) == 1 else 0)
    strided = pixels.transpose(2, 3)
    assert not strided.is_contiguous() and torch.equal(norm(strided), want.transpose(2, 3))
