# Runtime shared by every config: mmseg scope, logging, local visualisation backend.
default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,  # SegPath batches have one fixed size
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer', alpha=0.5)
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
