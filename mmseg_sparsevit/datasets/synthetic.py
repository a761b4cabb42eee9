"""Deterministic synthetic SegPath-like data for tests and CPU demos (no real data is reachable).

Tiles look H&E-like (``utils.he_tiles``: pink eosin background, purple nuclei) and the target cell
type of each antigen is drawn with its own colour and shape, so a short training run can learn it. The files
follow the SegPath layout exactly, and on purpose mix the two mask encodings ({0, 1} and
{0, 255}) and RGB/RGBA tiles so that every loader path is exercised.
"""
import gzip
import io
import os
import os.path as osp
import tarfile
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np

from mmseg_sparsevit.utils.he_tiles import LUMEN, add_noise, jitter, stroma

from .segpath import SEGPATH_ANTIGENS, SPLITS, get_antigen, tile_name, write_fileinfo

DEFAULT_DEMO_ANTIGENS = ('panCK', 'CD235a', 'CD3CD20')


class _Style(NamedTuple):
    shape: str  # 'gland', 'spindle', 'disc', 'nucleus' or 'ring'
    color: Tuple[int, int, int]  # RGB
    count: Tuple[int, int]  # objects per tile, [lo, hi)
    radius: Tuple[int, int]  # px at tile size 256, [lo, hi); scaled with the tile size


# How each cell type is drawn; colour and shape make it distinct from the generic nuclei.
_STYLES: Dict[str, _Style] = {
    'panCK': _Style('gland', (185, 85, 165), (2, 4), (24, 46)),
    'aSMA': _Style('spindle', (226, 78, 112), (6, 12), (18, 32)),
    'CD235a': _Style('disc', (214, 34, 44), (24, 48), (4, 7)),
    'CD45RB': _Style('nucleus', (70, 40, 140), (24, 48), (4, 7)),
    'CD3CD20': _Style('nucleus', (42, 22, 96), (28, 56), (3, 6)),
    'ERG': _Style('ring', (150, 38, 92), (5, 9), (10, 20)),
    'MIST1': _Style('nucleus', (112, 36, 176), (16, 36), (5, 8)),
    'MNDA': _Style('nucleus', (92, 62, 176), (16, 36), (5, 8)),
}
assert set(_STYLES) == set(SEGPATH_ANTIGENS), 'every SegPath antigen needs a demo style'


def _draw_target(img: np.ndarray, mask: np.ndarray, style: _Style, rng: np.random.Generator, scale: float) -> None:
    size = img.shape[0]
    radius = max(2, int(rng.integers(*style.radius) * scale))
    center = tuple(int(v) for v in rng.integers(0, size, 2))
    angle = int(rng.integers(0, 180))
    color = jitter(rng, style.color, 12)
    if style.shape == 'gland':
        angles = np.linspace(0, 2 * np.pi, 14, endpoint=False)
        radii = radius * rng.uniform(0.75, 1.25, angles.size)
        pts = np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], 1)
        pts = [pts.round().astype(np.int32)]
        cv2.fillPoly(img, pts, color)
        cv2.fillPoly(mask, pts, 1)
        for (x, y) in pts[0][::2]:  # epithelial nuclei lining the gland
            inner = (int(center[0] + 0.8 * (x - center[0])), int(center[1] + 0.8 * (y - center[1])))
            cv2.circle(img, inner, max(2, int(3 * scale)), jitter(rng, (80, 40, 130), 12), -1)
    elif style.shape == 'ring':
        axes = (radius, max(2, int(radius * rng.uniform(0.4, 0.8))))
        thickness = max(2, int(2.5 * scale))
        cv2.ellipse(img, center, axes, angle, 0, 360, LUMEN, -1)
        cv2.ellipse(img, center, axes, angle, 0, 360, color, thickness)
        cv2.ellipse(mask, center, axes, angle, 0, 360, 1, thickness)
    else:
        minor = {'spindle': 0.22, 'disc': 1.0, 'nucleus': 0.85}[style.shape]
        axes = (radius, max(1, int(radius * minor)))
        cv2.ellipse(img, center, axes, angle, 0, 360, color, -1)
        cv2.ellipse(mask, center, axes, angle, 0, 360, 1, -1)
        if style.shape == 'disc':  # pale centre of a biconcave red cell
            cv2.circle(img, center, max(1, radius // 3), jitter(rng, (235, 90, 100), 12), -1)


def render_tile(antigen: str, size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Draw one RGB tile and its {0, 1} mask of the antigen's target cells.

    A tile always shows the field of view of a real 984 px SegPath tile: ``size`` only sets the
    resolution, so object counts stay fixed and radii scale with it."""
    style = _STYLES[get_antigen(antigen).antigen]
    scale = size / 256
    img = stroma(size, rng, scale=scale)  # its nuclei are other cells, never in the mask
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(*style.count))):
        _draw_target(img, mask, style, rng, scale)
    return add_noise(img, rng, 5), mask


def demo_splits(n: int) -> List[str]:
    """Split of each of ``n`` tiles: about 2/3 train, 1/6 val, 1/6 test, at least one each."""
    if n < 3:
        raise ValueError(f'need at least 3 tiles per antigen (one per split), got {n}')
    n_held = max(1, round(n / 6))
    return ['train'] * (n - 2 * n_held) + ['val'] * n_held + ['test'] * n_held


def write_archive(src_dir: str, names: Sequence[str], archive_path: str, arcdir: str) -> None:
    """Pack files as ``{arcdir}/{name}`` into a tar.gz whose bytes depend only on the files."""
    with open(archive_path, 'wb') as raw, \
            gzip.GzipFile(filename='', mode='wb', fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode='w', format=tarfile.GNU_FORMAT) as tar:
        folder = tarfile.TarInfo(arcdir)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name in sorted(names):
            with open(osp.join(src_dir, name), 'rb') as f:
                data = f.read()
            info = tarfile.TarInfo(f'{arcdir}/{name}')
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def make_demo_data(data_root: str,
                   antigens: Sequence[str] = DEFAULT_DEMO_ANTIGENS,
                   tiles_per_antigen: int = 12,
                   tile_size: int = 256,
                   seed: int = 0,
                   archive_dir: Optional[str] = None) -> Dict[str, Dict[str, int]]:
    """Write demo tiles in the layout ``SegPathDataset`` reads; return tile counts per split.

    With ``archive_dir`` also write the download layout (``{antigen}_{CellType}.tar.gz`` and
    ``{antigen}_fileinfo.csv``) so ``prepare_segpath`` can be run end to end. Tile ``i`` of an
    antigen depends only on (seed, antigen, i): odd tiles store masks as {0, 255}, every third
    tile is RGBA.
    """
    counts = {}
    splits = demo_splits(tiles_per_antigen)
    for antigen in antigens:
        spec = get_antigen(antigen)
        out = osp.join(data_root, spec.antigen)
        os.makedirs(out, exist_ok=True)
        antigen_id = list(SEGPATH_ANTIGENS).index(spec.antigen)
        rows, names = [], []
        for i, split in enumerate(splits):
            img, mask = render_tile(spec.antigen, tile_size, np.random.default_rng((seed, antigen_id, i)))
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGRA if i % 3 == 2 else cv2.COLOR_RGB2BGR)
            mask = mask * 255 if i % 2 == 1 else mask
            x, y = 984 * (i % 4), 984 * (i // 4)
            for kind, array in (('HE', img), ('mask', mask)):
                name = tile_name(spec, 1 + i // 8, x, y, kind)
                if not cv2.imwrite(osp.join(out, name), array):
                    raise OSError(f'could not write {osp.join(out, name)}')
                names.append(name)
                rows.append({'filename': f'{spec.folder}/{name}', 'train_val_test': split})
        write_fileinfo(osp.join(out, spec.fileinfo), ['filename', 'train_val_test'], rows)
        if archive_dir is not None:
            os.makedirs(archive_dir, exist_ok=True)
            write_archive(out, names, osp.join(archive_dir, spec.archive), spec.folder)
            write_fileinfo(osp.join(archive_dir, spec.fileinfo), ['filename', 'train_val_test'], rows)
        counts[spec.antigen] = {s: splits.count(s) for s in SPLITS}
    return counts
