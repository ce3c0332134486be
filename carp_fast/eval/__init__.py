"""Evaluation protocols on frozen features (CARP paper section 5, appendix D).

One protocol per module, the paper's settings by default: :mod:`.knn` (weighted k-NN),
:mod:`.kmeans`, :mod:`.linear_grid` (the paper's linear evaluation: a grid of heads on
augmented crops), :mod:`.linear` (the cached "fast" probe, not the paper's),
:mod:`.fewshot` (iNat2018-style few-shot), :mod:`.voc` (few-shot VOC07 with SVMs),
:mod:`.retrieval` (revisited Oxford/Paris mAP), :mod:`.copydetection` (Copydays);
:mod:`.data` (the views each protocol feeds), :mod:`.features` (extraction and cache),
:mod:`.checkpoints` (loading backbones), :mod:`.frozen` (the checkpoint under evaluation,
read once, and its cached features), :mod:`.report` (what a run reports),
:mod:`.cli` (``carp-fast eval ...``: each protocol module's options and run, wired).

Importing this package is cheap: only the k-NN module (torch) is imported eagerly;
the other names load on first access, so faiss, scikit-learn and rich are imported only
by the protocols that need them.
"""

from __future__ import annotations

import importlib

from .knn import KNNResult, knn_accuracies, knn_accuracy, knn_classify, loader_knn

# name -> submodule that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "raw_pixel_knn": "pixels",
    "load_backbone": "checkpoints",
    "backbone_state_dict": "checkpoints",
    "extract_features": "features",
    "cached_features": "features",
    "Features": "features",
    "kmeans_evaluate": "kmeans",
    "KMeansResult": "kmeans",
    "linear_probe": "linear",
    "LinearProbeResult": "linear",
    "bank_probe": "linear",
    "raw_pixel_features": "pixels",
    "sample_few_shot": "fewshot",
    "few_shot_evaluate": "fewshot",
    "FewShotResult": "fewshot",
    "RetrievalResult": "retrieval",
    "compute_ap": "retrieval",
    "compute_map": "retrieval",
    "retrieval_map": "retrieval",
    "load_ground_truth": "retrieval",
    "load_revisitop": "retrieval",
    "MultiScale": "retrieval",
    "copy_detection_map": "copydetection",
    "load_copydays": "copydetection",
    "linear_grid": "linear_grid",
    "LinearGridResult": "linear_grid",
    "voc_few_shot": "voc",
    "read_voc_split": "voc",
    "voc_ap": "voc",
}

__all__ = ["KNNResult", "knn_accuracies", "knn_accuracy", "knn_classify", "loader_knn", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
