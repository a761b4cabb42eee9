"""The whole-slide benchmark's parts: both modes cover the same tissue, the model gets the asked ViT, the table."""
import pytest

from mmseg_sparsevit.slide.benchmark import SlideBenchmark, _worker, cfg_options, format_rows, run_mode
from mmseg_sparsevit.slide.demo import make_demo_slide


def test_modes_must_cover_the_same_area():
    with pytest.raises(ValueError, match='tile 500 px does not divide the slide side 1344 px'):
        SlideBenchmark(modes=(('sparse', 'sparse', 500), ('dense', 'dense', 224)))


def test_worker_runs_the_pipeline_with_the_asked_vit(tmp_path):
    bench = SlideBenchmark(side=224, width=48, depth=4, heads=2, window=2,
                           modes=(('sparse', 'sparse', 224), ('dense', 'dense', 112)))
    slide = str(tmp_path / 'slide.tiff')
    make_demo_slide(slide, (224, 224), bench.mpp, glass=False)
    options = cfg_options(bench, 'sparse')
    assert options['model.backbone.vit_cfg.embed_dim'] == 48 and options['model.decode_head.in_channels'] == [48] * 4
    summaries = {}
    for name, attn_mode, tile in bench.modes:
        summaries[name] = _worker(dict(config=bench.config, cfg_options=cfg_options(bench, attn_mode), mpp=bench.mpp,
                                       tile=tile, batch_size=bench.batch_size(tile), slide=slide,
                                       out_dir=str(tmp_path / name), threads=None))
    assert summaries['sparse']['tiles'] == 1 and summaries['dense']['tiles'] == 4
    assert bench.batch_size(224) == 1 and bench.batch_size(112) == 4  # same pixels per forward
    assert summaries['sparse']['tissue_area_mm2'] == summaries['dense']['tissue_area_mm2'] == \
        pytest.approx((224 * 0.5) ** 2 * 1e-6, abs=1e-4)
    assert all(s['cpu_s'] > 0 for s in summaries.values())
    assert 'uni2' not in summaries['sparse']['model']  # the demo config, not a UNI-2-sized model


def test_run_mode_runs_the_worker_in_a_fresh_process(tmp_path):
    """run_mode goes through benchmark.process.run_worker: the summary comes back as the worker's JSON record, and
    a failing worker raises naming the mode and its last error line."""
    bench = SlideBenchmark(side=112, width=48, depth=4, heads=2, window=2,
                           modes=(('sparse', 'sparse', 112), ('dense', 'dense', 112)))
    slide = str(tmp_path / 'slide.tiff')
    make_demo_slide(slide, (112, 112), bench.mpp, glass=False)
    summary = run_mode(bench, 'sparse', 'sparse', 112, slide, str(tmp_path))
    assert summary['tiles'] == 1 and summary['cpu_s'] > 0 and (tmp_path / 'sparse').is_dir()
    with pytest.raises(RuntimeError, match=r'benchmark mode broken failed \(exit 1\): .*num_interactions'):
        run_mode(SlideBenchmark(side=112, depth=2, modes=(('broken', 'sparse', 112),)), 'broken', 'sparse', 112,
                 slide, str(tmp_path))


def test_table_rates_are_relative_to_the_last_mode():
    common = dict(tissue_mm2=0.45, time_s=30.0, cpu_s=50.0)
    rows = [dict(common, mode='sparse', tile=1344, batch=1, tiles=1, mm2_per_cpu_s=0.009, peak_rss_gb=3.0),
            dict(common, mode='dense', tile=224, batch=36, tiles=36, mm2_per_cpu_s=0.01, peak_rss_gb=1.5)]
    table = format_rows(rows)
    assert '0.90x' in table.splitlines()[2] and '1.00x' in table.splitlines()[3]
    assert table.splitlines()[0].startswith('| mode')
