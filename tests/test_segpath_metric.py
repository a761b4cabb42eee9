"""SegPathMetric and its pure functions: hand-counted pixels, and agreement
with mmseg's IoUMetric on random data."""
import math

import numpy as np
import pytest
import torch
from mmengine.evaluator import Evaluator
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.evaluation import IoUMetric
from mmseg.structures import SegDataSample
from PIL import Image

from mmseg_sparsevit.evaluation import (SegPathMetric, areas_to_metrics,
                                        segmentation_areas, sum_areas)

BINARY = ('background', 'epithelium')

# Hand-counted 2x3 example (rows are image rows):
#   label  0 1 1      pred  1 1 1
#          0 0 1            1 0 0
# class 1: labelled {(0,1),(0,2),(1,2)}, predicted {(0,0),(0,1),(0,2),(1,0)}
#          -> TP 2, FP 2, FN 1
# class 0: labelled {(0,0),(1,0),(1,1)}, predicted {(1,1),(1,2)}
#          -> TP 1, FP 1, FN 2
LABEL = [[0, 1, 1], [0, 0, 1]]
PRED = [[1, 1, 1], [1, 0, 0]]
EXPECTED = {
    'CPA.background': 1 / 3,  # TP / (TP + FN)
    'CPA.epithelium': 2 / 3,
    'MPA': (1 / 3 + 2 / 3) / 2,
    'IoU.background': 1 / 4,  # TP / (TP + FP + FN)
    'IoU.epithelium': 2 / 5,
    'IoU': 2 / 5,
    'mIoU': (1 / 4 + 2 / 5) / 2,
    'Dice.background': 2 / 5,  # 2 TP / (2 TP + FP + FN)
    'Dice.epithelium': 4 / 7,
    'Dice': 4 / 7,
    'mDice': (2 / 5 + 4 / 7) / 2,
    'aAcc': 3 / 6,  # correct pixels / labelled pixels
}


def sample(pred, label, img_path='tile_HE.png'):
    """A data sample as mmengine's Evaluator hands it to metrics."""
    return dict(
        pred_sem_seg=dict(data=torch.as_tensor(pred).unsqueeze(0)),
        gt_sem_seg=dict(data=torch.as_tensor(label).unsqueeze(0)),
        img_path=img_path)


def run_metric(metric, samples, classes=BINARY):
    metric.dataset_meta = dict(classes=classes)
    metric.process({}, samples)
    return metric.compute_metrics(metric.results)


def assert_percent(metrics, expected_fractions):
    for key, fraction in expected_fractions.items():
        assert metrics[key] == pytest.approx(100 * fraction, abs=1e-9), key


def test_hand_counted_binary():
    metrics = run_metric(SegPathMetric(), [sample(PRED, LABEL)])
    assert_percent(metrics, EXPECTED)
    assert len(metrics) == len(EXPECTED)


def test_ignore_index_pixels_do_not_count():
    """A third row of ignored labels leaves every value unchanged, whatever
    is predicted there (including out-of-range classes)."""
    label = LABEL + [[255, 255, 255]]
    pred = PRED + [[1, 0, 7]]
    assert_percent(run_metric(SegPathMetric(), [sample(pred, label)]),
                   EXPECTED)
    # the same pixels with another ignore_index are counted: 0 is now
    # ignored, so only class 1 (and the 255 row, out of range) is labelled
    metrics = run_metric(SegPathMetric(ignore_index=0), [sample(pred, label)])
    # class 1 labelled {(0,1),(0,2),(1,2)}: predicted 1, 1, 0 -> TP 2, FN 1
    assert metrics['CPA.epithelium'] == pytest.approx(100 * 2 / 3)


def test_counts_accumulate_over_the_dataset():
    """Metrics come from dataset totals, not from a mean over images.

    Second image: label [[0, 0]], pred [[0, 1]] -> class 0 TP 1, FN 1;
    class 1 FP 1. Totals with the first image: class 0 TP 2, FP 1, FN 3;
    class 1 TP 2, FP 3, FN 1; 4 of 8 pixels correct.
    """
    metrics = run_metric(SegPathMetric(),
                         [sample(PRED, LABEL),
                          sample([[0, 1]], [[0, 0]])])
    assert_percent(
        metrics, {
            'CPA.background': 2 / 5,
            'CPA.epithelium': 2 / 3,
            'IoU.background': 2 / 6,
            'IoU': 2 / 6,
            'Dice.background': 4 / 8,
            'Dice': 4 / 8,
            'aAcc': 4 / 8,
        })


def test_absent_classes_are_nan_and_skipped_by_means():
    """Class 2 is neither labelled nor predicted: NaN everywhere. Class 3 is
    predicted once but never labelled: CPA NaN (no labelled pixels), IoU and
    Dice 0.

    label 0 0 1 1   pred 0 3 1 1
    class 0 TP 1 FN 1; class 1 TP 2; class 3 FP 1.
    """
    classes = ('background', 'a', 'b', 'c')
    samples = [sample([[0, 3, 1, 1]], [[0, 0, 1, 1]])]
    metrics = run_metric(SegPathMetric(), samples, classes)
    for key in ('CPA.b', 'IoU.b', 'Dice.b', 'CPA.c'):
        assert math.isnan(metrics[key]), key
    assert_percent(
        metrics, {
            'IoU.c': 0,
            'Dice.c': 0,
            'MPA': (1 / 2 + 1) / 2,
            'mIoU': (1 / 2 + 1 + 0) / 3,
            'mDice': (2 / 3 + 1 + 0) / 3,
        })
    zeroed = run_metric(SegPathMetric(nan_to_num=0), samples, classes)
    assert_percent(
        zeroed, {
            'CPA.b': 0,
            'MPA': (1 / 2 + 1 + 0 + 0) / 4,
            'mIoU': (1 / 2 + 1 + 0 + 0) / 4,
        })


def test_functional_areas_match_counts():
    areas = segmentation_areas(np.array(PRED), np.array(LABEL), 2)
    np.testing.assert_array_equal(areas.intersect, [1, 2])
    np.testing.assert_array_equal(areas.pred, [2, 4])
    np.testing.assert_array_equal(areas.label, [3, 3])
    np.testing.assert_array_equal(areas.union, [4, 5])
    total = sum_areas([areas, areas])
    np.testing.assert_array_equal(total.intersect, [2, 4])
    assert total.intersect.dtype == np.int64
    # the ratios do not change when every count is doubled
    assert areas_to_metrics(total)['mIoU'] == pytest.approx(EXPECTED['mIoU'])


def test_functional_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r'pred shape \(2, 3\).*\(3, 2\)'):
        segmentation_areas(torch.zeros(2, 3), torch.zeros(3, 2), 2)


def random_samples(num_classes, seed):
    """Random maps with ignored pixels, a class missing from the first
    sample's labels, an out-of-range label and, for 4+ classes, a class that
    never occurs at all."""
    gen = torch.Generator().manual_seed(seed)
    present = num_classes - 1 if num_classes > 2 else num_classes
    samples = []
    for i, (h, w) in enumerate([(9, 7), (16, 16), (5, 12)]):
        pred = torch.randint(0, present, (h, w), generator=gen)
        label = torch.randint(0, present, (h, w), generator=gen)
        if i == 0:
            label[label == 1] = 0
        label[torch.rand(h, w, generator=gen) < 0.2] = 255
        label[0, 0] = num_classes  # out of range but not ignored
        samples.append(sample(pred, label, f'img{i}.png'))
    return samples


@pytest.mark.parametrize('num_classes', [2, 4])
@pytest.mark.parametrize('nan_to_num', [None, 0])
@pytest.mark.parametrize('seed', [0, 1])
def test_matches_iou_metric_on_random_data(num_classes, nan_to_num, seed):
    classes = tuple(f'class{i}' for i in range(num_classes))
    samples = random_samples(num_classes, seed)
    our_metric = SegPathMetric(nan_to_num=nan_to_num)
    ours = run_metric(our_metric, samples, classes)
    reference = IoUMetric(iou_metrics=['mIoU', 'mDice'],
                          nan_to_num=nan_to_num)
    theirs = run_metric(reference, samples, classes)

    # IoUMetric rounds to 2 decimals (in float32)
    for our_key, their_key in [('aAcc', 'aAcc'), ('MPA', 'mAcc'),
                               ('mIoU', 'mIoU'), ('mDice', 'mDice')]:
        assert ours[our_key] == pytest.approx(
            float(theirs[their_key]), abs=5.1e-3, nan_ok=True), our_key

    # per-class values are only logged by IoUMetric: compare the unrounded
    # arrays from its static functions on its own accumulated areas
    for their_areas, our_areas in zip(reference.results, our_metric.results):
        for their_area, our_area in zip(their_areas, our_areas):
            np.testing.assert_array_equal(their_area.numpy(), our_area)
    totals = [sum(areas) for areas in zip(*reference.results)]
    per_class = IoUMetric.total_area_to_metrics(*totals, ['mIoU', 'mDice'],
                                                nan_to_num)
    for our_key, their_key in [('CPA', 'Acc'), ('IoU', 'IoU'),
                               ('Dice', 'Dice')]:
        ours_per_class = [ours[f'{our_key}.{name}'] for name in classes]
        np.testing.assert_allclose(
            ours_per_class, 100 * per_class[their_key], rtol=1e-5)
    if num_classes == 4 and nan_to_num is None:  # never-seen class 3
        assert math.isnan(ours['IoU.class3'])


def test_registered_and_runs_in_evaluator():
    """Built from a config in the mmseg scope, fed SegDataSamples the way the
    test loop does."""
    seg_sample = SegDataSample(metainfo=dict(img_path='tile_HE.png'))
    seg_sample.pred_sem_seg = PixelData(data=torch.tensor([PRED]))
    seg_sample.gt_sem_seg = PixelData(data=torch.tensor([LABEL]))
    with DefaultScope.overwrite_default_scope('mmseg'):
        evaluator = Evaluator(dict(type='SegPathMetric', prefix='test'))
    evaluator.dataset_meta = dict(classes=BINARY)
    evaluator.process([seg_sample])
    metrics = evaluator.evaluate(1)
    assert metrics['test/Dice'] == pytest.approx(100 * EXPECTED['Dice'])


def test_foreground_index_none_omits_foreground_keys():
    metrics = run_metric(SegPathMetric(foreground_index=None),
                         [sample(PRED, LABEL)])
    assert 'IoU' not in metrics and 'Dice' not in metrics
    assert metrics['IoU.epithelium'] == pytest.approx(100 * 2 / 5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(foreground_index=-1), 'foreground_index must be >= 0'),
    (dict(format_only=True), 'format_only=True needs output_dir'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegPathMetric(**kwargs)


def test_foreground_index_beyond_classes():
    metric = SegPathMetric(foreground_index=2)
    with pytest.raises(ValueError, match='foreground_index=2 .* 2 classes'):
        run_metric(metric, [sample(PRED, LABEL)])


def test_missing_dataset_meta():
    with pytest.raises(ValueError, match=r'dataset_meta\["classes"\]'):
        SegPathMetric().process({}, [sample(PRED, LABEL)])


def test_logs_per_class_table(tmp_path):
    log_file = tmp_path / 'metric.log'
    MMLogger.get_instance('test_segpath_metric_log', log_file=str(log_file))
    run_metric(SegPathMetric(), [sample(PRED, LABEL)])
    log = log_file.read_text()
    # epithelium: CPA 2/3, IoU 2/5, Dice 4/7 in percent
    assert '| epithelium | 66.67 | 40.00 | 57.14 |' in log


@pytest.mark.parametrize('format_only', [False, True])
def test_output_dir_saves_predictions(tmp_path, format_only):
    metric = SegPathMetric(output_dir=str(tmp_path), format_only=format_only)
    metrics = run_metric(metric, [sample(PRED, LABEL, 'a/b/tile_HE.png')])
    saved = np.array(Image.open(tmp_path / 'tile_HE.png'))
    np.testing.assert_array_equal(saved, PRED)
    assert (metrics == {}) == format_only
