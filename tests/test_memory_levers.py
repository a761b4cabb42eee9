"""Memory levers of the segmentor: checkpointing (ViT blocks, adapter interactions) keeps the loss and the
gradients of the plain path, a frozen ViT keeps the loss and gets no gradients, bf16 autocast stays close to
fp32, and ``--amp`` parses to mmengine's AmpOptimWrapper with the right dtype and loss scale."""
import argparse
from pathlib import Path

import pytest
import torch

from mmseg_sparsevit.engine.segmentor_benchmark import SegmentorPoint, build_config, synthetic_batch
from mmseg_sparsevit.cli.runner import add_runner_arguments, configure_training

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / 'configs/demo/mask2former_tiny-sparse-adapter_1xb4-300_segpath-demo-112x112.py')


def build_demo(setting: str = 'sparse', **options):
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    import mmseg_sparsevit  # noqa: F401
    init_default_scope('mmseg')
    cfg = build_config(SegmentorPoint(DEMO, setting, 112, cfg_options=options))
    torch.manual_seed(0)
    return revert_sync_batchnorm(MODELS.build(cfg.model))


def loss_and_grads(model, amp=None):
    model.train()
    torch.manual_seed(1)  # Mask2Former samples points for its mask loss
    data = model.data_preprocessor(synthetic_batch(112, 1, 2), True)
    with torch.autocast('cpu', dtype=amp or torch.float32, enabled=amp is not None):
        loss, _ = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize('options', [{'model.backbone.vit_cfg.with_cp': True}, {'model.backbone.with_cp': True},
                                     {'model.backbone.vit_cfg.with_cp': True, 'model.backbone.with_cp': True}])
def test_checkpointing_keeps_the_loss_and_gradients(options):
    plain_loss, plain_grads = loss_and_grads(build_demo())
    model = build_demo(**options)
    assert model.backbone.with_cp == options.get('model.backbone.with_cp', False)
    assert model.backbone.vit.grad_checkpointing == options.get('model.backbone.vit_cfg.with_cp', False)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_decoder_checkpointing_keeps_the_weights_loss_and_gradients():
    """``decoder-cp`` swaps in CheckpointedPixelDecoder: mmdet's parameter names (a plain state dict loads
    strictly), each encoder layer runs again in the backward pass, and loss and gradients stay the plain ones."""
    from mmseg_sparsevit.models.pixel_decoder import CheckpointedEncoder
    plain = build_demo()
    model = build_demo(**{'model.decode_head.pixel_decoder.type': 'CheckpointedPixelDecoder'})
    assert isinstance(model.decode_head.pixel_decoder.encoder, CheckpointedEncoder)
    model.load_state_dict(plain.state_dict())
    calls = []
    for m in (plain, model):
        first_layer = m.decode_head.pixel_decoder.encoder.layers[0]
        first_layer.register_forward_pre_hook(lambda *_, m=m: calls.append(m is model))
    plain_loss, plain_grads = loss_and_grads(plain)
    loss, grads = loss_and_grads(model)
    assert calls == [False, True, True]  # forward, then the recomputation in backward (a pre-hook: it stops early)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)
    model.eval()
    calls.clear()
    with torch.no_grad():
        model(**model.data_preprocessor(synthetic_batch(112, 1, 2), False), mode='predict')
    assert calls == [True]  # without gradients each layer runs once


def test_frozen_vit_keeps_the_loss_and_gets_no_gradients():
    plain_loss, _ = loss_and_grads(build_demo())
    loss, grads = loss_and_grads(build_demo(**{'model.backbone.freeze_vit': True}))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)  # drop_path 0: eval mode changes nothing
    assert all(g is None for n, g in grads.items() if n.startswith('backbone.vit.'))
    assert grads['backbone.spm.projs.0.weight'] is not None


@pytest.mark.parametrize('mode', ['dense', 'sparse'])
def test_bf16_autocast_loss_is_close_to_fp32(mode):
    plain_loss, _ = loss_and_grads(build_demo(mode))
    loss, grads = loss_and_grads(build_demo(mode), amp=torch.bfloat16)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss, rtol=5e-2, atol=0)
    assert all(g is None or g.dtype == torch.float32 for g in grads.values())  # fp32 weights and gradients


@pytest.mark.parametrize('argv, expected', [([], None), (['--amp'], 'fp16'), (['--amp', 'fp16'], 'fp16'),
                                            (['--amp', 'bf16'], 'bf16')])
def test_amp_option_parses_to_a_precision(argv, expected):
    parser = argparse.ArgumentParser()
    add_runner_arguments(parser, 'x=1')
    assert parser.parse_args(argv).amp == expected


@pytest.mark.parametrize('amp, dtype, loss_scale', [(True, 'float16', 'dynamic'), ('fp16', 'float16', 'dynamic'),
                                                    ('bf16', 'bfloat16', 1.0)])
def test_configure_training_amp_sets_dtype_and_loss_scale(amp, dtype, loss_scale):
    from mmengine.config import Config
    cfg = configure_training(Config.fromfile(DEMO), amp=amp)
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.dtype, cfg.optim_wrapper.loss_scale) == (
        'AmpOptimWrapper', dtype, loss_scale)
    with pytest.raises(ValueError, match='amp must be one of'):
        configure_training(Config.fromfile(DEMO), amp='int8')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='mmengine AmpOptimWrapper needs CUDA')
def test_bf16_amp_optim_wrapper_trains_on_cuda():
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    cfg = configure_training(Config.fromfile(DEMO), amp='bf16')
    model = build_demo().cuda()
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert wrapper.cast_dtype == torch.bfloat16
    log = model.train_step(synthetic_batch(112, 1, 2), wrapper)
    assert torch.isfinite(log['loss'])


def test_narrow_adapter_outputs_have_out_channels_and_shrink_the_adapter_part():
    from mmseg_sparsevit.engine.segmentor_benchmark import run_point
    default = build_demo()
    assert default.backbone.level_projs is None and default.backbone.vit_projs is None  # ViT-Adapter unchanged
    options = {'model.backbone.out_channels': 32, 'model.decode_head.in_channels': [32] * 4}
    narrow = build_demo(**options).backbone.train()
    outs = narrow(torch.randn(1, 3, 112, 140))
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 28, 35), (32, 14, 18), (32, 7, 9), (32, 4, 5)]
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None for n, p in narrow.named_parameters() if 'projs' in n or n.startswith('up.'))
    records = [run_point(SegmentorPoint(DEMO, 'sparse', 112, 'train', opts, warmup=0, repeats=1, threads=2))
               for opts in ({}, options)]
    plain, small = (r['parts_at_forward_end_gb'] for r in records)
    assert small['adapter_out'] < plain['adapter_out']
    assert records[1]['tensor_forward_end_gb'] < records[0]['tensor_forward_end_gb']
    assert small['vit'] == plain['vit']  # the ViT and its sequence are untouched
