"""Import layering.

The classification and benchmark parts need only torch, timm and mmengine, never mmseg / mmcv / mmdet. Two
checks: every module of those packages imports in a fresh interpreter with the OpenMMLab stack hidden (this
covers what their package ``__init__`` files pull in), and no module names mmseg, mmcv, mmdet or a
subpackage of this project that needs them in any import statement, including ones inside functions
(which an import alone does not run).

No module imports names from the package root: the root imports the subpackages, not the other way round.
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


def package_modules(folder: Path) -> List[Tuple[str, Path]]:
    """(dotted name, file) of every module under ``folder``."""
    modules = []
    for path in sorted(folder.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        modules.append(('.'.join(parts[:-1] if parts[-1] == '__init__' else parts), path))
    return modules


def torch_level_modules() -> List[Tuple[str, Path]]:
    """(dotted name, file) of every module under the torch-level packages."""
    return [module for package in TORCH_LEVEL for module in package_modules(PACKAGE / package)]


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


def root_names_imported(module: str, path: Path) -> List[str]:
    """Names that ``module`` imports from the package root's ``__init__`` (not its submodules)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = module.split('.') if path.name == '__init__.py' else module.split('.')[:-1]
            target = '.'.join(base[:len(base) - node.level + 1]) if node.level else node.module
            if node.level and node.module:
                target = f'{target}.{node.module}'
            if target == PACKAGE.name:
                names += [f'{path}:{node.lineno}: {alias.name}' for alias in node.names
                          if not ((PACKAGE / alias.name).is_dir() or (PACKAGE / f'{alias.name}.py').is_file())]
    return names


def test_no_module_imports_from_the_package_root():
    modules = [(name, path) for name, path in package_modules(PACKAGE) if name != PACKAGE.name]
    assert len(modules) > 20
    bad = [entry for name, path in modules for entry in root_names_imported(name, path)]
    assert not bad, 'upward imports from mmseg_sparsevit/__init__.py:\n' + '\n'.join(bad)


def test_root_import_detection(tmp_path):
    # The old models/__init__.py read the root's MMSEG_AVAILABLE; importing a root submodule is fine.
    init = tmp_path / '__init__.py'
    init.write_text('from .. import MMSEG_AVAILABLE\nfrom .. import ops\nfrom mmseg_sparsevit import __version__\n')
    assert [entry.split(': ')[-1] for entry in root_names_imported('mmseg_sparsevit.models', init)] == [
        'MMSEG_AVAILABLE', '__version__']
