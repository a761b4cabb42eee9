"""Linear-probe and KNN evaluation of frozen embeddings (the paper's tables 1-3, UNI's protocol).

* Linear probe: ``StandardScaler`` + L2 ``LogisticRegression``; ``C`` is chosen from a log grid by
  balanced accuracy on the validation split (ties go to the smaller ``C``, i.e. more regularisation),
  then a probe with that ``C`` is fitted on the train split and scored on test.
* KNN: features centred on the train mean and L2-normalised (as UNI's ``eval_knn``), then a
  ``k = 20`` nearest-neighbour vote with Euclidean distance, fitted on the train split.

Splits come from the feature file's ``split`` column (empty = ``train``). Missing ``test``: a seeded
stratified ``test_fraction`` of train is held out. Missing ``val``: a seeded stratified
``val_fraction`` of train is used to choose ``C`` and returned to train for the final fit. All metrics
are scikit-learn's: accuracy, balanced accuracy, weighted F1, macro one-vs-rest AUROC.
"""
import warnings
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from .dataset import SPLITS

# 'embedding' is the model's prescribed tile embedding (``SparseViT.pool``); the others are its parts.
FeatureKind = Literal['embedding', 'cls', 'patch_mean', 'cls+patch_mean']
FEATURE_KINDS = ('embedding', 'cls', 'patch_mean', 'cls+patch_mean')
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 9))
KNN_K = 20
METRIC_NAMES = ('accuracy', 'balanced_accuracy', 'weighted_f1', 'auroc')


def default_feature(data: Dict[str, Any]) -> FeatureKind:
    """The prescribed ``embedding`` when the file has (or its meta implies) one, else ``cls``."""
    return 'embedding' if 'embedding' in data else 'cls'


def select_features(data: Dict[str, Any], feature: Optional[FeatureKind] = None) -> np.ndarray:
    """(N, C) float64 matrix of the chosen embedding (``cls+patch_mean`` concatenates both; None:
    :func:`default_feature`)."""
    feature = default_feature(data) if feature is None else feature
    if feature not in FEATURE_KINDS:
        raise ValueError(f'feature must be one of {FEATURE_KINDS}, got {feature!r}')
    if feature == 'embedding' and 'embedding' not in data:
        raise ValueError("the feature file has no prescribed 'embedding' (its meta names no architecture); "
                         "choose --feature cls, patch_mean or cls+patch_mean")
    parts = feature.split('+')
    return np.concatenate([np.asarray(data[p], dtype=np.float64) for p in parts], axis=1)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray) -> Dict[str, float]:
    """scikit-learn metrics; ``proba`` is (N, num_classes) with a column for every class index.

    AUROC needs every class among ``y_true``; otherwise it is NaN (with a warning) rather than an
    average over a class-dependent subset.
    """
    num_classes = proba.shape[1]
    out = dict(accuracy=accuracy_score(y_true, y_pred), balanced_accuracy=balanced_accuracy_score(y_true, y_pred),
               weighted_f1=f1_score(y_true, y_pred, average='weighted'))
    present = np.unique(y_true)
    if len(present) != num_classes:
        warnings.warn(f'AUROC undefined: test labels cover classes {present.tolist()} of {num_classes}')
        out['auroc'] = float('nan')
    elif num_classes == 2:
        out['auroc'] = roc_auc_score(y_true, proba[:, 1])
    else:
        out['auroc'] = roc_auc_score(y_true, proba, multi_class='ovr', average='macro')
    return {k: float(v) for k, v in out.items()}


def predict_full(model: Pipeline, x: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Predictions and (N, num_classes) probabilities, with zero columns for classes absent from training."""
    proba = np.zeros((len(x), num_classes))
    proba[:, model.classes_] = model.predict_proba(x)
    return model.predict(x), proba


def _stratified_holdout(index: np.ndarray, y: np.ndarray, fraction: float, seed: int,
                        what: str) -> Tuple[np.ndarray, np.ndarray]:
    if not 0 < fraction < 1:
        raise ValueError(f'{what} fraction must be in (0, 1), got {fraction}')
    try:
        keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=y[index])
    except ValueError as e:
        raise ValueError(f'cannot hold out a stratified {what} split of {len(index)} train samples: {e}') from e
    return np.sort(keep), np.sort(held)


def make_splits(split: np.ndarray, y: np.ndarray, val_fraction: float = 0.2, test_fraction: float = 0.25,
                seed: int = 0) -> Dict[str, Any]:
    """Index arrays ``train`` (final fit), ``select`` (fit while choosing C), ``val`` and ``test``.

    ``source`` records for each of val / test whether it came from the file or was held out.
    """
    split = np.asarray([s if s else 'train' for s in np.asarray(split).tolist()])
    unknown = sorted(set(split.tolist()) - set(SPLITS))
    if unknown:
        raise ValueError(f'unknown split names {unknown}; expected {SPLITS}')
    index = {name: np.flatnonzero(split == name) for name in SPLITS}
    source = dict(val='file', test='file')
    if len(index['train']) == 0:
        raise ValueError('no train samples in the feature file')
    if len(index['test']) == 0:
        index['train'], index['test'] = _stratified_holdout(index['train'], y, test_fraction, seed, 'test')
        source['test'] = f'held out {test_fraction:g} of train (stratified, seed {seed})'
    index['select'] = index['train']
    if len(index['val']) == 0:
        index['select'], index['val'] = _stratified_holdout(index['train'], y, val_fraction, seed, 'val')
        source['val'] = f'held out {val_fraction:g} of train for choosing C (stratified, seed {seed})'
    return dict(index, source=source)


def linear_probe(x: np.ndarray, y: np.ndarray, splits: Dict[str, Any], num_classes: int,
                 c_grid: Sequence[float] = DEFAULT_C_GRID, seed: int = 0, max_iter: int = 1000) -> Dict[str, Any]:
    """Choose ``C`` on val, refit on train, score on test. Returns ``C``, the val scores and test metrics."""
    if not c_grid:
        raise ValueError('c_grid must hold at least one value')

    def probe(c: float) -> Pipeline:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))

    val_scores = {}
    for c in c_grid:
        model = probe(c).fit(x[splits['select']], y[splits['select']])
        val_scores[float(c)] = balanced_accuracy_score(y[splits['val']], model.predict(x[splits['val']]))
    best = max(val_scores, key=lambda c: (val_scores[c], -c))
    model = probe(best).fit(x[splits['train']], y[splits['train']])
    pred, proba = predict_full(model, x[splits['test']], num_classes)
    return dict(C=best, val_balanced_accuracy={f'{c:g}': float(s) for c, s in val_scores.items()},
                test=classification_metrics(y[splits['test']], pred, proba))


def knn_probe(x: np.ndarray, y: np.ndarray, splits: Dict[str, Any], num_classes: int,
              k: int = KNN_K) -> Dict[str, Any]:
    """k-NN vote on centred, L2-normalised features; ``k`` is clamped (with a warning) to the train size."""
    num_train = len(splits['train'])
    if num_train < k:
        warnings.warn(f'KNN: only {num_train} train samples, using k={num_train} instead of k={k}')
        k = num_train
    model = make_pipeline(StandardScaler(with_std=False), Normalizer(norm='l2'),
                          KNeighborsClassifier(n_neighbors=k, metric='euclidean'))
    model.fit(x[splits['train']], y[splits['train']])
    pred, proba = predict_full(model, x[splits['test']], num_classes)
    return dict(k=k, test=classification_metrics(y[splits['test']], pred, proba))


def check_class_coverage(y: np.ndarray, splits: Dict[str, Any], class_names: Sequence[str],
                         source: str = 'features') -> None:
    """Raise when a probe cannot be fitted (fewer than two classes to fit on); warn, naming the classes,
    when a split lacks some: scikit-learn would fail with an opaque error or stay silent."""
    def named(labels) -> List[str]:
        return [str(class_names[i]) if 0 <= i < len(class_names) else str(i) for i in sorted(labels)]

    fitted_on = [('train', 'train split')]
    if splits['source']['val'] != 'file':
        fitted_on.append(('select', 'part of the train split the probe is fitted on while choosing C'))
    for key, what in fitted_on:
        present = set(y[splits[key]].tolist())
        if len(present) < 2:
            raise ValueError(f'{source}: the {what} ({len(splits[key])} samples) holds only class '
                             f'{named(present)} of {named(range(len(class_names)))}; a probe needs at least two')
    consequence = dict(train='the probes can never predict them', val='C is chosen without them',
                       test='the test metrics do not cover them')
    for split in SPLITS:
        absent = set(range(len(class_names))) - set(y[splits[split]].tolist())
        if absent:
            origin = '' if splits['source'].get(split, 'file') == 'file' else f" ({splits['source'][split]})"
            warnings.warn(f'{source}: classes {named(absent)} have no sample in the {split} split{origin}; '
                          f'{consequence[split]}')


def evaluate_features(data: Dict[str, Any], feature: Optional[FeatureKind] = None,
                      c_grid: Sequence[float] = DEFAULT_C_GRID, knn_k: int = KNN_K, val_fraction: float = 0.2,
                      test_fraction: float = 0.25, seed: int = 0, source: str = 'features') -> Dict[str, Any]:
    """Both probes on a loaded feature file (``load_features``); the result is JSON-serialisable.

    ``source`` (the file's path) starts every error and warning about the data; ``feature`` None probes
    :func:`default_feature`."""
    feature = default_feature(data) if feature is None else feature
    x, y = select_features(data, feature), np.asarray(data['label'])
    num_classes = len(data['class_names'])
    try:
        splits = make_splits(data['split'], y, val_fraction, test_fraction, seed)
    except ValueError as err:
        raise ValueError(f'{source}: {err}') from None
    check_class_coverage(y, splits, [str(c) for c in data['class_names']], source)
    return dict(
        feature=feature, seed=seed, class_names=[str(c) for c in data['class_names']],
        num_samples={name: int(len(splits[name])) for name in SPLITS}, split_source=splits['source'],
        linear_probe=linear_probe(x, y, splits, num_classes, c_grid, seed),
        knn=knn_probe(x, y, splits, num_classes, knn_k))
