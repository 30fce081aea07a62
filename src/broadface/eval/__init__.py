"""Evaluation suites: run a model on a benchmark protocol and return a plain dict.

* :mod:`.verification` — LFW ``pairs.txt`` / insightface ``.bin``, 10-fold accuracy, VAL@FAR;
* :mod:`.templates` — IJB-B/C template 1:1 verification, TAR@FAR;
* :mod:`.identification` — CMC, TPIR@FPIR;  :mod:`.retrieval` — Recall@K, MAP@R;
* :mod:`.plots` — ROC / CMC / learning-curve PNGs.
"""
from broadface.eval.identification import evaluate_identification, gallery_probe_split
from broadface.eval.plots import plot_cmc, plot_learning_curves, plot_roc
from broadface.eval.retrieval import evaluate_retrieval
from broadface.eval.templates import evaluate_templates, read_ijb_meta
from broadface.eval.verification import PairSet, bin_pair_set, evaluate_pairs, lfw_pair_set

__all__ = ["evaluate_pairs", "lfw_pair_set", "bin_pair_set", "PairSet", "evaluate_templates", "read_ijb_meta",
           "evaluate_identification", "gallery_probe_split", "evaluate_retrieval", "plot_roc", "plot_cmc",
           "plot_learning_curves"]
