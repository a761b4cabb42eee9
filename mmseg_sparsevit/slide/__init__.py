"""Whole-slide images: reading at any µm/px, tissue detection, tiling, stitching and per-slide outputs.

The model-facing part (:mod:`.inference`, :mod:`.dataset`) needs torch and mmseg and is imported from its
module; everything here needs only numpy, OpenCV, OpenSlide and tifffile.
"""
from .reader import (IMAGE_SUFFIXES, SLIDE_SUFFIXES, ImageReader, OpenSlideReader, SlideReader, SlideReadError,
                     Thumbnail, list_slides, open_slide)
from .stitching import Block, Stitcher, blend_window, window_profile
from .tiling import TileGrid, check_tile_size, plan_tiles, tissue_fraction
from .tissue import TissueMask, TissueSettings, detect_tissue, tissue_mask
from .writers import (NOT_ANALYSED, atomic_path, class_polygons, geojson_features, overlay, pyramid_factors,
                      tiling_preview, write_geojson, write_json, write_png, write_pyramidal_tiff)

__all__ = [
    'IMAGE_SUFFIXES', 'SLIDE_SUFFIXES', 'ImageReader', 'OpenSlideReader', 'SlideReader', 'SlideReadError',
    'Thumbnail', 'list_slides', 'open_slide', 'Block', 'Stitcher', 'blend_window', 'window_profile', 'TileGrid',
    'check_tile_size', 'plan_tiles', 'tissue_fraction', 'TissueMask', 'TissueSettings', 'detect_tissue',
    'tissue_mask', 'NOT_ANALYSED', 'atomic_path', 'class_polygons', 'geojson_features', 'overlay',
    'pyramid_factors', 'tiling_preview', 'write_geojson', 'write_json', 'write_png', 'write_pyramidal_tiff',
]
