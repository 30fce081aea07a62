import numpy as np
import pytest

from broadface.eval import plot_cmc, plot_learning_curves, plot_roc

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    same = rng.random(500) < 0.5
    scores = rng.normal(size=500) + same
    fpr = np.array([0.0, 1e-4, 1e-2, 1.0])
    paths = [
        plot_roc({"model A": {"scores": scores, "issame": same}, "model B": (fpr, np.array([0, 0.3, 0.8, 1.0]))},
                 tmp_path / "sub" / "roc.png"),
        plot_cmc({"A": {1: 0.8, 5: 0.9, 10: 0.95}}, tmp_path / "cmc.png"),
        plot_learning_curves({"loss": [(0, 5.0), (10, 3.0), (20, 2.0)], "recall@1": [(10, 0.2), (20, 0.4)],
                              "empty": []}, tmp_path / "curves.png", log_scale=["loss"]),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="no curves"):
        plot_roc({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="fpr, tpr"):
        plot_roc({"a": [1, 2, 3]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="step, value"):
        plot_learning_curves({"a": [1, 2, 3]}, tmp_path / "x.png")


def test_learning_curves_draw_a_mapping_of_lines_in_one_panel(tmp_path, monkeypatch):
    """``{panel: {label: points}}`` overlays the labelled lines on one axis (with a legend); plain lists stay
    one line per panel."""
    from broadface.eval import plots

    figs = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.append(fig), real(fig, path))[1])
    plot_learning_curves({"recall": {"ArcFace": [(0, 0.1), (10, 0.5)], "BroadFace": [(0, 0.1), (10, 0.6)]},
                          "loss": [(0, 3.0), (10, 2.0)]}, tmp_path / "c.png")
    recall, loss = figs[0].axes
    assert [line.get_label() for line in recall.lines] == ["ArcFace", "BroadFace"]
    assert list(recall.lines[1].get_ydata()) == [0.1, 0.6] and recall.get_legend() is not None
    assert len(loss.lines) == 1 and loss.get_legend() is None
    with pytest.raises(ValueError, match="'recall' / 'A'"):
        plot_learning_curves({"recall": {"A": [1, 2]}}, tmp_path / "x.png")
