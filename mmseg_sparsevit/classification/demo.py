"""Deterministic synthetic classification tiles (PANDA-like layout) for tests and CPU demos.

Three classes on an H&E-like pink background (``utils.he_tiles``), each with its own texture and colour: ``stripes``
(purple fibres at a random angle), ``nuclei`` (many small dark dots) and ``glands`` (a few large pale
rings), so that even weak features separate them and a linear probe beats chance. Tiles have random,
non-square sizes so the resize modes are exercised. Same seed, same bytes.
"""
import csv
import os
import os.path as osp
from typing import Dict, Literal, Sequence, Tuple

import cv2
import numpy as np

from mmseg_sparsevit.utils.he_tiles import add_noise, flat_background, jitter

from .dataset import SPLITS

DEMO_CLASSES = ('stripes', 'nuclei', 'glands')
DemoLayout = Literal['csv', 'folders']


def draw_demo_tile(class_name: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One HWC uint8 RGB tile of ``class_name`` (one of ``DEMO_CLASSES``)."""
    img = flat_background(height, width, rng)
    scale = min(height, width) / 64
    if class_name == 'stripes':
        angle = rng.uniform(0, np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        length = 2 * max(height, width)
        for offset in np.arange(-length / 2, length / 2, max(4.0, 7 * scale)):
            centre = np.array([width / 2, height / 2]) + offset * normal
            p0, p1 = (centre - length * direction).astype(int), (centre + length * direction).astype(int)
            cv2.line(img, tuple(map(int, p0)), tuple(map(int, p1)), jitter(rng, (150, 60, 150), 15),
                     max(1, int(2 * scale)))
    elif class_name == 'nuclei':
        for _ in range(int(rng.integers(25, 40) * scale ** 2)):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.circle(img, centre, max(1, int(rng.integers(2, 4) * scale)), jitter(rng, (60, 30, 110), 15), -1)
    elif class_name == 'glands':
        for _ in range(int(rng.integers(2, 4))):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            radius = max(3, int(rng.integers(8, 14) * scale))
            cv2.circle(img, centre, radius, jitter(rng, (250, 240, 245), 15), -1)
            cv2.circle(img, centre, radius, jitter(rng, (200, 70, 120), 15), max(1, int(3 * scale)))
    else:
        raise ValueError(f'unknown demo class {class_name!r}; expected one of {DEMO_CLASSES}')
    return add_noise(img, rng, 6)


def make_demo_classification(out_dir: str, counts: Sequence[int] = (8, 4, 4), size_range: Tuple[int, int] = (40, 64),
                             seed: int = 0, layout: DemoLayout = 'csv') -> Dict[str, object]:
    """Write ``counts`` = (train, val, test) tiles per class under ``out_dir``.

    ``layout='csv'``: ``images/<class>_<split>_<i>.png`` plus ``labels.csv`` (image, label, split);
    ``layout='folders'``: ``<split>/<class>/<i>.png``. Returns ``dict(data_root, ann_file, class_names)``
    (``ann_file`` None for folders).
    """
    if layout not in ('csv', 'folders'):
        raise ValueError(f"layout must be 'csv' or 'folders', got {layout!r}")
    if len(counts) != len(SPLITS) or min(counts) < 0:
        raise ValueError(f'counts must be 3 non-negative numbers (train, val, test), got {counts}')
    lo, hi = size_range
    if not 8 <= lo <= hi:
        raise ValueError(f'size_range must satisfy 8 <= lo <= hi, got {size_range}')
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in zip(SPLITS, counts):
        for class_name in DEMO_CLASSES:
            for i in range(count):
                height, width = (int(v) for v in rng.integers(lo, hi + 1, 2))
                tile = draw_demo_tile(class_name, height, width, rng)
                rel = (osp.join('images', f'{class_name}_{split}_{i:03d}.png') if layout == 'csv'
                       else osp.join(split, class_name, f'{i:03d}.png'))
                os.makedirs(osp.dirname(osp.join(out_dir, rel)), exist_ok=True)
                cv2.imwrite(osp.join(out_dir, rel), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
                rows.append((rel, class_name, split))
    ann_file = None
    if layout == 'csv':
        ann_file = osp.join(out_dir, 'labels.csv')
        with open(ann_file, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(('image', 'label', 'split'))
            writer.writerows(rows)
    return dict(data_root=out_dir, ann_file=ann_file, class_names=sorted(DEMO_CLASSES))
