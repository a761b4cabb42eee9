"""Frozen-feature classification with SparseViT: datasets, resumable extraction, linear-probe / KNN
evaluation and resolution / pruning / window sweeps (the paper's tables 1-3).

Registers nothing in mmseg's registries; besides the package's own requirements it uses scikit-learn
(probes) and matplotlib (sweep plots).
"""
from .dataset import RESIZE_MODES, ClassificationImages, Sample, load_samples, read_rgb, resize_image
from .demo import DEMO_CLASSES, make_demo_classification
from .extraction import MODES, ExtractionConfig, build_backbone, embed_batch, extract_features
from .feature_store import FEATURE_KEYS, FeatureStore, load_features
from .probing import (DEFAULT_C_GRID, KNN_K, classification_metrics, evaluate_features, knn_probe, linear_probe,
                      make_splits)
from .sweep import plan_runs, run_sweep, write_outputs

__all__ = [
    'RESIZE_MODES', 'ClassificationImages', 'Sample', 'load_samples', 'read_rgb', 'resize_image', 'DEMO_CLASSES',
    'make_demo_classification', 'MODES', 'ExtractionConfig', 'build_backbone', 'embed_batch', 'extract_features',
    'FEATURE_KEYS', 'FeatureStore', 'load_features', 'DEFAULT_C_GRID', 'KNN_K', 'classification_metrics',
    'evaluate_features', 'knn_probe', 'linear_probe', 'make_splits', 'plan_runs', 'run_sweep', 'write_outputs'
]
