"""Per-slide outputs: a pyramidal class-map TIFF, QuPath GeoJSON, an overlay PNG and JSON files.

Every file is written under a temporary name in its final folder and renamed into place (``os.replace`` is
atomic on POSIX), so a killed run never leaves a truncated output that a later run would take as done. The
state a run saves to resume a slide goes the same way (:func:`write_state`, :func:`read_state`).
"""
import contextlib
import json
import logging
import math
import os
import os.path as osp
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tifffile
from mmengine.logging import print_log

RGB = Tuple[int, int, int]
NOT_ANALYSED = 255  # class-map value of pixels no tile covered (no tissue)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same extension); rename it to ``path`` when the block succeeds."""
    folder, name = osp.split(osp.abspath(path))
    stem, ext = osp.splitext(name)
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{stem}.tmp{os.getpid()}{ext}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def write_state(path: str, fingerprint: str, arrays: Dict[str, np.ndarray]) -> None:
    """Save a slide's partial state (``.npz``), tagged with the ``fingerprint`` of the run that made it, atomically."""
    with atomic_path(path) as tmp:
        np.savez(tmp, fingerprint=np.array(fingerprint), **arrays)


def read_state(path: str, fingerprint: str, required: Sequence[str] = ()) -> Optional[Dict[str, np.ndarray]]:
    """The arrays :func:`write_state` saved at ``path`` for a run with this ``fingerprint``.

    None when there is no such file, when another run (other settings or model) wrote it, or when it is
    damaged (unreadable, or without one of the ``required`` arrays): a warning names the file, and the slide
    starts afresh, since a damaged state costs only a restart."""
    if not osp.isfile(path):
        return None
    try:
        with np.load(path) as saved:  # pickles refused
            state = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        problem = f'{type(err).__name__}: {err}'
    else:
        if str(state.pop('fingerprint', None)) != fingerprint:
            return None
        missing = [name for name in required if name not in state]
        if not missing:
            return state
        problem = f'no {", ".join(missing)}'
    print_log(f'{path}: unreadable partial state ({problem}); starting the slide afresh', logger='current',
              level=logging.WARNING)
    return None


def write_json(path: str, data: Any) -> None:
    """``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(data, f, indent=2)
        f.write('\n')


def pyramid_factors(size: Tuple[int, int], tile: int = 256) -> List[int]:
    """Downsample factors 1, 2, 4, ... until the level fits in one tile."""
    factors = [1]
    while max(math.ceil(s / factors[-1]) for s in size) > tile:
        factors.append(factors[-1] * 2)
    return factors


def _tiles(image: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of an (h, w[, c]) array (which may be a strided view or a memmap), zero-padded."""
    for y in range(0, image.shape[0], tile):
        for x in range(0, image.shape[1], tile):
            part = np.asarray(image[y:y + tile, x:x + tile])
            if part.shape[:2] != (tile, tile):
                pad = [(0, tile - part.shape[0]), (0, tile - part.shape[1])] + [(0, 0)] * (part.ndim - 2)
                part = np.pad(part, pad)
            yield part


def write_pyramidal_tiff(path: str, image: np.ndarray, mpp: Tuple[float, float],
                         factors: Optional[Sequence[int]] = None, tile: int = 256,
                         palette: Optional[Sequence[RGB]] = None, smooth: bool = False) -> None:
    """Tiled pyramidal TIFF that OpenSlide opens as a ``generic-tiff`` slide, atomically.

    ``image`` is (h, w, 3) uint8 RGB, or (h, w) uint8 class indices written as a palette image when
    ``palette`` is given (so viewers show colours and readers get the indices). Levels are separate IFDs
    (OpenSlide does not read SubIFDs as levels) with their own resolution tags (µm/px x factor), zlib tiles.
    Reduced levels take every factor-th pixel (``smooth=False``, right for class indices and memory-light
    for memmaps) or are area-averaged (``smooth=True``, for photographs; needs the image in memory).
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f'{path}: expected an (h, w) or (h, w, 3) uint8 array, got {image.shape} {image.dtype}')
    factors = list(factors or pyramid_factors((image.shape[1], image.shape[0]), tile))
    kwargs: Dict[str, Any] = dict(photometric='rgb' if image.ndim == 3 else 'minisblack')
    if palette is not None:
        if image.ndim != 2:
            raise ValueError(f'{path}: a palette needs an (h, w) class-index image, got {image.shape}')
        colormap = np.zeros((3, 256), np.uint16)
        for i, color in enumerate(palette):
            colormap[:, i] = np.asarray(color, np.uint16) * 257
        kwargs = dict(photometric='palette', colormap=colormap)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=image.size > 2 ** 31) as tiff:
        level = image
        for i, factor in enumerate(factors):
            if smooth and i > 0:  # from the previous level: cheap, and as sharp as from level 0
                size = (math.ceil(image.shape[1] / factor), math.ceil(image.shape[0] / factor))
                level = cv2.resize(np.asarray(level), size, interpolation=cv2.INTER_AREA)
            elif i > 0:
                level = image[::factor, ::factor]
            tiff.write(_tiles(level, tile), shape=level.shape, dtype=np.uint8, tile=(tile, tile), compression='zlib',
                       resolution=(1e4 / (mpp[0] * factor), 1e4 / (mpp[1] * factor)),
                       resolutionunit='CENTIMETER', subfiletype=0 if i == 0 else 1, metadata=None, **kwargs)


def class_polygons(mask: np.ndarray, downsample: Tuple[float, float], min_area_px: float = 1.0
                   ) -> List[List[List[List[float]]]]:
    """Polygons (exterior ring, then hole rings) of a boolean mask, in level-0 px.

    Rings run through the centres of the boundary pixels of the mask (pixel (i, j) of the mask spans
    level-0 [j * dx, (j + 1) * dx) so its centre is (j + 0.5) * dx); pieces smaller than ``min_area_px``
    mask px (and single-pixel lines, which enclose nothing) are left out. Rings are closed."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    scale = np.asarray(downsample, np.float64)

    def ring(contour: np.ndarray) -> List[List[float]]:
        points = (contour[:, 0, :].astype(np.float64) + 0.5) * scale
        points = np.concatenate([points, points[:1]])
        return np.round(points, 2).tolist()

    polygons = []
    for i, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent != -1 or len(contours[i]) < 3 or cv2.contourArea(contours[i]) < max(min_area_px, 1e-9):
            continue
        rings = [ring(contours[i])]
        while child != -1:  # RETR_CCOMP: the children of an outer contour are its holes
            if len(contours[child]) >= 3 and cv2.contourArea(contours[child]) > 0:
                rings.append(ring(contours[child]))
            child = hierarchy[0][child][0]
        polygons.append(rings)
    return polygons


def geojson_features(class_map: np.ndarray, downsample: Tuple[float, float], classes: Sequence[str],
                     palette: Sequence[RGB], skip: Sequence[int] = (0,), min_area_px: float = 1.0
                     ) -> List[Dict[str, Any]]:
    """One QuPath annotation Feature per class present (a MultiPolygon in level-0 px), skipping ``skip``."""
    features = []
    for index, name in enumerate(classes):
        if index in skip:
            continue
        polygons = class_polygons(class_map == index, downsample, min_area_px)
        if not polygons:
            continue
        features.append({
            'type': 'Feature',
            'geometry': {'type': 'MultiPolygon', 'coordinates': polygons},
            'properties': {'objectType': 'annotation', 'name': name,
                           'classification': {'name': name, 'color': [int(c) for c in palette[index]]}},
        })
    return features


def write_geojson(path: str, features: List[Dict[str, Any]]) -> None:
    """A GeoJSON FeatureCollection (QuPath: File > Import objects), atomically."""
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump({'type': 'FeatureCollection', 'features': features}, f)


def sample_class_map(class_map: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (possibly memory-mapped) class map to ``size`` = (w, h)."""
    h, w = class_map.shape
    ys = np.minimum(((np.arange(size[1]) + 0.5) * h / size[1]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(size[0]) + 0.5) * w / size[0]).astype(np.int64), w - 1)
    return np.asarray(class_map[ys][:, xs])


def overlay(thumbnail: np.ndarray, class_map: np.ndarray, palette: Sequence[RGB], alpha: float = 0.5,
            skip: Sequence[int] = (0,)) -> np.ndarray:
    """The thumbnail (h, w, 3) RGB with class colours blended in (not for ``skip`` classes nor unanalysed)."""
    classes = sample_class_map(class_map, (thumbnail.shape[1], thumbnail.shape[0]))
    colors = np.zeros((256, 3), np.float32)
    colors[:len(palette)] = palette
    paint = np.isin(classes, [i for i in range(len(palette)) if i not in skip])
    out = thumbnail.astype(np.float32)
    out[paint] = (1 - alpha) * out[paint] + alpha * colors[classes[paint]]
    return out.round().astype(np.uint8)


def tiling_preview(view: np.ndarray, downsample: Tuple[float, float], tile_corners: np.ndarray,
                   tile_size: Tuple[float, float], tissue: Optional[np.ndarray] = None) -> np.ndarray:
    """The slide view (h, w, 3) with the tissue outline (green) and the tiles (blue) drawn on it.

    ``downsample``: level-0 px per view px; ``tile_corners`` (N, 2) and ``tile_size`` in level-0 px;
    ``tissue``: a boolean mask of any size covering the slide."""
    out = np.ascontiguousarray(view.copy())
    if tissue is not None:
        mask = cv2.resize(tissue.astype(np.uint8), (view.shape[1], view.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 160, 0), 2)
    scale = np.asarray(downsample, np.float64)
    for corner in np.asarray(tile_corners, np.float64):
        x0, y0 = np.round(corner / scale).astype(int)
        x1, y1 = np.round((corner + np.asarray(tile_size)) / scale).astype(int) - 1
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), (30, 60, 220), 1)
    return out


def write_png(path: str, rgb: np.ndarray) -> None:
    """An RGB array as PNG, atomically."""
    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f'could not write {path}')
