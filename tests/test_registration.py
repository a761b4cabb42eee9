"""`import mmseg_sparsevit` alone (as `custom_imports` does) registers every public component."""
import subprocess
import sys

EXPECTED = {
    'MODELS': ['SparseViT', 'SparseViTAdapter'],
    'DATASETS': ['SegPathDataset'],
    'TRANSFORMS': ['LoadSegPathAnnotations'],
    'METRICS': ['SegPathMetric'],
}


def test_fresh_import_registers_everything():
    # A fresh interpreter, so nothing imported by other tests can have registered these first.
    code = (
        'import mmseg.registry as r\n'
        f'expected = {EXPECTED!r}\n'
        'before = {(k, n): getattr(r, k).get(n) for k, names in expected.items() for n in names}\n'
        'import mmseg_sparsevit\n'
        'after = {(k, n): getattr(r, k).get(n) for k, names in expected.items() for n in names}\n'
        'assert all(v is None for v in before.values()), before\n'
        "bad = {k: v for k, v in after.items() if v is None or not v.__module__.startswith('mmseg_sparsevit.')}\n"
        'assert not bad, bad\n'
    )
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_registered_components_build():
    from mmseg.registry import METRICS, MODELS

    import mmseg_sparsevit  # noqa: F401
    metric = METRICS.build(dict(type='SegPathMetric'))
    assert type(metric).__name__ == 'SegPathMetric'
    model = MODELS.build(dict(type='SparseViT', arch='vit-s', depth=1, attn_mode='sparse'))
    assert type(model).__name__ == 'SparseViT'
