"""Evaluation metrics as pure functions on numpy arrays (torch tensors accepted).

* verification: :func:`kfold_accuracy` (LFW / insightface 10-fold accuracy, VAL@FAR),
  :func:`roc`, :func:`tar_at_far` (IJB-B/C TAR@FAR, insightface or strict rule);
* identification: :func:`cmc` (closed set, MegaFace-style distractors),
  :func:`tpir_at_fpir` (open set);
* retrieval: :func:`recall_at_k`, :func:`map_at_r` (SOP / CUB / In-Shop).
"""
from broadface.metrics.identification import OpenSetResult, cmc, tpir_at_fpir
from broadface.metrics.kfold import KFoldResult, kfold_accuracy, kfold_splits
from broadface.metrics.retrieval import map_at_r, recall_at_k
from broadface.metrics.roc import DEFAULT_FARS, OperatingPoints, roc, tar_at_far
from broadface.metrics.search import Neighbours, faiss_available, knn

__all__ = ["kfold_accuracy", "kfold_splits", "KFoldResult", "roc", "tar_at_far", "OperatingPoints", "DEFAULT_FARS",
           "cmc", "tpir_at_fpir", "OpenSetResult", "recall_at_k", "map_at_r", "knn", "Neighbours",
           "faiss_available"]
