"""One reader for whole-slide images (the formats OpenSlide opens) and plain large images.

Callers speak in level-0 pixels (the scan's full resolution, the frame OpenSlide, QuPath and CLAM-style
``coords`` use) and in µm per pixel; the reader picks the pyramid level and resizes the rest, so the model
always sees the resolution it was trained at whatever the scanner wrote.
"""
import glob
import math
import os.path as osp
import warnings
from abc import ABC, abstractmethod
from typing import List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import openslide
import tifffile
from PIL import Image

Size = Tuple[int, int]  # (width, height), OpenSlide's order
# Plain images read whole into memory through PIL / tifffile (OpenSlide does not open them).
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
# Extensions of the formats OpenSlide reads (https://openslide.org/formats/), for folder listings. DICOM is left
# out: a DICOM slide is a folder of .dcm files, any one of which opens it (name that file).
SLIDE_SUFFIXES = ('.svs', '.ndpi', '.mrxs', '.scn', '.vms', '.vmu', '.bif', '.svslide', '.tif', '.tiff')
# A level whose downsample exceeds the wanted one by less than this still counts as fine enough (OpenSlide
# reports 15.86 for a 16x level of a side that is not a multiple of 16).
_LEVEL_TOLERANCE = 0.02
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre


class SlideReadError(RuntimeError):
    """A slide that cannot be opened or read; the message names the file."""


class Thumbnail(NamedTuple):
    """A whole-slide overview and how its pixels map to level 0."""

    image: np.ndarray  # (h, w, 3) uint8 RGB
    downsample: Tuple[float, float]  # level-0 px per thumbnail px, (x, y)
    mpp: Tuple[float, float]  # µm per thumbnail px, (x, y)


def resolve_mpp(path: str, metadata_mpp: Optional[Tuple[float, float]],
                slide_mpp: Optional[float]) -> Tuple[float, float]:
    """(x, y) µm per level-0 px: ``slide_mpp`` when given (it overrides the metadata), else the metadata."""
    if slide_mpp is not None:
        if slide_mpp <= 0:
            raise ValueError(f'slide_mpp must be > 0, got {slide_mpp}')
        if metadata_mpp is not None and abs(metadata_mpp[0] - slide_mpp) > 0.01 * slide_mpp:
            warnings.warn(f'{path}: --slide-mpp {slide_mpp} overrides the {metadata_mpp[0]:.4g} µm/px '
                          'of its metadata')
        return float(slide_mpp), float(slide_mpp)
    if metadata_mpp is None:
        raise SlideReadError(f'{path}: its metadata gives no µm/px (neither openslide.mpp-x/y nor TIFF '
                             'resolution tags); pass the scan resolution with --slide-mpp (e.g. 0.25 at 40x, '
                             '0.5 at 20x)')
    return metadata_mpp


class SlideReader(ABC):
    """Regions of one slide at any µm/px, with white where a region leaves the slide.

    Subclasses fill ``path``, ``level_dimensions`` ((w, h) per level, finest first), ``level_downsamples``
    and ``mpp`` ((x, y) µm per level-0 px), and implement :meth:`_read_level`.
    """

    path: str
    level_dimensions: Tuple[Size, ...]
    level_downsamples: Tuple[float, ...]
    mpp: Tuple[float, float]

    @abstractmethod
    def _read_level(self, x0: int, y0: int, level: int, size: Size) -> np.ndarray:
        """``size`` px of ``level`` whose top-left is level-0 px (x0, y0), as (h, w, 3) uint8 RGB."""

    def close(self) -> None:
        """Release the file handle."""

    def __enter__(self) -> 'SlideReader':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dimensions(self) -> Size:
        """Level-0 (width, height) in px."""
        return self.level_dimensions[0]

    def downsample_for(self, mpp: float) -> Tuple[float, float]:
        """Level-0 px per px at ``mpp`` µm/px, (x, y)."""
        if mpp <= 0:
            raise ValueError(f'mpp must be > 0, got {mpp}')
        return mpp / self.mpp[0], mpp / self.mpp[1]

    def best_level(self, downsample: float) -> int:
        """The coarsest level still at least as fine as ``downsample`` (the finest level at or below it)."""
        fine_enough = [i for i, d in enumerate(self.level_downsamples)
                       if d <= downsample * (1 + _LEVEL_TOLERANCE)]
        return max(fine_enough, key=lambda i: self.level_downsamples[i]) if fine_enough else 0

    def read_region(self, x0: int, y0: int, size: Size, mpp: float) -> np.ndarray:
        """``size`` = (w, h) px at ``mpp`` µm/px whose top-left is level-0 px (x0, y0); (h, w, 3) uint8 RGB.

        Reads the best pyramid level and resizes it (area-averaging when shrinking); when the level's
        downsample is the wanted one the pixels are returned unchanged."""
        w, h = size
        dx, dy = self.downsample_for(mpp)
        level = self.best_level(min(dx, dy))
        ds = self.level_downsamples[level]
        level_size = (max(1, round(w * dx / ds)), max(1, round(h * dy / ds)))
        region = self._read_level(int(x0), int(y0), level, level_size)
        if level_size != (w, h):
            shrink = level_size[0] > w or level_size[1] > h
            region = cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return region

    def thumbnail(self, mpp: float, max_side: int = 4096) -> Thumbnail:
        """The whole slide at ``mpp`` µm/px (coarser if a side would exceed ``max_side``), read in strips so
        that memory follows the thumbnail, not the level it is read from."""
        width, height = self.dimensions
        dx, dy = self.downsample_for(mpp)
        coarsen = max(1.0, width / dx / max_side, height / dy / max_side)
        mpp, dx, dy = mpp * coarsen, dx * coarsen, dy * coarsen
        out_w, out_h = max(1, math.ceil(width / dx)), max(1, math.ceil(height / dy))
        ds = self.level_downsamples[self.best_level(min(dx, dy))]
        strip = max(1, int(2 ** 26 / max(1.0, out_w * dx / ds) / max(1.0, dy / ds)))  # ~64 Mpx per level read
        rows = [self.read_region(0, round(r * dy), (out_w, min(strip, out_h - r)), mpp)
                for r in range(0, out_h, strip)]
        return Thumbnail(np.concatenate(rows, axis=0), (dx, dy), (mpp, mpp * self.mpp[1] / self.mpp[0]))


def _paste_white(x0: int, y0: int, size: Size, image: np.ndarray) -> np.ndarray:
    """The ``size`` window at (x0, y0) of ``image``, white outside it."""
    w, h = size
    out = np.full((h, w, 3), 255, np.uint8)
    x1, y1 = max(x0, 0), max(y0, 0)
    x2, y2 = min(x0 + w, image.shape[1]), min(y0 + h, image.shape[0])
    if x2 > x1 and y2 > y1:
        out[y1 - y0:y2 - y0, x1 - x0:x2 - x0] = image[y1:y2, x1:x2]
    return out


class OpenSlideReader(SlideReader):
    """Any format OpenSlide opens: SVS, NDPI, MRXS, SCN, generic tiled pyramidal TIFF, ..."""

    def __init__(self, path: str, slide_mpp: Optional[float] = None):
        self.path = path
        try:
            self._slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideReadError(f'{path}: OpenSlide cannot open it ({err})') from err
        self.level_dimensions = tuple(tuple(d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        metadata = None
        if openslide.PROPERTY_NAME_MPP_X in props and openslide.PROPERTY_NAME_MPP_Y in props:
            metadata = (float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y]))
        self.mpp = resolve_mpp(path, metadata, slide_mpp)
        background = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, 'FFFFFF')
        self._background = np.array([int(background[i:i + 2], 16) for i in (0, 2, 4)], np.uint16)
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, 'unknown')

    def _read_level(self, x0: int, y0: int, level: int, size: Size) -> np.ndarray:
        try:
            rgba = np.asarray(self._slide.read_region((x0, y0), level, size))
        except openslide.OpenSlideError as err:
            raise SlideReadError(f'{self.path}: reading {size} px of level {level} at level-0 ({x0}, {y0}) '
                                 f'failed ({err})') from err
        # Not premultiplied; alpha is 0 outside the scanned area: composite onto the slide's background.
        alpha = rgba[..., 3:].astype(np.uint16)
        rgb = (rgba[..., :3] * alpha + self._background * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


def _tiff_mpp(path: str) -> Optional[Tuple[float, float]]:
    """(x, y) µm/px from the first page's resolution tags, or None when absent or unit-less."""
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        unit = tags.get('ResolutionUnit')
        xres, yres = tags.get('XResolution'), tags.get('YResolution')
        if unit is None or int(unit.value) not in _UM_PER_UNIT or xres is None or yres is None:
            return None
        um = _UM_PER_UNIT[int(unit.value)]
        (xn, xd), (yn, yd) = xres.value, yres.value
        return (um * xd / xn, um * yd / yn) if xn and yn else None


class ImageReader(SlideReader):
    """A plain PNG / JPEG / TIFF image held in memory as one level (µm/px from TIFF tags or ``slide_mpp``)."""

    def __init__(self, path: str, slide_mpp: Optional[float] = None):
        self.path = path
        suffix = osp.splitext(path)[1].lower()
        try:
            if suffix in ('.tif', '.tiff'):
                image = tifffile.imread(path, key=0)
                metadata = _tiff_mpp(path)
            else:
                limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # slides are large by nature
                try:
                    with Image.open(path) as im:
                        image = np.asarray(im.convert('RGB'))
                finally:
                    Image.MAX_IMAGE_PIXELS = limit
                metadata = None  # PNG / JPEG dpi fields are screen defaults, not scan resolutions
        except (OSError, ValueError, tifffile.TiffFileError) as err:
            raise SlideReadError(f'{path}: cannot read the image ({err})') from err
        self._image = _as_rgb(path, image)
        self.level_dimensions = ((self._image.shape[1], self._image.shape[0]),)
        self.level_downsamples = (1.0,)
        self.mpp = resolve_mpp(path, metadata, slide_mpp)

    def _read_level(self, x0: int, y0: int, level: int, size: Size) -> np.ndarray:
        return _paste_white(x0, y0, size, self._image)


def _as_rgb(path: str, image: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) from grey, RGB or RGBA (alpha composited onto white)."""
    if image.dtype != np.uint8:
        raise SlideReadError(f'{path}: expected 8-bit pixels, got {image.dtype}')
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise SlideReadError(f'{path}: expected a grey, RGB or RGBA image, got shape {image.shape}')
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.uint16)
        return ((image[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def open_slide(path: str, slide_mpp: Optional[float] = None) -> SlideReader:
    """The reader for ``path``: OpenSlide when it recognises the file, else a plain image reader.

    ``slide_mpp`` (µm per level-0 px) overrides the metadata and is required when it has none."""
    if not osp.isfile(path):
        raise SlideReadError(f'{path}: no such file')
    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except (openslide.OpenSlideError, OSError):
        vendor = None
    if vendor is not None:
        return OpenSlideReader(path, slide_mpp)
    if osp.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return ImageReader(path, slide_mpp)
    raise SlideReadError(f'{path}: neither a slide OpenSlide recognises nor a {"/".join(IMAGE_SUFFIXES)} image')


def list_slides(inputs: Sequence[str]) -> List[str]:
    """Files named in ``inputs`` plus the slides and images found directly in folders among them, sorted."""
    found = []
    for item in inputs:
        if osp.isdir(item):
            found += sorted(p for p in glob.glob(osp.join(item, '*'))
                            if osp.splitext(p)[1].lower() in SLIDE_SUFFIXES + IMAGE_SUFFIXES and osp.isfile(p))
        else:
            found.append(item)
    return found
