"""Image-level classification data (PANDA-style ROIs) for frozen-feature extraction.

Two layouts are read:

* a CSV with columns ``image,label`` and optionally ``split`` (``train``/``val``/``test``), image paths
  relative to ``data_root``;
* class sub-folders ``data_root/<class>/<image>``, optionally below split folders
  ``data_root/<split>/<class>/<image>`` (used when every top-level folder is a split name).

Each image (the whole ROI) is brought to ``size x size`` by one of three explicit resize modes and
normalised with the ImageNet mean/std that UNI / UNI-2 were trained with.
"""
import csv
import os
import os.path as osp
from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

ResizeMode = Literal['stretch', 'pad', 'center-crop']
RESIZE_MODES = ('stretch', 'pad', 'center-crop')
SPLITS = ('train', 'val', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')

# Padding colour: the ImageNet mean, so padded pixels are exactly zero after normalisation.
PAD_VALUE = tuple(int(round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)


@dataclass(frozen=True)
class Sample:
    """One labelled image; ``image_id`` is its path relative to the data root (unique, stable)."""

    image_id: str
    path: str
    label: int
    split: str


def _sort_class_names(names: Sequence[str]) -> List[str]:
    """Numeric order when every name is an integer (ISUP grades 0..5), else lexicographic."""
    names = sorted(set(names))
    if all(name.lstrip('-').isdigit() for name in names):
        return sorted(names, key=int)
    return names


def _check_split(split: str, where: str) -> str:
    split = split.strip().lower()
    if split and split not in SPLITS:
        raise ValueError(f'{where}: split {split!r} is not one of {SPLITS} (or empty)')
    return split


def _read_csv(ann_file: str) -> Tuple[List[Tuple[str, str, str]], List[str]]:
    with open(ann_file, newline='') as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ('image', 'label') if c not in columns]
        if missing:
            raise KeyError(f'{ann_file}: missing column(s) {missing}; found {columns}')
        rows = []
        for line, row in enumerate(reader, start=2):
            image, label = (row['image'] or '').strip(), (row['label'] or '').strip()
            if not image or not label:
                raise ValueError(f'{ann_file} line {line}: empty image or label in {row}')
            rows.append((image, label, _check_split(row.get('split') or '', f'{ann_file} line {line}')))
    if not rows:
        raise ValueError(f'{ann_file}: no samples')
    return rows, _sort_class_names([label for _, label, _ in rows])


def _list_images(folder: str) -> List[str]:
    return sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS))


def _read_folders(data_root: str) -> Tuple[List[Tuple[str, str, str]], List[str]]:
    top = sorted(d for d in os.listdir(data_root) if osp.isdir(osp.join(data_root, d)))
    if not top:
        raise ValueError(f'{data_root}: no class sub-folders (and no ann_file given)')
    split_dirs = [d for d in top if d.lower() in SPLITS]
    layout = [(d.lower(), d) for d in top] if len(split_dirs) == len(top) else [('', '')]
    rows = []
    for split, split_dir in layout:
        base = osp.join(data_root, split_dir)
        for cls in sorted(d for d in os.listdir(base) if osp.isdir(osp.join(base, d))):
            rows += [(osp.join(split_dir, cls, name) if split_dir else osp.join(cls, name), cls, split)
                     for name in _list_images(osp.join(base, cls))]
    if not rows:
        raise ValueError(f'{data_root}: no images with extensions {IMAGE_EXTENSIONS} in class sub-folders')
    return rows, _sort_class_names([label for _, label, _ in rows])


def load_samples(data_root: str, ann_file: Optional[str] = None) -> Tuple[List[Sample], List[str]]:
    """Samples in a fixed order (the CSV's, or sorted folder order) and the sorted class names.

    Every listed image must exist; duplicates are rejected because the image id keys resumption.
    """
    if not osp.isdir(data_root):
        raise FileNotFoundError(f'data_root is not a directory: {data_root}')
    rows, class_names = _read_csv(ann_file) if ann_file else _read_folders(data_root)
    index = {name: i for i, name in enumerate(class_names)}
    samples, seen = [], set()
    for image, label, split in rows:
        image_id = osp.normpath(image)
        if image_id in seen:
            raise ValueError(f'{ann_file or data_root}: image {image!r} is listed twice')
        seen.add(image_id)
        samples.append(Sample(image_id, osp.join(data_root, image_id), index[label], split))
    missing = [s.path for s in samples if not osp.isfile(s.path)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} image file(s) not found, first: {missing[0]}')
    return samples, class_names


def read_rgb(path: str) -> np.ndarray:
    """HWC uint8 RGB (alpha dropped, grey expanded); an unreadable file is an error naming it."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f'cannot read image file {path} (missing, truncated or not an image)')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_image(img: np.ndarray, size: int, mode: ResizeMode = 'stretch') -> np.ndarray:
    """Bring an HWC image to ``size x size``.

    ``stretch`` resizes the whole ROI to the square, ignoring aspect (the paper's choice: nothing is
    lost, shapes are distorted); ``pad`` fits the longer side and pads with the ImageNet mean colour;
    ``center-crop`` fits the shorter side and crops the centre. Area interpolation when shrinking,
    bilinear when enlarging.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f'resize mode must be one of {RESIZE_MODES}, got {mode!r}')
    h, w = img.shape[:2]
    if mode == 'stretch':
        new_hw = (size, size)
    else:
        scale = size / (max(h, w) if mode == 'pad' else min(h, w))
        new_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
        if mode == 'center-crop':
            new_hw = (max(size, new_hw[0]), max(size, new_hw[1]))
    interp = cv2.INTER_AREA if new_hw[0] * new_hw[1] < h * w else cv2.INTER_LINEAR
    img = cv2.resize(img, (new_hw[1], new_hw[0]), interpolation=interp)
    if mode == 'pad':
        top, left = (size - new_hw[0]) // 2, (size - new_hw[1]) // 2
        img = cv2.copyMakeBorder(img, top, size - new_hw[0] - top, left, size - new_hw[1] - left,
                                 cv2.BORDER_CONSTANT, value=PAD_VALUE)
    elif mode == 'center-crop':
        top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
        img = img[top:top + size, left:left + size]
    return img


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 normalised with the ImageNet mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x - mean) / std


class ClassificationImages(Dataset):
    """``dataset[i] -> (image tensor (3, size, size), i)``; labels and ids stay in ``samples``."""

    def __init__(self, samples: Sequence[Sample], size: int, resize: ResizeMode = 'stretch') -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f'resize must be one of {RESIZE_MODES}, got {resize!r}')
        if size < 1:
            raise ValueError(f'size must be >= 1, got {size}')
        self.samples = list(samples)
        self.size = size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img = resize_image(read_rgb(self.samples[index].path), self.size, self.resize)
        return to_tensor(img), index
