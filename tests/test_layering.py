"""The classification and benchmark parts need only torch, timm and mmengine, never mmseg / mmcv / mmdet.

Two checks: every module of those packages imports in a fresh interpreter with the OpenMMLab stack hidden
(this covers what their package ``__init__`` files pull in), and no module names mmseg, mmcv, mmdet or a
subpackage of this project that needs them in any import statement, including ones inside functions
(which an import alone does not run).
"""
import ast
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / 'mmseg_sparsevit'
TORCH_LEVEL = ('classification', 'benchmark')
OPENMMLAB = ('mmseg', 'mmcv', 'mmdet')
# Subpackages of this project that import mmseg (registries, mmengine runners over mmseg configs).
NEEDS_MMSEG = ('mmseg_sparsevit.datasets', 'mmseg_sparsevit.evaluation', 'mmseg_sparsevit.cli')


def torch_level_modules() -> List[Tuple[str, Path]]:
    """(dotted name, file) of every module under the torch-level packages."""
    modules = []
    for package in TORCH_LEVEL:
        for path in sorted((PACKAGE / package).rglob('*.py')):
            parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
            modules.append(('.'.join(parts[:-1] if parts[-1] == '__init__' else parts), path))
    return modules


def imported_names(module: str, path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import statement in the file, relative ones resolved."""
    package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split('.')
            base = base[:len(base) - node.level + 1] if node.level else []
            name = '.'.join(base + ([node.module] if node.module else []))
            yield node.lineno, name
            yield from ((node.lineno, f'{name}.{alias.name}') for alias in node.names)


def test_torch_level_packages_have_modules():
    names = [name for name, _ in torch_level_modules()]
    assert {'mmseg_sparsevit.classification', 'mmseg_sparsevit.classification.sweep',
            'mmseg_sparsevit.benchmark', 'mmseg_sparsevit.benchmark.worker'} <= set(names)


@pytest.mark.parametrize('module,path', torch_level_modules(), ids=lambda v: v if isinstance(v, str) else '')
def test_no_import_statement_names_openmmlab(module, path):
    bad = [f'{path}:{line}: {name}' for line, name in imported_names(module, path)
           if name.split('.')[0] in OPENMMLAB or any(name == p or name.startswith(p + '.') for p in NEEDS_MMSEG)]
    assert not bad, 'imports that need MMSegmentation:\n' + '\n'.join(bad)


def test_import_statements_are_resolved():
    # The check above is only as good as the resolution of relative imports: spot-check it.
    sweep = PACKAGE / 'classification' / 'sweep.py'
    names = {name for _, name in imported_names('mmseg_sparsevit.classification.sweep', sweep)}
    assert 'mmseg_sparsevit.classification.dataset' in names and 'mmseg_sparsevit.benchmark' in names
    init = PACKAGE / 'benchmark' / '__init__.py'
    assert 'mmseg_sparsevit.benchmark.measure' in {name for _, name in imported_names('mmseg_sparsevit.benchmark',
                                                                                       init)}


def test_torch_level_modules_import_without_openmmlab(run_without_openmmlab):
    modules = [name for name, _ in torch_level_modules()]
    code = (
        'import importlib, sys, warnings\n'
        "warnings.simplefilter('ignore')  # the package warns that mmseg is missing; that is tested elsewhere\n"
        f'for name in {modules!r}:\n'
        '    importlib.import_module(name)\n'
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {OPENMMLAB!r})\n"
        'assert not loaded, loaded\n'
    )
    run_without_openmmlab(code)
