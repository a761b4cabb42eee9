"""Packaging for mmseg_sparsevit.

torch, mmcv (built from source with ops) and the OpenMMLab packages are installed by
``make env`` (scripts/install_env.sh) in a fixed order; ``install_requires`` lists the
rest so that ``pip install .`` into a prepared environment pulls what is missing.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_requirements(name: str) -> list:
    lines = (ROOT / 'requirements' / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


version: dict = {}
exec((ROOT / 'mmseg_sparsevit' / 'version.py').read_text(), version)

setup(
    name='mmseg_sparsevit',
    version=version['__version__'],
    description='Windowed sparse attention and token pruning for ViT pathology foundation models '
                'in MMSegmentation 1.x',
    long_description=(ROOT / 'README.md').read_text() if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    # torch 2.14 (requirements/torch.txt) and timm 1.0.x need 3.10, and so do the ``X | None`` annotations
    # evaluated at import; tested on 3.11.
    python_requires='>=3.10',
    packages=find_packages(include=['mmseg_sparsevit', 'mmseg_sparsevit.*']),
    install_requires=read_requirements('runtime.txt') + read_requirements('mm.txt'),
    extras_require={'tests': read_requirements('tests.txt')},
)
