"""Tissue detection on a low-resolution thumbnail, so that tiles are cut only where there is tissue.

Stained tissue is saturated and glass is not: threshold the HSV saturation with Otsu's method (never below a
floor, so a blank slide stays blank), close small gaps, drop fragments below a minimum area and fill small
holes. The same recipe as CLAM's and TRIDENT's classical segmenters, in physical units so that one setting
serves every scanner.
"""
import math
from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np

from .reader import SlideReader, Thumbnail


@dataclass(frozen=True)
class TissueSettings:
    """How tissue is found. Lengths in µm, areas in mm²."""

    mpp: float = 8.0  # µm/px of the thumbnail the mask is computed on
    min_saturation: int = 20  # Otsu's threshold never goes below this (0-255 HSV saturation)
    blur_um: float = 40.0  # median filter before thresholding (removes dust and noise)
    close_um: float = 64.0  # morphological closing joins fragments of one piece of tissue
    min_area_mm2: float = 0.01  # smaller connected pieces are dropped
    max_hole_mm2: float = 0.01  # smaller holes inside tissue are filled

    def __post_init__(self) -> None:
        if self.mpp <= 0:
            raise ValueError(f'tissue mpp must be > 0, got {self.mpp}')
        for name in ('blur_um', 'close_um', 'min_area_mm2', 'max_hole_mm2'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and how its pixels map to level 0."""

    mask: np.ndarray  # (h, w) bool
    downsample: Tuple[float, float]  # level-0 px per mask px, (x, y)
    mpp: Tuple[float, float]  # µm per mask px, (x, y)

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * self.mpp[0] * self.mpp[1] * 1e-6


def _odd(px: float) -> int:
    return max(1, 2 * int(round(px / 2)) + 1)


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` without 8-connected components of fewer than ``min_px`` pixels."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # label 0 is the background
    return keep[labels]


def detect_tissue(rgb: np.ndarray, mpp: Tuple[float, float], settings: TissueSettings = TissueSettings()
                  ) -> np.ndarray:
    """Boolean tissue mask of an (h, w, 3) uint8 RGB image at ``mpp`` (x, y) µm/px."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f'expected an (h, w, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}')
    um = math.sqrt(mpp[0] * mpp[1])
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    blur = min(_odd(settings.blur_um / um), 255)
    if blur > 1:
        saturation = cv2.medianBlur(saturation, blur)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = saturation > max(otsu, settings.min_saturation)
    radius = _odd(settings.close_um / um)
    if radius > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (radius, radius))
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    px_per_mm2 = 1e6 / (mpp[0] * mpp[1])
    mask = _remove_small(mask, settings.min_area_mm2 * px_per_mm2)
    holes = _remove_small(~mask, settings.max_hole_mm2 * px_per_mm2)  # background pieces big enough to stay
    # Background touching the border is never a hole, whatever its size.
    _, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=8)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return ~(holes | outside)


def tissue_mask(reader: SlideReader, settings: TissueSettings = TissueSettings()) -> Tuple[TissueMask, Thumbnail]:
    """The tissue mask of a slide (from its thumbnail at ``settings.mpp``) and that thumbnail."""
    thumb = reader.thumbnail(settings.mpp)
    return TissueMask(detect_tissue(thumb.image, thumb.mpp, settings), thumb.downsample, thumb.mpp), thumb
