"""SegPathMetric: the metrics of the SegPath tables (MPA, IoU, Dice) as an mmengine metric, on top of the pure
functions in :mod:`.functional`."""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger, print_log
from mmseg.registry import METRICS
from PIL import Image

from mmseg_sparsevit.utils.markdown import markdown_table

from .functional import SegAreas, areas_to_metrics, segmentation_areas, sum_areas

PER_CLASS_KEYS = ('CPA', 'IoU', 'Dice')


@METRICS.register_module()
class SegPathMetric(BaseMetric):
    """Dataset-level MPA / IoU / Dice for (binary) SegPath segmentation.

    Values are percentages (0-100, unrounded), the scale ``IoUMetric`` uses, so ``aAcc``, ``mIoU``, ``mDice``
    and ``MPA`` (= ``IoUMetric``'s ``mAcc``) match it number for number and ``save_best`` can use them. The
    paper's tables give the same quantities as fractions (63.2 here is .632 there).

    Returned keys: ``aAcc``, ``MPA``, ``mIoU``, ``mDice``; ``CPA.<class>``, ``IoU.<class>`` and
    ``Dice.<class>`` for every class; and ``IoU``, ``Dice`` of the class ``foreground_index`` (the cell type in
    SegPath).

    Args:
        ignore_index: Label value excluded from evaluation.
        foreground_index: Class whose IoU and Dice are reported as ``IoU`` and ``Dice``; ``None`` omits those
            two keys (multi-class data).
        nan_to_num: Replaces NaN per-class fractions (classes absent from the ground truth, or from both
            ground truth and prediction) before averaging, as in ``IoUMetric``; ``None`` keeps NaN and the
            means skip it.
        collect_device, collect_dir, prefix: See ``BaseMetric``.
        output_dir: If set, each prediction is saved there as ``<image basename>.png`` holding class indices.
        format_only: Only save predictions (needs ``output_dir``); no ground truth is read and no metrics are
            returned.
    """

    def __init__(self,
                 ignore_index: int = 255,
                 foreground_index: Optional[int] = 1,
                 nan_to_num: Optional[float] = None,
                 collect_device: str = 'cpu',
                 output_dir: Optional[str] = None,
                 format_only: bool = False,
                 prefix: Optional[str] = None,
                 collect_dir: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix, collect_dir=collect_dir)
        if foreground_index is not None and foreground_index < 0:
            raise ValueError(f'foreground_index must be >= 0 or None, got {foreground_index}')
        if format_only and output_dir is None:
            raise ValueError('format_only=True needs output_dir')
        self.ignore_index = ignore_index
        self.foreground_index = foreground_index
        self.nan_to_num = nan_to_num
        self.output_dir = output_dir
        self.format_only = format_only

    def _class_names(self) -> List[str]:
        """Class names from ``dataset_meta``, checked against ``foreground_index``."""
        if not self.dataset_meta or 'classes' not in self.dataset_meta:
            raise ValueError('SegPathMetric needs dataset_meta["classes"] (set by the runner from the dataset)')
        names = [str(name) for name in self.dataset_meta['classes']]
        if self.foreground_index is not None and self.foreground_index >= len(names):
            raise ValueError(f'foreground_index={self.foreground_index} but the dataset has {len(names)} '
                             f'classes {names}')
        return names

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        """Accumulate per-image class areas (and save predictions)."""
        num_classes = len(self._class_names())
        for sample in data_samples:
            pred = sample['pred_sem_seg']['data'].squeeze()
            if not self.format_only:
                label = sample['gt_sem_seg']['data'].squeeze()
                self.results.append(segmentation_areas(pred, label, num_classes, self.ignore_index))
            if self.output_dir is not None:
                self._save_prediction(pred.cpu().numpy(), sample['img_path'])

    def _save_prediction(self, pred: np.ndarray, img_path: str) -> None:
        """Class-index PNG named after the input image."""
        out_dir = Path(self.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred.astype(np.uint8)).save(out_dir / f'{Path(img_path).stem}.png')

    def compute_metrics(self, results: List[SegAreas]) -> Dict[str, float]:
        """Dataset-level metrics in percent; logs a per-class table."""
        logger = MMLogger.get_current_instance()
        if self.format_only:
            print_log(f'predictions saved to {self.output_dir}', logger)
            return {}
        names = self._class_names()
        fractions = areas_to_metrics(sum_areas(results), self.nan_to_num)
        metrics = {key: 100 * fractions[key] for key in ('aAcc', 'MPA', 'mIoU', 'mDice')}
        if self.foreground_index is not None:
            for key in ('IoU', 'Dice'):
                metrics[key] = 100 * float(fractions[key][self.foreground_index])
        for key in PER_CLASS_KEYS:
            for name, value in zip(names, fractions[key]):
                metrics[f'{key}.{name}'] = 100 * float(value)

        rows = [[name] + [f'{metrics[f"{key}.{name}"]:.2f}' for key in PER_CLASS_KEYS] for name in names]
        print_log('per class results (%):\n' + markdown_table(('Class', ) + PER_CLASS_KEYS, rows), logger)
        return metrics
