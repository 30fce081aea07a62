import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from broadface.data import EvalTransform, FaceTransform, TrainTransform, flip
from broadface.data.seeding import generator_for


@pytest.fixture
def face(lfw_dir):
    return Image.open(lfw_dir / "Al_Gore" / "Al_Gore_0001.jpg").convert("RGB")


def test_eval_normalisation_exact(face):
    x = EvalTransform(112)(face)
    ref = (np.asarray(face, dtype=np.float32) / 255 - 0.5) / 0.5
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("size", [112, 56, 28, (64, 48)])
def test_resize_shapes(face, size):
    h, w = (size, size) if isinstance(size, int) else size
    assert EvalTransform(size)(face).shape == (3, h, w)
    assert TrainTransform(size, channels=1)(face, generator=generator_for(0)).shape == (1, h, w)
    small = EvalTransform(28)(face)
    ref = np.asarray(face.resize((28, 28), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(small, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6)


def test_flip_is_seeded_and_exact(face):
    t = TrainTransform(56)
    plain = EvalTransform(56)(face)
    outs = [t(face, generator=generator_for("s", i)) for i in range(200)]
    flipped = [bool(torch.equal(o, flip(plain))) for o in outs]
    assert all(torch.equal(o, plain) or f for o, f in zip(outs, flipped))
    assert 60 < sum(flipped) < 140  # p=0.5 over 200 independent seeds
    again = [t(face, generator=generator_for("s", i)) for i in range(200)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))


def test_eval_never_touches_global_rng(face):
    state = torch.get_rng_state()
    EvalTransform(112)(face)
    FaceTransform(112, flip_p=0.0)(face)
    assert torch.equal(state, torch.get_rng_state())


def test_picklable_and_validated(face):
    t = TrainTransform(28, flip_p=0.3)
    t2 = pickle.loads(pickle.dumps(t))
    assert t2 == t and torch.equal(t2(face, generator=generator_for(1)), t(face, generator=generator_for(1)))
    with pytest.raises(ValueError, match="never flips"):
        EvalTransform(112, flip_p=0.5)
    with pytest.raises(ValueError, match="flip_p"):
        TrainTransform(112, flip_p=2.0)
    with pytest.raises(ValueError, match="channels"):
        FaceTransform(112, channels=2)


@pytest.mark.parametrize("kw", [dict(size=28, flip_p=0.5), dict(size=56, flip_p=0.5, mask_prob=0.5),
                                dict(size=28, channels=1)])
def test_pixels_are_the_same_view_before_normalisation(face, kw):
    """FaceTransform(pixels=True) makes the same random choices and hands out the uint8 view that
    normalises (a batch at a time) to the float view, bit for bit."""
    from broadface.data.pipeline import normalize_batch

    for i in range(12):
        floats = FaceTransform(**kw)(face, generator=generator_for("p", i))
        pixels = FaceTransform(**kw, pixels=True)(face, generator=generator_for("p", i))
        assert pixels.dtype == torch.uint8 and pixels.shape == floats.shape
        assert torch.equal(normalize_batch(pixels[None])[0], floats)


def test_flip_helper_batches():
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(flip(x)[0, 1, 2], torch.tensor([23.0, 22.0, 21.0, 20.0]))
    assert torch.equal(flip(flip(x)), x)


@pytest.mark.parametrize("kw", [dict(size=112, flip_p=0.5), dict(size=112, flip_p=0.5, pixels=True),
                                dict(size=None, flip_p=1.0, pixels=True), dict(size=56, flip_p=0.5),
                                dict(size=112, channels=1, pixels=True)])
def test_an_array_gives_the_pil_images_tensor(face, kw):
    """The loader's decoded array (flipped and converted without Pillow when it already has the size and
    mode) gives the tensor of the PIL image, with the same random choices."""
    arr = np.asarray(face)
    flips = 0
    for i in range(12):
        from_array = FaceTransform(**kw)(arr.copy(), generator=generator_for("a", i))
        from_pil = FaceTransform(**kw)(face, generator=generator_for("a", i))
        assert from_array.dtype == from_pil.dtype and torch.equal(from_array, from_pil)
        flips += FaceTransform(**kw).draw(generator_for("a", i))[1]
    assert 0 < flips or "flip_p" not in kw  # the flipped branch ran
