import shutil

import numpy as np
import pytest

from broadface.eval.templates import evaluate_templates, read_ijb_meta, template_features
from broadface.data.images import read_rgb
from tests.helpers import reference_features
from bench.reference import insightface_tar_at_far, insightface_templates

FARS = (1e-2, 1e-1, 0.3)


def build_aligned_ijb(root, lfw_root, people=("Colin_Powell", "Tony_Blair", "Donald_Rumsfeld", "Gerhard_Schroeder",
                                               "Ariel_Sharon", "Jean_Chretien")):
    """IJB-style meta over real aligned LFW faces: per person two templates of two images; the first
    template's images share a media id (a 'video', averaged), the second's do not."""
    (root / "meta").mkdir(parents=True)
    (root / "images").mkdir()
    lines, tid, mid = [], 0, 0
    owner = {}
    for person in people:
        files = sorted((lfw_root / "aligned-112x112" / person).iterdir())[:4]
        for t, group in enumerate((files[:2], files[2:])):
            for k, f in enumerate(group):
                shutil.copy(f, root / "images" / f.name)
                lines.append(f"{f.name} {tid} {mid if t == 0 else mid + 1 + k}")
            owner[tid] = person
            tid += 1
            mid += 3
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(lines) + "\n")
    pairs = [f"{a} {b} {int(owner[a] == owner[b])}" for a in owner for b in owner if a < b]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")


def test_aligned_templates_match_insightface(tmp_path, lfw_root, pixelnet):
    build_aligned_ijb(tmp_path, lfw_root)
    r = evaluate_templates(pixelnet, tmp_path, "IJBC", fars=FARS, batch_size=7)
    meta = read_ijb_meta(tmp_path, "IJBC")
    assert (r["images"], r["templates"], r["pairs"]) == (24, 12, 66) and r["detector_score"] is False
    feats = reference_features(pixelnet, [read_rgb(p) for p in meta.images])  # N1: norms kept
    tfeat, tids = insightface_templates(feats, meta.templates, meta.medias)
    pos = {t: i for i, t in enumerate(tids)}
    ref = np.array([tfeat[pos[a]] @ tfeat[pos[b]] for a, b in meta.pairs])
    np.testing.assert_allclose(r["scores"], ref, atol=1e-12)
    np.testing.assert_array_equal(list(r["tar_at_far"].values()), insightface_tar_at_far(ref, meta.labels, FARS))
    assert r["auc"] > 0.5


def test_template_aggregation_rules():
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    templates, medias = np.array([7, 7, 7, 9]), np.array([1, 1, 2, 4])
    ours, ids = template_features(feats, templates, medias)
    # template 7: media 1 -> mean (2, 0); media 2 -> (0, 2); sum (2, 2) -> normalised
    np.testing.assert_allclose(ours, [[2 ** -0.5, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5]])
    np.testing.assert_array_equal(ids, [7, 9])
    ref, _ = insightface_templates(feats, templates, medias)
    np.testing.assert_allclose(ours, ref)


def test_loose_crops_with_landmarks_and_faceness(tmp_path, lfw_root, pixelnet):
    """Raw 250x250 LFW photos + their 5 landmarks: aligned like the shipped crops, faceness weights used."""
    people = ["Colin_Powell", "Tony_Blair", "Donald_Rumsfeld", "Gerhard_Schroeder"]
    marks = {}
    for line in (lfw_root / "landmarks_mtcnn5.tsv").read_text().splitlines()[1:]:
        f = line.split("\t")
        marks[f[0]] = [float(v) for v in f[2:12]]
    (tmp_path / "meta").mkdir()
    (tmp_path / "loose_crop").mkdir()
    rng = np.random.default_rng(0)
    tid_lines, pts_lines, owner = [], [], {}
    for person in people:  # templates: [photo 1] and [photo 2, photo 3] (two media: faceness weights matter)
        files = sorted((lfw_root / "raw-sample" / person).iterdir())[:3]
        for k, f in enumerate(files):
            shutil.copy(f, tmp_path / "loose_crop" / f.name)
            tid = 2 * people.index(person) + (k > 0)
            owner[tid] = person
            tid_lines.append(f"{f.name} {tid} {len(tid_lines)}")
            pts = " ".join(f"{v:.1f}" for v in marks[f"{person}/{f.name}"])
            pts_lines.append(f"{f.name} {pts} {rng.uniform(0.3, 1.0):.4f}")
    (tmp_path / "meta" / "ijbb_face_tid_mid.txt").write_text("\n".join(tid_lines))
    (tmp_path / "meta" / "ijbb_name_5pts_score.txt").write_text("\n".join(pts_lines))
    pairs = [f"{a} {b} {int(owner[a] == owner[b])}" for a in owner for b in owner if a < b]
    (tmp_path / "meta" / "ijbb_template_pair_label.txt").write_text("\n".join(pairs))

    meta = read_ijb_meta(tmp_path, "IJBB")
    from broadface.eval.ijb import _align

    for i in (0, 4):
        crop = _align(read_rgb(meta.images[i]), i, meta.landmarks, 112)
        shipped = read_rgb(lfw_root / "aligned-112x112" / owner[meta.templates[i]] / meta.images[i].name)
        assert np.abs(crop.astype(int) - shipped.astype(int)).mean() < 3  # ~1.3 measured; a centre crop is ~25

    r = evaluate_templates(pixelnet, tmp_path, "IJBB", fars=FARS)
    assert r["detector_score"] and r["pairs"] == 28
    feats = reference_features(pixelnet, [_align(read_rgb(p), i, meta.landmarks, 112)
                                          for i, p in enumerate(meta.images)]) * meta.faceness[:, None]
    tfeat, tids = insightface_templates(feats, meta.templates, meta.medias)
    ref = np.array([tfeat[a] @ tfeat[b] for a, b in meta.pairs])  # template ids are 0..7
    np.testing.assert_allclose(r["scores"], ref, atol=1e-12)
    unweighted = evaluate_templates(pixelnet, tmp_path, "IJBB", fars=FARS, detector_score=False, norm_score=False)
    assert not np.allclose(unweighted["scores"], r["scores"])


def test_meta_errors(tmp_path, lfw_root):
    build_aligned_ijb(tmp_path, lfw_root, people=("Colin_Powell", "Tony_Blair"))
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid.txt"):
        read_ijb_meta(tmp_path, "IJBB")
    pair_file = tmp_path / "meta" / "ijbc_template_pair_label.txt"
    pair_file.write_text("0 99 1\n")
    with pytest.raises(ValueError, match="not in ijbc_face_tid_mid.txt"):
        read_ijb_meta(tmp_path, "IJBC")
    pair_file.write_text("0 1 2\n")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        read_ijb_meta(tmp_path, "IJBC")
    (tmp_path / "meta" / "ijbc_face_tid_mid.txt").write_text("a.jpg 1\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid.txt:1: expected 3 columns"):
        read_ijb_meta(tmp_path, "IJBC")
