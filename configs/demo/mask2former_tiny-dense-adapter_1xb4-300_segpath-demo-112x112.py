# CPU demo: a tiny UNI-2-shaped ViT (patch 14, 8 registers, SwiGLU; 96 wide, 4 blocks) with the
# ViT-Adapter and a slim Mask2Former, trained from scratch on the synthetic SegPath tiles of
# `python tools/make_demo_data.py data/segpath_demo` (panCK). A few minutes on 2 CPU cores.
_base_ = [
    '../_base_/models/mask2former_sparsevit_adapter.py',
    '../_base_/datasets/segpath.py',
    '../_base_/schedules/schedule_20k.py',
    '../_base_/default_runtime.py',
]
img_scale = (112, 112)  # 8 x 8 ViT grid
model_mpp = _base_.segpath_mpp * _base_.segpath_tile_size / img_scale[0]  # µm/px the model sees
max_iters = 300
embed_dim = 96
feat_channels = 64
norm_cfg = dict(type='BN', requires_grad=True)

tiny_attn = dict(embed_dims=feat_channels, num_heads=4, batch_first=True)
tiny_ffn = dict(embed_dims=feat_channels, feedforward_channels=2 * feat_channels)
model = dict(
    backbone=dict(
        vit_cfg=dict(embed_dim=embed_dim, depth=4, num_heads=3, attn_mode='dense',
                     window_size=4, drop_path_rate=0.0),
        conv_inplane=16,
        deform_num_heads=3,
        norm_cfg=norm_cfg),
    decode_head=dict(
        in_channels=[embed_dim] * 4,
        feat_channels=feat_channels,
        out_channels=feat_channels,
        num_queries=10,
        pixel_decoder=dict(
            encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=tiny_attn, ffn_cfg=tiny_ffn)),
            positional_encoding=dict(num_feats=feat_channels // 2)),
        positional_encoding=dict(num_feats=feat_channels // 2),
        transformer_decoder=dict(
            num_layers=3,
            layer_cfg=dict(self_attn_cfg=tiny_attn, cross_attn_cfg=tiny_attn, ffn_cfg=tiny_ffn)),
        train_cfg=dict(num_points=img_scale[0] * img_scale[1] // 4)))

# The base pipelines hold the base's img_scale: resize to this one (as configs/segpath/_base_/ does).
train_pipeline = [dict(s, scale=img_scale) if s['type'] == 'Resize' else s for s in _base_.train_pipeline]
test_pipeline = [dict(s, scale=img_scale) if s['type'] == 'Resize' else s for s in _base_.test_pipeline]
data_root = 'data/segpath_demo'
loader = dict(num_workers=0, persistent_workers=False)
train_dataloader = dict(**loader, dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = test_dataloader = dict(**loader, dataset=dict(data_root=data_root, pipeline=test_pipeline))

# From scratch: the ViT trains at the full learning rate.
optim_wrapper = dict(
    optimizer=dict(lr=5e-4),
    paramwise_cfg=dict(custom_keys={'backbone.vit': dict(lr_mult=1.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=20, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
