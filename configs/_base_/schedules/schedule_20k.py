# 20k iterations of AdamW with linear warm-up and poly decay (Mask2Former-style optimiser).
# The ViT trains at 0.1x the learning rate of the adapter and the head; embeddings and
# queries get no weight decay.
no_decay_vit = dict(lr_mult=0.1, decay_mult=0.0)
no_decay = dict(lr_mult=1.0, decay_mult=0.0)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    clip_grad=dict(max_norm=0.01, norm_type=2),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        custom_keys={
            'backbone.vit': dict(lr_mult=0.1),
            'vit.pos_embed': no_decay_vit,
            'vit.cls_token': no_decay_vit,
            'vit.reg_token': no_decay_vit,
            'level_embed': no_decay,
            'query_embed': no_decay,
            'query_feat': no_decay,
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=1500, end=20000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=20000, val_interval=2000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # 'IoU' is the cell-type IoU of SegPathMetric, the paper's IoU column. AtomicCheckpointHook (this plugin's
    # CheckpointHook) never leaves a truncated checkpoint under a final name (docs/run_safety.md).
    checkpoint=dict(type='AtomicCheckpointHook', by_epoch=False, interval=2000, max_keep_ckpts=2,
                    save_best='IoU', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
