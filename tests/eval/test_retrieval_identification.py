import numpy as np
import pytest

from broadface.data import EvalTransform, FaceFolder
from broadface.data.folder import list_classes, list_images
from broadface.eval import evaluate_identification, evaluate_retrieval, gallery_probe_split
from broadface.metrics import cmc, map_at_r, recall_at_k, tpir_at_fpir
from broadface.paths import data_root
from tests.helpers import reference_embeddings


def celeba(first: int, ids: int, per_id: int) -> FaceFolder:
    root = data_root() / "celeba299" / "aligned-112x112"
    classes = sorted(list_classes(root), key=int)[first:first + ids]
    samples = [(str(root / c / f), i) for i, c in enumerate(classes) for f in list_images(root / c)[:per_id]]
    return FaceFolder.from_samples(samples, classes, transform=EvalTransform(112))


@pytest.fixture(scope="module")
def faces():
    return celeba(150, 12, 5)


def test_retrieval_matches_metrics_on_reference_embeddings(faces, pixelnet):
    r = evaluate_retrieval(pixelnet, faces, batch_size=16)
    emb = reference_embeddings(pixelnet, [p for p, _ in faces.samples])
    labels = np.array(faces.targets)
    rec = recall_at_k(emb, labels)
    assert [r[f"recall@{k}"] for k in (1, 2, 4, 8)] == pytest.approx([rec[k] for k in (1, 2, 4, 8)], abs=0)
    assert r["map@r"] == pytest.approx(map_at_r(emb, labels), abs=1e-12)
    assert (r["queries"], r["identities"]) == (len(faces), 12)
    assert r["recall@1"] > 1 / 12  # better than chance


def test_gallery_probe_split():
    g, p = gallery_probe_split(["b", "a", "b", "c", "a", "b"], gallery_per_class=1)
    np.testing.assert_array_equal(g, [0, 1, 3])
    np.testing.assert_array_equal(p, [2, 4, 5])
    g, p = gallery_probe_split([3, 3, 3], gallery_per_class=2)
    np.testing.assert_array_equal(g, [0, 1])
    with pytest.raises(ValueError):
        gallery_probe_split([1], gallery_per_class=0)


def test_identification_closed_and_open_set(faces, pixelnet):
    r = evaluate_identification(pixelnet, faces, ranks=(1, 5))
    emb = reference_embeddings(pixelnet, [p for p, _ in faces.samples])
    labels = np.array(faces.classes)[faces.targets]
    g, p = gallery_probe_split(labels)
    assert r["cmc"] == pytest.approx(cmc(emb[p], labels[p], emb[g], labels[g], ranks=(1, 5)), abs=0)
    assert (r["gallery"], r["probes"], r["mated_probes"]) == (12, len(faces) - 12, len(faces) - 12)
    assert "tpir_at_fpir" not in r
    # separate probe set: identities 156-163, of which 162 and 163 are not in the gallery -> open set
    probes = celeba(156, 8, 3)
    distractors = celeba(200, 5, 2)
    r2 = evaluate_identification(pixelnet, faces, probes, distractors=distractors, fpirs=(0.1, 0.5))
    pemb = reference_embeddings(pixelnet, [p for p, _ in probes.samples])
    plabels = np.array(probes.classes)[probes.targets]
    demb = reference_embeddings(pixelnet, [p for p, _ in distractors.samples])
    mated = np.isin(plabels, labels)
    assert (r2["gallery"], r2["distractors"], r2["probes"]) == (len(faces), len(distractors), len(probes))
    assert r2["mated_probes"] == mated.sum() and 0 < mated.sum() < len(probes)
    ref = tpir_at_fpir(pemb, plabels, emb, labels, fpirs=(0.1, 0.5), distractors=demb)
    assert r2["cmc"] == pytest.approx(cmc(pemb[mated], plabels[mated], emb, labels, distractors=demb), abs=0)
    assert r2["tpir_at_fpir"] == pytest.approx(ref.to_dict(), abs=0)
