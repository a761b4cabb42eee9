"""Build mmcv (full, with compiled ops) from its source distribution, cached as a wheel.

mmcv publishes no binary wheels on PyPI, and mmcv 2.1's ``setup.py`` hard-codes
``-std=c++17`` although torch >= 2.10 headers need C++20. This script downloads the
sdist, switches the C++ standard to the one the installed torch needs, builds a
wheel with ``MMCV_WITH_OPS=1`` (CUDA ops only when torch sees a GPU) and keeps it in a
cache keyed by mmcv/torch/CUDA/Python/platform, so the next install takes seconds.

Run with the interpreter of the target environment (torch must already be installed).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def torch_build_key() -> tuple[str, str, bool]:
    """Return (torch version without local tag, 'cpu' or 'cuXY', whether CUDA ops are built)."""
    import torch

    version = torch.__version__.split('+')[0]
    with_cuda = torch.cuda.is_available() and torch.version.cuda is not None
    flavour = 'cu' + torch.version.cuda.replace('.', '') if with_cuda else 'cpu'
    return version, flavour, with_cuda


def required_cxx_standard(torch_version: str) -> str:
    """The C++ standard torch's headers compile under (C++20 from torch 2.10 on)."""
    major, minor = (int(p) for p in re.findall(r'\d+', torch_version)[:2])
    return 'c++20' if (major, minor) >= (2, 10) else 'c++17'


def run(cmd: list[str], **kwargs) -> None:
    print('+', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def download_sdist(version: str, dest: Path) -> Path:
    run([sys.executable, '-m', 'pip', 'download', '--disable-pip-version-check', '--no-deps',
         '--no-binary', ':all:', '--no-build-isolation', f'mmcv=={version}', '-d', str(dest)])
    archives = sorted(dest.glob(f'mmcv-{version}.tar.gz'))
    if not archives:
        raise SystemExit(f'pip download did not produce mmcv-{version}.tar.gz in {dest}')
    return archives[0]


def patch_cxx_standard(setup_py: Path, std: str) -> None:
    text = setup_py.read_text()
    patched, count = re.subn(r'-std=c\+\+\d+', f'-std={std}', text)
    if count == 0:
        raise SystemExit(f'{setup_py}: found no "-std=c++NN" flag to switch to {std}; '
                         'the mmcv release layout changed, update scripts/build_mmcv.py')
    setup_py.write_text(patched)
    print(f'patched {count} C++ standard flag(s) in {setup_py.name} to -std={std}')


def build_wheel(version: str, out_dir: Path, with_cuda: bool, std: str) -> Path:
    with tempfile.TemporaryDirectory(prefix='mmcv-build-') as tmp:
        tmp_path = Path(tmp)
        archive = download_sdist(version, tmp_path)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path, filter='data')
        src = tmp_path / f'mmcv-{version}'
        patch_cxx_standard(src / 'setup.py', std)
        env = dict(os.environ, MMCV_WITH_OPS='1', FORCE_CUDA='1' if with_cuda else '0')
        run([sys.executable, '-m', 'pip', 'wheel', '--disable-pip-version-check', '--no-deps',
             '--no-build-isolation', '-w', str(tmp_path / 'dist'), str(src)], env=env)
        wheels = sorted((tmp_path / 'dist').glob('mmcv-*.whl'))
        if not wheels:
            raise SystemExit('pip wheel finished without producing an mmcv wheel')
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
        return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--version', default='2.1.0', help='mmcv release to build')
    parser.add_argument('--cache', type=Path, default=Path.home() / '.cache' / 'mmseg_sparsevit')
    parser.add_argument('--rebuild', action='store_true', help='ignore a cached wheel')
    args = parser.parse_args()

    torch_version, flavour, with_cuda = torch_build_key()
    py_tag = f'cp{sys.version_info.major}{sys.version_info.minor}'
    key = f'mmcv{args.version}-torch{torch_version}-{flavour}-{py_tag}-{platform.machine()}'
    cache_dir = args.cache / 'wheels' / key
    cached = sorted(cache_dir.glob('mmcv-*.whl'))
    if cached and not args.rebuild:
        print(f'using cached wheel {cached[0]}')
        wheel = cached[0]
    else:
        std = required_cxx_standard(torch_version)
        print(f'building mmcv {args.version} for torch {torch_version} ({flavour}, -std={std}); '
              f'this takes ~10 min on 2 cores, once per machine')
        wheel = build_wheel(args.version, cache_dir, with_cuda, std)
        print(f'cached {wheel}')
    run([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check', str(wheel)])


if __name__ == '__main__':
    main()
