"""Evaluation suites: run a model on a benchmark protocol and return a plain dict.

* :mod:`.verification` — LFW ``pairs.txt`` / insightface ``.bin``, 10-fold accuracy, VAL@FAR;
* :mod:`.ijb` — IJB-B/C meta files and template features; :mod:`.templates` — 1:1 TAR@FAR;
  :mod:`.ijb_search` — 1:N CMC and TPIR@FPIR on galleries G1 / G2;
* :mod:`.identification` — CMC, TPIR@FPIR;  :mod:`.retrieval` — Recall@K, MAP@R;
* :mod:`.summary` — one table (printed, CSV) over every result of a run;
* :mod:`.plots` — ROC / CMC / learning-curve PNGs.

Every function takes a backbone or a :class:`broadface.models.loader.LoadedModel` and prepares
images with its preprocessing (the one pipeline of :mod:`broadface.data.pipeline`).
"""
from broadface.eval.identification import evaluate_identification, gallery_probe_split
from broadface.eval.ijb import read_ijb_meta
from broadface.eval.ijb_search import evaluate_templates_1n
from broadface.eval.plots import plot_cmc, plot_learning_curves, plot_roc
from broadface.eval.retrieval import evaluate_retrieval
from broadface.eval.templates import evaluate_templates
from broadface.eval.verification import PairSet, bin_pair_set, evaluate_pairs, lfw_pair_set

__all__ = ["evaluate_pairs", "lfw_pair_set", "bin_pair_set", "PairSet", "evaluate_templates", "read_ijb_meta",
           "evaluate_templates_1n", "evaluate_identification", "gallery_probe_split", "evaluate_retrieval",
           "plot_roc", "plot_cmc", "plot_learning_curves"]
