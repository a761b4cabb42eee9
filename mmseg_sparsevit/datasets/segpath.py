"""SegPath (Komura et al., Patterns 2023): antigen table, file names, split CSVs and the dataset.

SegPath ships one archive per antibody. Every tile is labelled for ONE cell type only, so each
antigen is its own binary task (background vs that cell type). This module is the single source
of truth for the eight antigens; configs, ``prepare.py`` and ``synthetic.py`` read it from here.

Facts taken from public loaders of the Zenodo records (torch_em, eva):

- archive ``{antigen}_{CellType}.tar.gz`` unpacks to a folder ``{antigen}_{CellType}/`` holding
  ``{antigen}_{CellType}_{slide}_{x}_{y}_HE.png`` and ``..._mask.png``
  (e.g. ``ERG_Endothelium_024_067584_052224_HE.png``);
- ``{antigen}_fileinfo.csv`` has the columns ``filename`` (``{antigen}_{CellType}/<tile>.png``)
  and ``train_val_test`` (``train``/``val``/``test``); it may list mask rows beside HE rows and
  is sometimes gzip-compressed.

The reader below accepts a few other column spellings (case-insensitive) and matches tiles by
base name, so a CSV with or without the folder prefix works.
"""
import csv
import gzip
import io
import os.path as osp
import re
from typing import AbstractSet, Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

SPLITS = ('train', 'val', 'test')
HE_SUFFIX = '_HE.png'
MASK_SUFFIX = '_mask.png'

# Accepted spellings (lower case) of the two CSV columns; the first is the real one.
FILENAME_COLUMNS = ('filename', 'file_name', 'file', 'filepath', 'path', 'image')
SPLIT_COLUMNS = ('train_val_test', 'split', 'set', 'subset')
_SPLIT_ALIASES = {'training': 'train', 'valid': 'val', 'validation': 'val', 'testing': 'test'}


class SegPathAntigen(NamedTuple):
    """One SegPath record: the antibody and the cell type its mask marks."""
    antigen: str  # spelling in file names, e.g. 'panCK'
    cell_type: str  # spelling in file names, e.g. 'Epithelium'
    class_name: str  # class name in dataset metainfo
    zenodo_record: int
    color: Tuple[int, int, int]  # palette entry (RGB) for the foreground class

    @property
    def folder(self) -> str:
        """Folder the archive unpacks to, also the file-name prefix of every tile."""
        return f'{self.antigen}_{self.cell_type}'

    @property
    def archive(self) -> str:
        return f'{self.folder}.tar.gz'

    @property
    def fileinfo(self) -> str:
        return f'{self.antigen}_fileinfo.csv'


SEGPATH_ANTIGENS: Dict[str, SegPathAntigen] = {
    a.antigen: a
    for a in (
        SegPathAntigen('panCK', 'Epithelium', 'epithelium', 7412731, (220, 60, 160)),
        SegPathAntigen('aSMA', 'SmoothMuscle', 'smooth muscle', 7412732, (240, 120, 40)),
        SegPathAntigen('CD235a', 'RBC', 'red blood cell', 7412580, (220, 20, 30)),
        SegPathAntigen('CD45RB', 'Leukocyte', 'leukocyte', 7412739, (40, 120, 240)),
        SegPathAntigen('CD3CD20', 'Lymphocyte', 'lymphocyte', 7412529, (60, 40, 200)),
        SegPathAntigen('ERG', 'Endothelium', 'endothelium', 7412512, (40, 200, 200)),
        SegPathAntigen('MIST1', 'PlasmaCell', 'plasma cell', 7412500, (160, 60, 240)),
        SegPathAntigen('MNDA', 'MyeloidCell', 'myeloid cell', 7412690, (60, 200, 80)),
    )
}


def get_antigen(name: str) -> SegPathAntigen:
    """Look up an antigen by antibody ('panCK'), cell type ('Epithelium', 'epithelium') or
    archive folder ('panCK_Epithelium'), case-insensitively."""
    key = name.strip().lower()
    for spec in SEGPATH_ANTIGENS.values():
        if key in {spec.antigen.lower(), spec.cell_type.lower(), spec.class_name, spec.folder.lower()}:
            return spec
    choices = ', '.join(f'{a.antigen} ({a.class_name})' for a in SEGPATH_ANTIGENS.values())
    raise KeyError(f'unknown SegPath antigen or cell type {name!r}; choose one of {choices}')


class SegPathTileName(NamedTuple):
    antigen: str
    cell_type: str
    slide: str
    x: int
    y: int
    kind: str  # 'HE' or 'mask'


_TILE_RE = re.compile(r'^(?P<antigen>[^_/]+)_(?P<cell_type>[^_/]+)_(?P<slide>[^/]+)_(?P<x>\d+)_(?P<y>\d+)'
                      r'_(?P<kind>HE|mask)\.png$')


def tile_name(spec: SegPathAntigen, slide: int, x: int, y: int, kind: str) -> str:
    """File name of a tile in the SegPath convention (zero-padded like the released files)."""
    return f'{spec.folder}_{slide:03d}_{x:06d}_{y:06d}_{kind}.png'


def parse_tile_name(name: str) -> SegPathTileName:
    """Split ``{antigen}_{CellType}_{slide}_{x}_{y}_{HE|mask}.png`` (a leading folder is ignored)."""
    match = _TILE_RE.match(name.replace('\\', '/').rsplit('/', 1)[-1])
    if match is None:
        raise ValueError(f'{name!r} is not a SegPath tile name '
                         '({antigen}_{CellType}_{slide}_{x}_{y}_HE.png or ..._mask.png)')
    d = match.groupdict()
    return SegPathTileName(d['antigen'], d['cell_type'], d['slide'], int(d['x']), int(d['y']), d['kind'])


def split_tile_name(name: str) -> Tuple[str, str]:
    """Return (stem, kind) of a tile file name from its suffix alone; kind is 'HE' or 'mask'.

    Suffix-based on purpose: the split CSV must not be rejected over an unusual slide id."""
    base = name.replace('\\', '/').rsplit('/', 1)[-1]
    for suffix, kind in ((HE_SUFFIX, 'HE'), (MASK_SUFFIX, 'mask')):
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[:-len(suffix)], kind
    raise ValueError(f'{name!r} ends neither in {HE_SUFFIX} nor in {MASK_SUFFIX}')


class FileInfo(NamedTuple):
    """A parsed ``{antigen}_fileinfo.csv``."""
    path: str
    fieldnames: List[str]
    rows: List[Dict[str, str]]  # original rows, in file order
    row_stems: List[Optional[str]]  # tile stem of each row (None for rows that name no tile)
    tiles: Dict[str, str]  # tile stem -> split, first-seen order
    problems: List[str]  # bad rows, each naming the CSV, the line and the value
    rejected_stems: AbstractSet[str] = frozenset()  # tiles named only by rows with an unknown split


def _find_column(fieldnames: Sequence[str], accepted: Sequence[str], path: str, what: str) -> str:
    lowered = {f.strip().lower(): f for f in fieldnames}
    for name in accepted:
        if name in lowered:
            return lowered[name]
    raise ValueError(f'{path}: no {what} column; found columns {list(fieldnames)}, '
                     f'expected one of {list(accepted)} (case-insensitive)')


def read_fileinfo(path: str) -> FileInfo:
    """Read a SegPath split CSV (plain or gzip) into tile stem -> split.

    Structural faults (missing file, no usable column) raise; row-level faults (unknown split,
    a name that is no tile, a tile listed under two splits) are collected in ``problems`` so the
    prepare tool can report all of them at once. A tile whose HE and mask rows share an unknown split
    is one problem naming both lines."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'SegPath split CSV not found: {path}')
    with open(path, 'rb') as f:
        raw = f.read()
    if raw[:2] == b'\x1f\x8b':
        raw = gzip.decompress(raw)
    reader = csv.DictReader(io.StringIO(raw.decode('utf-8-sig')))
    fieldnames = list(reader.fieldnames or [])
    name_col = _find_column(fieldnames, FILENAME_COLUMNS, path, 'file name')
    split_col = _find_column(fieldnames, SPLIT_COLUMNS, path, 'split')
    rows, row_stems, tiles, problems = [], [], {}, []
    rejected: Dict[str, int] = {}  # stem -> index of its unknown-split problem
    for line, row in enumerate(reader, start=2):
        rows.append(row)
        row_stems.append(None)
        filename = (row.get(name_col) or '').strip()
        split = (row.get(split_col) or '').strip().lower()
        split = _SPLIT_ALIASES.get(split, split)
        try:
            stem, _ = split_tile_name(filename)
        except ValueError as err:
            problems.append(f'{path}:{line}: {err}')
            continue
        if split not in SPLITS:
            if stem in rejected:
                problems[rejected[stem]] += f'; line {line} ({filename}) too'
            else:
                rejected[stem] = len(problems)
                problems.append(f'{path}:{line}: {filename}: unknown split {row.get(split_col)!r}, '
                                f'expected one of {SPLITS}')
            continue
        if tiles.setdefault(stem, split) != split:
            problems.append(f'{path}:{line}: {filename}: split {split!r} conflicts with '
                            f'{tiles[stem]!r} given earlier for the same tile')
            continue
        row_stems[-1] = stem
    return FileInfo(path, fieldnames, rows, row_stems, tiles, problems, frozenset(set(rejected) - set(tiles)))


def write_fileinfo(path: str, fieldnames: Sequence[str], rows: Sequence[Dict[str, str]]) -> None:
    """Write a split CSV; the one writer for generated and cleaned CSVs, so their bytes agree."""
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)


def binarize_segpath_mask(mask: np.ndarray, path: str) -> np.ndarray:
    """Map a SegPath mask encoded as {0, 1} or {0, 255} to uint8 {0, 1}.

    Both encodings occur in the release; anything else (other values, several channels) means a
    broken or foreign file, so raise naming it rather than guess a threshold."""
    if mask.ndim != 2:
        raise ValueError(f'{path}: SegPath mask must be single-channel, got shape {mask.shape}')
    if mask.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        values = np.unique(mask)
    present = set(values.tolist())
    if present <= {0, 1}:
        return mask.astype(np.uint8, copy=False)
    if present <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    shown = sorted(present)[:8]
    raise ValueError(f'{path}: SegPath mask values {shown}{" ..." if len(present) > 8 else ""} '
                     'are neither {0, 1} nor {0, 255}')


@DATASETS.register_module()
class SegPathDataset(BaseSegDataset):
    """One SegPath antigen as a binary task: class 0 background, class 1 its cell type.

    Layout (written by ``tools/prepare_segpath.py`` and ``tools/make_demo_data.py``)::

        {data_root}/{antigen}/{antigen}_fileinfo.csv
        {data_root}/{antigen}/{antigen}_{CellType}_{slide}_{x}_{y}_HE.png
        {data_root}/{antigen}/{antigen}_{CellType}_{slide}_{x}_{y}_mask.png

    The dataset only lists the ``split`` tiles of the CSV and checks both files exist; it reads
    no pixels. Decoding is the pipeline's job: ``LoadImageFromFile`` (``color_type='color'``, the
    default) gives 3-channel images for RGB and RGBA tiles alike, and ``LoadSegPathAnnotations``
    turns both mask encodings into {0, 1}. Metainfo classes are ``('background', class_name)``.

    Args:
        antigen: antibody ('panCK') or cell type ('epithelium'), see ``SEGPATH_ANTIGENS``.
        split: 'train', 'val' or 'test', matched against the CSV split column.
        ann_file: the split CSV; defaults to ``{antigen}/{antigen}_fileinfo.csv`` under data_root.
        **kwargs: passed to ``BaseSegDataset`` (data_root, pipeline, test_mode, ...).
    """
    # Classes depend on the antigen, so they are set per instance (see __init__).
    METAINFO: dict = dict()

    def __init__(self,
                 antigen: str,
                 split: str = 'train',
                 ann_file: str = '',
                 metainfo: Optional[dict] = None,
                 data_prefix: Optional[dict] = None,
                 **kwargs) -> None:
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        self.segpath = get_antigen(antigen)
        self.split = split
        name = self.segpath.antigen
        metainfo = {
            'classes': ('background', self.segpath.class_name),
            'palette': [[0, 0, 0], list(self.segpath.color)],
            **(metainfo or {}),
        }
        super().__init__(
            ann_file=ann_file or osp.join(name, self.segpath.fileinfo),
            img_suffix=HE_SUFFIX,
            seg_map_suffix=MASK_SUFFIX,
            metainfo=metainfo,
            data_prefix=data_prefix or dict(img_path=name, seg_map_path=name),
            **kwargs)

    def load_data_list(self) -> List[dict]:
        info = read_fileinfo(self.ann_file)
        if info.problems:
            raise ValueError(f'{self.ann_file} has {len(info.problems)} bad row(s) '
                             '(run tools/prepare_segpath.py to clean it):\n' + '\n'.join(info.problems[:10]))
        img_dir = self.data_prefix.get('img_path') or ''
        ann_dir = self.data_prefix.get('seg_map_path') or ''
        data_list = []
        for stem, split in info.tiles.items():
            if split != self.split:
                continue
            img_path = osp.join(img_dir, stem + self.img_suffix)
            seg_map_path = osp.join(ann_dir, stem + self.seg_map_suffix)
            for path in (img_path, seg_map_path):
                if not osp.isfile(path):
                    raise FileNotFoundError(f'{path} is listed in {self.ann_file} ({split} split) but does not exist')
            data_list.append(
                dict(img_path=img_path, seg_map_path=seg_map_path, label_map=self.label_map,
                     reduce_zero_label=self.reduce_zero_label, seg_fields=[]))
        if not data_list:
            raise ValueError(f'{self.ann_file} lists no {self.split!r} tiles for {self.segpath.antigen}')
        return data_list

    def prepare_data(self, idx: int) -> Any:
        """Run the pipeline on tile ``idx``; an error that does not name the tile's files gets them prepended.

        mmcv's image loader names nothing for an empty tile (OpenCV: ``!buf.empty()``) or for any broken
        tile with the Pillow backend (``cannot identify image file <_io.BytesIO ...>``). The exception keeps
        its type where it can be rebuilt from a message."""
        try:
            return super().prepare_data(idx)
        except Exception as err:
            info = self.get_data_info(idx)
            files = (info['img_path'], info['seg_map_path'])
            if any(path in str(err) for path in files):
                raise
            message = f'{files[0]} (mask {files[1]}): {type(err).__name__}: {str(err).strip()}'
            try:
                named = type(err)(message)
            except Exception:  # an exception type that needs other arguments
                named = RuntimeError(message)
            raise named from err
