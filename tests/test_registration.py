"""`import mmseg_sparsevit` alone (as `custom_imports` does) registers every public component."""
EXPECTED = {
    'MODELS': ['SparseViT', 'SparseViTAdapter'],
    'DATASETS': ['SegPathDataset'],
    'TRANSFORMS': ['LoadSegPathAnnotations'],
    'METRICS': ['SegPathMetric'],
}


def test_fresh_import_registers_everything(run_fresh_python):
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
    run_fresh_python(code)


def test_registered_components_build():
    from mmengine.registry import DefaultScope
    from mmseg.registry import METRICS, MODELS

    import mmseg_sparsevit  # noqa: F401

    # In the mmseg scope, as configs set it: another test's Runner may have left 'mmengine' as default.
    with DefaultScope.overwrite_default_scope('mmseg'):
        metric = METRICS.build(dict(type='SegPathMetric'))
        model = MODELS.build(dict(type='SparseViT', arch='vit-s', depth=1, attn_mode='sparse'))
    assert type(metric).__name__ == 'SegPathMetric'
    assert type(model).__name__ == 'SparseViT'


def test_torch_level_parts_work_without_mmseg(run_without_openmmlab):
    # A GPU machine may have only torch, timm and mmengine: hide mmseg/mmcv/mmdet and check that the
    # package warns (never silently), registers nothing, and still runs the sparse ViT and its op.
    code = (
        'import sys, warnings\n'
        'with warnings.catch_warnings(record=True) as caught:\n'
        "    warnings.simplefilter('always')\n"
        '    import mmseg_sparsevit\n'
        "assert any('not importable' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
        'assert mmseg_sparsevit.MMSEG_AVAILABLE is False\n'
        'import torch\n'
        'from mmseg_sparsevit.models import SparseViT\n'
        'import mmseg_sparsevit.benchmark  # noqa: F401\n'
        "assert not hasattr(mmseg_sparsevit.models, 'SparseViTAdapter')\n"
        "model = SparseViT('vit-s', embed_dim=32, depth=1, num_heads=2, attn_mode='sparse', window_size=2)\n"
        'out = model(torch.randn(1, 3, 64, 64))[0]\n'
        'assert out.shape == (1, 32, 4, 4), out.shape\n'
        "assert not any(m.split('.')[0] in ('mmseg', 'mmcv', 'mmdet') for m in sys.modules)\n"
    )
    run_without_openmmlab(code)
