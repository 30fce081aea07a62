"""IJB 1:N on a synthetic IJB-style meta set built from real LFW faces, against independent references:
insightface's ``ijb_1n.py`` (galleries G1 + G2 together) re-implemented loop by loop, and the NIST open-set
definitions per gallery written out probe by probe."""
from __future__ import annotations

import numpy as np
import pytest

from bench.reference import insightface_1n, insightface_templates
from broadface.eval.ijb import read_ijb_meta
from broadface.eval.ijb_search import evaluate_templates_1n
from tests.helpers import build_ijb_1n, reference_features

FPIRS = (1e-2, 1e-1, 0.3)


def _nist_reference(p, ps, g, gs, fpirs):
    """Open-set search written out: rank of each mated probe's mate, and TPIR at the lowest threshold
    letting at most floor(f * non-mated) non-mated probes' best scores above it."""
    sims = p @ g.T
    mated = [i for i in range(len(ps)) if ps[i] in set(gs)]
    ranks = []
    for i in mated:
        order = sorted(range(len(gs)), key=lambda j: -sims[i, j])
        ranks.append(next(r for r, j in enumerate(order, 1) if gs[j] == ps[i]))
    cmc = {k: sum(r <= k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    non = sorted((max(sims[i]) for i in range(len(ps)) if i not in mated), reverse=True)
    tpir = []
    for f in fpirs:
        allowed = int(np.floor(f * len(non) + 1e-12))
        thr = non[allowed] if allowed < len(non) else -np.inf
        hits = [i for i in mated if gs[int(np.argmax(sims[i]))] == ps[i] and max(sims[i]) > thr]
        tpir.append(len(hits) / len(mated))
    return cmc, tpir


def test_1n_matches_insightface_and_the_open_set_definitions(tmp_path, lfw_dir, pixelnet):
    build_ijb_1n(tmp_path, lfw_dir)
    r = evaluate_templates_1n(pixelnet, tmp_path, "IJBC", fpirs=FPIRS, batch_size=16)
    meta = read_ijb_meta(tmp_path, "IJBC")
    assert meta.pairs is None and r["probe_templates"] == 24 and r["images"] == 84
    feats = reference_features(pixelnet, meta.images)  # F2, N1; no faceness file, so no D1
    tfeat, tids = insightface_templates(feats, meta.templates, meta.medias)
    by_id = {t: tfeat[i] for i, t in enumerate(tids)}
    (g1t, g1s), (g2t, g2s), (pt, ps) = (meta.search[k] for k in ("G1", "G2", "probe"))
    g1, g2, p = (np.stack([by_id[t] for t in ts]) for ts in (g1t, g2t, pt))

    both_s = np.concatenate([g1s, g2s])
    ref = insightface_1n(p, np.concatenate([g1, g2]), [int(np.flatnonzero(both_s == s)[0]) for s in ps], FPIRS)
    both = r["searches"]["G1+G2"]
    assert both["mated_probes"] == 24 and both["gallery"] == 12 and both["fpir_rule"] == "insightface"
    assert [both[f"rank{k}"] for k in (1, 5, 10)] == pytest.approx([ref[f"rank{k}"] for k in (1, 5, 10)], abs=0)
    assert list(both["tpir_at_fpir"].values()) == pytest.approx(ref["tpir"], abs=0)

    for name, g, gs in (("G1", g1, g1s), ("G2", g2, g2s)):
        cmc, tpir = _nist_reference(p, ps, g, gs, FPIRS)
        got = r["searches"][name]
        assert got["mated_probes"] == 12 and got["probes"] == 24 and got["fpir_rule"] == "nist", name
        assert got["cmc"] == pytest.approx(cmc, abs=0), name
        assert list(got["tpir_at_fpir"].values()) == pytest.approx(tpir, abs=0), name
    # the galleries are really searched separately: G1 alone ranks differently from G1 + G2
    assert r["searches"]["G1"]["cmc"] != both["cmc"] or r["searches"]["G2"]["cmc"] != both["cmc"]
    assert 1 / 12 < both["rank1"] < 1  # pooled pixels: some identity signal, far from perfect


def test_1n_meta_errors(tmp_path, lfw_dir):
    build_ijb_1n(tmp_path, lfw_dir, subjects=4)
    g2 = tmp_path / "meta" / "ijbc_1N_gallery_G2.csv"
    text = g2.read_text()
    g2.write_text(text + "99999,5,x.jpg\n")
    with pytest.raises(ValueError, match="ijbc_1N_gallery_G2.csv: 1 template id.*not in ijbc_face_tid_mid.txt"):
        read_ijb_meta(tmp_path, "IJBC")
    first = text.splitlines()[1].split(",")
    g2.write_text(text + f"{first[0]},777,{first[2]}\n")
    with pytest.raises(ValueError, match="two different subject ids"):
        read_ijb_meta(tmp_path, "IJBC")
    g2.unlink()
    with pytest.raises(FileNotFoundError, match="ijbc_1N_gallery_G2.csv"):
        read_ijb_meta(tmp_path, "IJBC")
    (tmp_path / "meta" / "ijbc_1N_gallery_G1.csv").unlink()
    (tmp_path / "meta" / "ijbc_1N_probe_mixed.csv").unlink()
    with pytest.raises(FileNotFoundError, match="neither ijbc_template_pair_label.txt"):
        read_ijb_meta(tmp_path, "IJBC")
