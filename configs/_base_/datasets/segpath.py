# SegPath (Komura et al., 2023): one antigen = one binary task (background vs its cell type).
# Tiles (984 x 984 px at 40x) are resized to `img_scale`; evaluation runs on the original
# masks (annotations load after the resize in the test pipeline and predictions are resized
# back by the segmentor). Prepare the data with tools/prepare_segpath.py.
dataset_type = 'SegPathDataset'
data_root = 'data/segpath'
antigen = 'panCK'
img_scale = (448, 448)
# µm/px the model sees (whole-slide inference, tools/infer_slide.py, runs at it by default): SegPath tiles
# are 984 px at ~0.22 µm/px (40x), resized to img_scale. Configs that change img_scale restate it.
segpath_mpp = 0.22
segpath_tile_size = 984
model_mpp = segpath_mpp * segpath_tile_size / img_scale[0]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadSegPathAnnotations'),
    dict(type='Resize', scale=img_scale, keep_ratio=False),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandomFlip', prob=0.5, direction='vertical'),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=False),
    dict(type='LoadSegPathAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, antigen=antigen, split='train',
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, antigen=antigen, split='val',
                 pipeline=test_pipeline))
test_dataloader = dict(val_dataloader, dataset=dict(val_dataloader['dataset'], split='test'))
val_evaluator = dict(type='SegPathMetric')
test_evaluator = val_evaluator
