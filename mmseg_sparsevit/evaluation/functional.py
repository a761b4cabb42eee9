"""Pure segmentation-metric functions over dataset-level per-class areas.

Counts are accumulated per image into four per-class histograms (the same quantities mmseg's ``IoUMetric``
accumulates), summed over the dataset, and only then turned into ratios, so every metric is a dataset-level
(micro) statistic per class. Keeping the math here, free of mmengine state, lets the tests check it against
hand-counted pixels.

Definitions, for class ``c`` with ``TP = intersect[c]``, ``P = pred[c] = TP + FP`` and
``L = label[c] = TP + FN``:

* ``CPA[c] = TP / L`` (per-class pixel accuracy = recall; mmseg's ``Acc``)
* ``IoU[c] = TP / (P + L - TP)``
* ``Dice[c] = 2 TP / (P + L)``
* ``aAcc = sum(TP) / sum(L)``
* ``MPA``, ``mIoU``, ``mDice``: NaN-ignoring means over classes.

A ratio whose denominator is zero is NaN (``CPA`` for a class absent from the ground truth; ``IoU``/``Dice``
for a class absent from both ground truth and prediction), exactly as in ``IoUMetric``. ``nan_to_num``
replaces those NaNs before the means are taken, again as in ``IoUMetric``.
"""
import warnings
from typing import Dict, Iterable, NamedTuple, Optional, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


class SegAreas(NamedTuple):
    """Per-class pixel counts, each an int64 array of shape (num_classes,)."""

    intersect: np.ndarray  # TP: predicted c where the label is c
    union: np.ndarray  # TP + FP + FN
    pred: np.ndarray  # TP + FP: pixels predicted as c
    label: np.ndarray  # TP + FN: pixels labelled c


def _class_histogram(values: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts of each class index; values outside [0, num_classes) are dropped (as ``torch.histc`` does in
    ``IoUMetric``)."""
    values = values.long()
    values = values[(values >= 0) & (values < num_classes)]
    return torch.bincount(values, minlength=num_classes).cpu().numpy()


def segmentation_areas(pred: ArrayLike, label: ArrayLike, num_classes: int, ignore_index: int = 255) -> SegAreas:
    """Per-class areas of one prediction/label pair of the same shape.

    Pixels whose label equals ``ignore_index`` are excluded. Other label or prediction values outside
    ``[0, num_classes)`` are left out of the class histograms they fall in, which is what ``IoUMetric`` does.
    """
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    pred = torch.as_tensor(pred)
    label = torch.as_tensor(label, device=pred.device)
    if pred.shape != label.shape:
        raise ValueError(f'pred shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}')
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    intersect = _class_histogram(pred[pred == label], num_classes)
    area_pred = _class_histogram(pred, num_classes)
    area_label = _class_histogram(label, num_classes)
    return SegAreas(intersect, area_pred + area_label - intersect, area_pred, area_label)


def sum_areas(areas: Iterable[SegAreas]) -> SegAreas:
    """Dataset totals of per-image areas (int64, so no overflow on large datasets)."""
    areas = list(areas)
    if not areas:
        raise ValueError('sum_areas needs at least one SegAreas')
    return SegAreas(*(np.sum(np.stack(field), axis=0, dtype=np.int64) for field in zip(*areas)))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """float64 ``numerator / denominator`` with NaN where the denominator is zero."""
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.asarray(numerator, np.float64) / np.asarray(denominator, np.float64)


def nanmean(values: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN (without a warning) when all are NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=RuntimeWarning)
        return float(np.nanmean(values))


def areas_to_metrics(areas: SegAreas, nan_to_num: Optional[float] = None) -> Dict[str, Union[float, np.ndarray]]:
    """Fractions in [0, 1] from dataset-total areas.

    Returns per-class float64 arrays ``CPA``, ``IoU``, ``Dice`` and scalars ``aAcc``, ``MPA``, ``mIoU``,
    ``mDice``. ``MPA`` is mmseg's ``mAcc``.
    """
    metrics = {
        'aAcc': _ratio(areas.intersect.sum(), areas.label.sum()),
        'CPA': _ratio(areas.intersect, areas.label),
        'IoU': _ratio(areas.intersect, areas.union),
        'Dice': _ratio(2 * areas.intersect, areas.pred + areas.label),
    }
    if nan_to_num is not None:
        metrics = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in metrics.items()}
    metrics['aAcc'] = float(metrics['aAcc'])
    for mean_key, key in (('MPA', 'CPA'), ('mIoU', 'IoU'), ('mDice', 'Dice')):
        metrics[mean_key] = nanmean(metrics[key])
    return metrics
