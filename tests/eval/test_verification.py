import numpy as np
import pytest

from broadface.data.binfile import lfw_bin_images, write_bin
from broadface.data.pairs import read_lfw_pairs
from broadface.eval.verification import bin_pair_set, evaluate_pairs, lfw_pair_set
from tests.helpers import reference_embeddings, reference_features
from bench.reference import insightface_kfold


@pytest.fixture(scope="module")
def lfw(lfw_root):
    return lfw_pair_set(lfw_root / "pairs.txt", lfw_root / "aligned-112x112")


def test_lfw_pair_set_layout(lfw):
    assert len(lfw) == 6000 and len(lfw.sources) == 7701
    assert lfw.issame[:300].all() and not lfw.issame[300:600].any()
    sub = lfw.subset(100)
    assert len(sub) == 100 and sub.issame.sum() == 50  # evenly spaced keeps the 50/50 mix


def test_evaluate_pairs_matches_insightface_pipeline(lfw, pixelnet):
    sub = lfw.subset(120)
    r = evaluate_pairs(pixelnet, sub, batch_size=50)
    # insightface: embeddings of image 2k and 2k+1, flip-summed, sklearn-normalised, squared L2, evaluate()
    paths = [p for k in range(len(sub)) for p in (sub.sources[sub.left[k]], sub.sources[sub.right[k]])]
    emb = reference_embeddings(pixelnet, paths)
    dist = np.sum((emb[0::2] - emb[1::2]) ** 2, 1)
    ref = insightface_kfold(dist, sub.issame)
    assert r["accuracy"] == ref["accuracy"] and r["accuracy_std"] == ref["accuracy_std"]
    assert (r["val"], r["val_std"], r["far"]) == (ref["val"], ref["val_std"], ref["far"])
    np.testing.assert_array_equal(r["distance_thresholds"], ref["thresholds"])
    np.testing.assert_allclose(r["scores"], 1 - dist / 2, atol=1e-12)
    assert 0.55 < r["accuracy"] < 0.95  # pooled pixels carry some identity signal, far from perfect
    assert r["cosine_threshold"] == 1 - r["distance_threshold"] / 2


def test_bin_route_equals_folder_route(lfw, lfw_root, pixelnet, tmp_path):
    keep = np.unique(np.linspace(0, 5999, 40).round().astype(int))
    all_pairs = read_lfw_pairs(lfw_root / "pairs.txt")
    pairs = [all_pairs[i] for i in keep]
    images, issame = lfw_bin_images(pairs, lfw_root / "aligned-112x112")
    write_bin(tmp_path / "lfw40.bin", images, issame)
    from_bin = evaluate_pairs(pixelnet, bin_pair_set(tmp_path / "lfw40.bin"), folds=5)
    from_folder = evaluate_pairs(pixelnet, lfw.subset(40), folds=5)
    assert from_bin["name"] == "lfw40" and from_bin["images"] == 80 and from_folder["images"] <= 80
    np.testing.assert_array_equal(from_bin["scores"], from_folder["scores"])
    assert from_bin["accuracy"] == from_folder["accuracy"]


def test_mask_hook_alters_second_images_only(lfw, pixelnet):
    sub = lfw.subset(30)

    def black_lower_half(img, rng):
        out = img.copy()
        out[img.shape[0] // 2:] = 0
        return out

    r = evaluate_pairs(pixelnet, sub, folds=3, image_hook=black_lower_half)
    from broadface.data.images import read_rgb
    from sklearn.preprocessing import normalize

    left = reference_embeddings(pixelnet, [sub.sources[i] for i in sub.left])
    right = normalize(reference_features(pixelnet, [black_lower_half(read_rgb(sub.sources[i]), None)
                                                    for i in sub.right]))
    np.testing.assert_allclose(r["scores"], np.sum(left * right, 1), atol=1e-12)
    assert r["masked_second_image"]


def test_real_mask_is_reproducible(lfw, pixelnet):
    from broadface.data.masks import apply_mask

    sub = lfw.subset(20)
    a = evaluate_pairs(pixelnet, sub, folds=2, image_hook=apply_mask)
    b = evaluate_pairs(pixelnet, sub, folds=2, image_hook=apply_mask)
    plain = evaluate_pairs(pixelnet, sub, folds=2)
    np.testing.assert_array_equal(a["scores"], b["scores"])
    assert not np.allclose(a["scores"], plain["scores"])


def test_errors(lfw_root, tmp_path, pixelnet, lfw):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lfw_pair_set(lfw_root / "pairs.txt", tmp_path / "nowhere")
    (tmp_path / "Someone").mkdir()
    with pytest.raises(FileNotFoundError, match="missing under"):
        lfw_pair_set(lfw_root / "pairs.txt", tmp_path)
    bad = tmp_path / "pairs.txt"
    bad.write_text("1 1\nA 1 2\nB 1\n")
    with pytest.raises(ValueError, match="pairs.txt:3"):
        lfw_pair_set(bad, lfw_root / "aligned-112x112")
    with pytest.raises(ValueError, match="cannot fill 10 folds"):
        evaluate_pairs(pixelnet, lfw.subset(4))
