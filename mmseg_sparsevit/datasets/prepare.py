"""Unpack and validate SegPath downloads into the layout ``SegPathDataset`` reads (no network).

Input: a folder with what the Zenodo records ship, per antigen ``{antigen}_{CellType}.tar.gz``
(or that archive already unpacked to ``{antigen}_{CellType}/``) and ``{antigen}_fileinfo.csv``.
Output: ``{data_root}/{antigen}/`` holding the tiles (archive folder flattened) and a cleaned copy
of the CSV that lists only tiles that passed every check, so training never meets a broken tile.
Every problem is reported naming its file; ``strict`` callers treat any problem as failure.
"""
import logging
import os
import os.path as osp
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import mmcv
import numpy as np
from mmengine.logging import print_log
from mmengine.utils import track_iter_progress
from PIL import Image

from .segpath import (HE_SUFFIX, MASK_SUFFIX, SEGPATH_ANTIGENS, SPLITS, SegPathAntigen, binarize_segpath_mask,
                      get_antigen, parse_tile_name, read_fileinfo, split_tile_name, write_fileinfo)

ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')


@dataclass
class AntigenReport:
    """What ``prepare_antigen`` found for one antigen."""
    antigen: str
    source: str = ''
    counts: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    problems: List[str] = field(default_factory=list)
    rgba_tiles: int = 0
    masks_0_255: int = 0
    normalised: int = 0

    @property
    def usable(self) -> int:
        return sum(self.counts.values())


@dataclass
class PrepareReport:
    antigens: List[AntigenReport]

    @property
    def usable(self) -> int:
        return sum(a.usable for a in self.antigens)

    @property
    def problems(self) -> List[str]:
        return [p for a in self.antigens for p in a.problems]

    def summary(self) -> str:
        lines = [f'{"antigen":<9} ' + ' '.join(f'{s:>6}' for s in SPLITS) + '  problems  RGBA  0/255  normalised']
        for a in self.antigens:
            lines.append(f'{a.antigen:<9} ' + ' '.join(f'{a.counts[s]:>6}' for s in SPLITS) +
                         f'  {len(a.problems):>8}  {a.rgba_tiles:>4}  {a.masks_0_255:>5}  {a.normalised:>10}')
        lines.append(f'{self.usable} usable tile(s), {len(self.problems)} problem(s)')
        return '\n'.join(lines)


def _strip_folder(member: tarfile.TarInfo, dest: str) -> Optional[tarfile.TarInfo]:
    """tarfile filter: keep regular files only, flattened to their base name, then apply 'data'."""
    name = member.name.rsplit('/', 1)[-1]
    if not member.isfile() or name.startswith('.'):  # folders, links, macOS '._*' companions
        return None
    return tarfile.data_filter(member.replace(name=name, deep=False), dest)


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def unpack_archive(archive: str, dest: str) -> bool:
    """Unpack ``archive`` flat into ``dest`` unless a marker says this exact file was done already.

    Returns whether anything was unpacked. The marker keeps a re-run from overwriting tiles that
    ``--normalise`` rewrote."""
    marker = osp.join(dest, f'.{osp.basename(archive)}.unpacked')
    stamp = str(os.path.getsize(archive))
    if osp.isfile(marker) and _read_text(marker) == stamp:
        print_log(f'{archive}: already unpacked into {dest}, skipped', logger='current')
        return False
    print_log(f'unpacking {archive} into {dest} ...', logger='current')
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter=_strip_folder)
    with open(marker, 'w') as f:
        f.write(stamp)
    return True


def link_folder(folder: str, dest: str) -> int:
    """Hard-link (or copy, across file systems) an already unpacked folder's files into ``dest``."""
    os.makedirs(dest, exist_ok=True)
    done = 0
    for name in sorted(os.listdir(folder)):
        src, dst = osp.join(folder, name), osp.join(dest, name)
        if name.startswith('.') or not osp.isfile(src) or osp.exists(dst):
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        done += 1
    return done


def _decode(path: str, flag: str, backends: Sequence[str]) -> Tuple[np.ndarray, str]:
    """(pixels as the first of ``backends`` decodes them, Pillow colour mode) of a PNG that passed every check
    a loader could trip on: the checksum of every chunk (Pillow's ``verify``, which catches a file cut short
    by a few bytes) and a full decode with each of ``backends`` ('cv2', 'pillow'), through ``mmcv.imfrombytes``
    as mmcv's and this package's loaders call it.

    Any exception a decoder raises (``OSError``, ``SyntaxError``, ``cv2.error``, ...) means the file cannot
    be trained on, so it becomes one ``ValueError`` that says what failed."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            im.verify()
        with open(path, 'rb') as f:
            content = f.read()
        decoded = [mmcv.imfrombytes(content, flag=flag, backend=backend) for backend in backends]
    except Exception as err:  # any decoder failure: see the docstring
        raise ValueError(f'{type(err).__name__}: {str(err).strip()}') from err
    if any(image is None for image in decoded):  # OpenCV returns None instead of raising
        raise ValueError('OpenCV cannot decode it: truncated or corrupt')
    return decoded[0], mode


def check_tile(he_path: str, mask_path: str, expected_size: int = 984) -> Tuple[List[str], bool, bool]:
    """Check one HE/mask pair; return (problems naming the files, HE is RGBA, mask is {0, 255}).

    Both files are decoded in full (see ``_decode``): the H&E tile by OpenCV, the decoder of
    ``LoadImageFromFile``'s default backend and the stricter one (Pillow decodes a PNG that lacks its last
    bytes), the small mask by Pillow (``LoadSegPathAnnotations``' default) and OpenCV, so a pair that passes
    here loads in training."""
    try:
        he, mode = _decode(he_path, 'color', ('cv2',))
    except ValueError as err:
        return [f'{he_path}: unreadable H&E tile ({err})'], False, False
    height, width = he.shape[:2]
    problems = []
    if mode not in ('RGB', 'RGBA'):
        problems.append(f'{he_path}: H&E tile has colour mode {mode}, expected RGB or RGBA')
    if expected_size and (width, height) != (expected_size, expected_size):
        problems.append(f'{he_path}: size {width}x{height}, expected {expected_size}x{expected_size}')
    try:
        mask, _ = _decode(mask_path, 'unchanged', ('pillow', 'cv2'))
    except ValueError as err:
        return problems + [f'{mask_path}: unreadable mask ({err})'], mode == 'RGBA', False
    try:
        binarize_segpath_mask(mask, mask_path)
    except ValueError as err:
        problems.append(str(err))
    if mask.shape[:2] != (height, width):
        problems.append(f'{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from '
                        f'H&E size {width}x{height} of {he_path}')
    return problems, mode == 'RGBA', mask.dtype == np.uint8 and mask.size > 0 and int(mask.max()) == 255


def _save_atomic(image: Image.Image, path: str) -> None:
    """Write next to ``path`` and rename, so a hard-linked source file is never modified."""
    tmp = osp.join(osp.dirname(path), f'.{osp.basename(path)}.tmp')
    image.save(tmp, format='PNG')
    os.replace(tmp, path)


def normalise_tile(he_path: str, mask_path: str, rgba: bool, mask_0_255: bool) -> None:
    """Rewrite an RGBA tile as RGB (alpha dropped, as the loaders do) and a {0, 255} mask as {0, 1}."""
    if rgba:
        with Image.open(he_path) as im:
            rgb = im.convert('RGB')
        _save_atomic(rgb, he_path)
    if mask_0_255:
        with Image.open(mask_path) as im:
            mask = binarize_segpath_mask(np.asarray(im), mask_path)
        _save_atomic(Image.fromarray(mask), mask_path)


@dataclass
class TileResult:
    """What checking (and optionally normalising) one listed tile pair found."""
    problems: List[str]
    rgba: bool = False
    mask_0_255: bool = False
    normalised: bool = False


def _check_and_normalise(task: Tuple[str, str, int, bool]) -> TileResult:
    """One unit of work for the process pool (module level, so it pickles): check, then normalise."""
    he_path, mask_path, expected_size, normalise = task
    problems, rgba, mask_0_255 = check_tile(he_path, mask_path, expected_size)
    result = TileResult(problems, rgba, mask_0_255)
    if normalise and not problems and (rgba or mask_0_255):
        normalise_tile(he_path, mask_path, rgba=rgba, mask_0_255=mask_0_255)
        result.normalised = True
    return result


def default_workers() -> int:
    """Worker processes used when none are asked for: the CPUs this process may run on, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, min(8, cpus))


def check_tiles(tasks: Sequence[Tuple[str, str, int, bool]], workers: int) -> List[TileResult]:
    """``_check_and_normalise`` over ``tasks`` in order, in ``workers`` processes, with a progress bar.

    Results come back in task order whatever ``workers`` is, so the report does not depend on it."""
    if workers <= 1 or len(tasks) < 2:
        return [_check_and_normalise(t) for t in track_iter_progress(list(tasks))]
    chunksize = max(1, min(32, len(tasks) // (4 * workers)))
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        results = pool.map(_check_and_normalise, tasks, chunksize=chunksize)
        return list(track_iter_progress((results, len(tasks))))


def _find_source(src_dir: str, spec: SegPathAntigen) -> Tuple[Optional[str], Optional[str]]:
    """(archive or unpacked folder, split CSV) for ``spec`` in the download folder, None if absent."""
    source = next((osp.join(src_dir, spec.folder + s) for s in ARCHIVE_SUFFIXES
                   if osp.isfile(osp.join(src_dir, spec.folder + s))), None)
    if source is None and osp.isdir(osp.join(src_dir, spec.folder)):
        source = osp.join(src_dir, spec.folder)
    csv_path = next((osp.join(src_dir, spec.fileinfo + s) for s in ('', '.gz')
                     if osp.isfile(osp.join(src_dir, spec.fileinfo + s))), None)
    return source, csv_path


def _list_tiles(out: str, spec: SegPathAntigen, problems: List[str]) -> Dict[str, Dict[str, str]]:
    """Tile files in ``out`` as kind -> stem -> path; anything else is reported."""
    found: Dict[str, Dict[str, str]] = {'HE': {}, 'mask': {}}
    for name in sorted(os.listdir(out)):
        path = osp.join(out, name)
        if name.startswith('.') or name == spec.fileinfo or not osp.isfile(path):
            continue
        try:
            parsed = parse_tile_name(name)
        except ValueError:
            problems.append(f'{path}: unexpected file (not a SegPath tile name)')
            continue
        if (parsed.antigen, parsed.cell_type) != (spec.antigen, spec.cell_type):
            problems.append(f'{path}: tile of {parsed.antigen}_{parsed.cell_type} in the {spec.antigen} folder')
            continue
        stem, kind = split_tile_name(name)
        found[kind][stem] = path
    return found


def prepare_antigen(src_dir: str, data_root: str, spec: SegPathAntigen, expected_size: int = 984,
                    normalise: bool = False, workers: int = 1) -> AntigenReport:
    """Unpack, validate (decoding in ``workers`` processes) and optionally normalise one antigen; write its
    cleaned split CSV."""
    report = AntigenReport(spec.antigen)
    out = osp.join(data_root, spec.antigen)
    source, csv_path = _find_source(src_dir, spec)
    if source is None:
        report.problems.append(f'{osp.join(src_dir, spec.archive)}: archive missing '
                               f'(nor an unpacked folder {osp.join(src_dir, spec.folder)})')
    elif osp.isdir(source):
        link_folder(source, out)
    else:
        unpack_archive(source, out)
    report.source = source or ''
    cleaned_csv = osp.join(out, spec.fileinfo)
    try:
        if csv_path is None:
            raise ValueError(f'{osp.join(src_dir, spec.fileinfo)}: split CSV missing, no tile is usable')
        info = read_fileinfo(csv_path)
    except ValueError as err:
        report.problems.append(str(err))
        if osp.isfile(cleaned_csv):  # a stale CSV from an earlier run would still feed the dataset
            os.remove(cleaned_csv)
        return report
    report.problems.extend(info.problems)
    if not osp.isdir(out):
        return report

    found = _list_tiles(out, spec, report.problems)
    listed = set(info.tiles) | set(info.rejected_stems)  # a bad split row was reported already
    for kind in ('HE', 'mask'):
        for stem in sorted(set(found[kind]) - listed):
            report.problems.append(f'{found[kind][stem]}: file has no row in {csv_path}')
    present = []
    for stem, split in info.tiles.items():
        paths = (osp.join(out, stem + HE_SUFFIX), osp.join(out, stem + MASK_SUFFIX))
        missing = [p for p in paths if not osp.isfile(p)]
        report.problems.extend(f'{p}: listed in {csv_path} ({split}) but missing' for p in missing)
        if not missing:
            present.append((stem, split, paths))
    print_log(f'{spec.antigen}: decoding {len(present)} tile pair(s) listed in {csv_path} '
              f'with {workers} worker process(es)', logger='current')
    results = check_tiles([(*paths, expected_size, normalise) for _, _, paths in present], workers)
    usable = set()
    for (stem, split, _), result in zip(present, results):
        report.rgba_tiles += result.rgba
        report.masks_0_255 += result.mask_0_255
        report.normalised += result.normalised
        report.problems.extend(result.problems)
        if not result.problems:
            usable.add(stem)
            report.counts[split] += 1
    rows = [row for row, stem in zip(info.rows, info.row_stems) if stem in usable]
    write_fileinfo(cleaned_csv, info.fieldnames, rows)
    return report


def prepare_segpath(src_dir: str,
                    data_root: str,
                    antigens: Optional[Sequence[str]] = None,
                    expected_size: int = 984,
                    normalise: bool = False,
                    workers: Optional[int] = None) -> PrepareReport:
    """Prepare every antigen found in ``src_dir`` (or exactly ``antigens``) into ``data_root``.

    Antigens not named and absent from ``src_dir`` are skipped quietly; named ones that are absent
    are reported as problems. ``expected_size`` 0 disables the tile-size check. ``workers`` processes
    decode the tiles (default ``default_workers()``); the report is the same for any number."""
    if not osp.isdir(src_dir):
        raise FileNotFoundError(f'SegPath download folder not found: {src_dir}')
    specs = [get_antigen(a) for a in antigens] if antigens else list(SEGPATH_ANTIGENS.values())
    reports = []
    for spec in specs:
        if not antigens and _find_source(src_dir, spec) == (None, None):
            continue
        reports.append(prepare_antigen(src_dir, data_root, spec, expected_size, normalise,
                                       default_workers() if workers is None else workers))
    if not reports:
        print_log(f'{src_dir}: no SegPath archive, unpacked folder or fileinfo CSV found', logger='current',
                  level=logging.WARNING)
    report = PrepareReport(reports)
    for problem in report.problems:
        print_log(problem, logger='current', level=logging.WARNING)
    print_log('SegPath preparation report\n' + report.summary(), logger='current')
    return report
