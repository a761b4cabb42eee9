"""torchrun for the slide tools (slide/parallel.py): dealing work, the gathered rounds' tile order, and
tools/infer_slide.py in 2 gloo processes on CPU writing what 1 process writes."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from mmseg_sparsevit.slide.demo import make_demo_slide
from mmseg_sparsevit.slide.inference import SlideSettings, segment_slides
from mmseg_sparsevit.slide.parallel import SINGLE, Ranks, deal, gathered_batches, resolve_split

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / 'configs/demo/mask2former_tiny-sparse-adapter_1xb4-300_segpath-demo-112x112.py')


def test_work_is_dealt_round_robin():
    assert [deal(range(7), Ranks(r, 3)) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert resolve_split('auto', 3, Ranks(0, 2)) == 'tiles' and resolve_split('auto', 8, Ranks(0, 2)) == 'slides'
    assert resolve_split('slides', 1, SINGLE) == 'slides'
    with pytest.raises(ValueError, match='split must be one of'):
        resolve_split('rows', 3, Ranks(0, 2))


def test_a_single_process_gets_its_batches_as_they_come():
    todo = np.array([2, 5, 6, 9, 11])
    loader = [(torch.from_numpy(todo[i:i + 2]), torch.from_numpy(todo[i:i + 2, None] * 10.0)) for i in (0, 2, 4)]
    rounds = list(gathered_batches(lambda tiles: tiles.numpy() + 1, loader, len(todo), 2))
    assert [r[0].tolist() for r in rounds] == [[2, 5], [6, 9], [11]]
    assert [r[1][:, 0].tolist() for r in rounds] == [[21, 51], [61, 91], [111]]


def test_a_failing_batch_is_an_error_naming_it():
    def broken(tiles):
        raise OSError('slide.svs: read failed')

    with pytest.raises(RuntimeError, match='tile batch failed: OSError: slide.svs: read failed'):
        list(gathered_batches(broken, [(torch.zeros(1), torch.zeros(1))], 1, 1))


class PurpleSegmenter:
    """Per-pixel scores (class 1 where a pixel is purple), with the attributes segment_slide reads."""

    num_classes, classes, palette = 2, ['background', 'nuclei'], [(0, 0, 0), (200, 0, 200)]
    patch_size, mpp, name = 14, 1.0, 'purple'

    def __call__(self, tiles: torch.Tensor) -> np.ndarray:
        rgb = tiles.permute(0, 3, 1, 2).float() / 255
        return torch.stack([torch.full_like(rgb[:, 0], 0.2), (rgb[:, 0] + rgb[:, 2]) / 2 - rgb[:, 1]], 1).numpy()


SETTINGS = SlideSettings(tile_size=112, overlap=28, batch_size=2, num_workers=0, checkpoint_every=4, progress=False)


def _segment_in_process_group(rank: int, store: str, slides: list, out: str, split: str) -> None:
    torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        segment_slides(PurpleSegmenter(), slides, out, SETTINGS, Ranks(rank, 2), split)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize('split', ['tiles', 'slides'])
def test_segment_slides_in_two_processes_equals_one(tmp_path, split):
    """Overlapping tiles blended on rank 0 in the order one process adds them: identical class maps, bit for bit."""
    slides = [str(tmp_path / 'a.tiff'), str(tmp_path / 'b.tiff')]
    make_demo_slide(slides[0], size=(1024, 768), mpp=0.5, seed=0)
    make_demo_slide(slides[1], size=(768, 512), mpp=0.5, seed=1)
    segment_slides(PurpleSegmenter(), slides, str(tmp_path / 'one'), SETTINGS)
    torch.multiprocessing.spawn(_segment_in_process_group, (str(tmp_path / 'store'), slides, str(tmp_path / 'two'),
                                                            split), nprocs=2)
    for stem in ('a', 'b'):
        one = tifffile.imread(tmp_path / 'one' / f'{stem}.classes.tiff')
        np.testing.assert_array_equal(tifffile.imread(tmp_path / 'two' / f'{stem}.classes.tiff'), one)
        assert {0, 1} <= set(np.unique(one).tolist())  # both classes present: the maps say something
        assert (json.loads((tmp_path / 'two' / f'{stem}.geojson').read_text())
                == json.loads((tmp_path / 'one' / f'{stem}.geojson').read_text()))
    listed = json.loads((tmp_path / 'two' / 'slides.json').read_text())
    assert [r['status'] for r in listed] == ['done', 'done']
    assert [r['summary']['processes'] for r in listed] == ([2, 2] if split == 'tiles' else [1, 1])


def run_torchrun(args, timeout=180) -> str:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'] + args
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    finally:  # a hung run takes its worker processes with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-5000:]
    return output


def test_infer_slide_in_two_processes_writes_what_one_process_writes(tmp_path):
    """The tiles of the slide split over 2 gloo processes, stitched on rank 0: the same class map and polygons."""
    from mmseg.apis import init_model
    slide = str(tmp_path / 'demo.tiff')
    make_demo_slide(slide, size=(1024, 768), mpp=0.5)
    torch.manual_seed(0)
    model = init_model(DEMO_CONFIG, None, device='cpu')
    checkpoint = str(tmp_path / 'random.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    args = [slide, '--tile-size', '112', '--overlap', '14', '--batch-size', '1', '--workers', '0', '--no-progress',
            '--checkpoint-every', '2']
    sys.path.insert(0, str(ROOT / 'tools'))
    import infer_slide
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun runs each process on one thread: same kernels, same bits
    try:
        assert infer_slide.main([DEMO_CONFIG, checkpoint] + args + ['--out-dir', str(tmp_path / 'one')]) == 0
    finally:
        torch.set_num_threads(threads)
    run_torchrun([str(ROOT / 'tools' / 'infer_slide.py'), DEMO_CONFIG, checkpoint] + args
                 + ['--out-dir', str(tmp_path / 'two'), '--split', 'tiles'])
    one, two = tmp_path / 'one', tmp_path / 'two'
    np.testing.assert_array_equal(tifffile.imread(two / 'demo.classes.tiff'),
                                  tifffile.imread(one / 'demo.classes.tiff'))
    assert json.loads((two / 'demo.geojson').read_text()) == json.loads((one / 'demo.geojson').read_text())
    summary = json.loads((two / 'demo.summary.json').read_text())
    assert summary['processes'] == 2 and summary['tiles'] > 4
    assert summary['class_area_mm2'] == json.loads((one / 'demo.summary.json').read_text())['class_area_mm2']
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
