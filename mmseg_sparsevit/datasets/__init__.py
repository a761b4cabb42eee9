"""SegPath data support: dataset, mask loading, demo data and the prepare/validate logic."""
from .segpath import (SEGPATH_ANTIGENS, SPLITS, SegPathAntigen, SegPathDataset, binarize_segpath_mask, get_antigen,
                      parse_tile_name, read_fileinfo, tile_name)
from .transforms import LoadSegPathAnnotations

__all__ = [
    'SEGPATH_ANTIGENS', 'SPLITS', 'SegPathAntigen', 'SegPathDataset', 'LoadSegPathAnnotations', 'binarize_segpath_mask',
    'get_antigen', 'parse_tile_name', 'read_fileinfo', 'tile_name'
]
