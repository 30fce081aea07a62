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
