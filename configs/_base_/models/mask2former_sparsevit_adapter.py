# Mask2Former (mmseg wrapper of mmdet's head) on a SparseViT + ViT-Adapter backbone.
# Default backbone: UNI-2-h (ViT-g/14, 1536 wide, 8 registers) with windowed sparse attention;
# leaf configs switch attn_mode / window_size. Point `pretrained` at a local UNI-2 checkpoint
# (see docs/vit_adapter.md), e.g. --cfg-options model.backbone.vit_cfg.pretrained=/path/to/file.
custom_imports = dict(imports=['mmdet.models', 'mmseg_sparsevit'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
num_classes = 2  # background + the antigen's cell type
embed_dim = 1536
patch_size = 14
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet statistics, as UNI-2's own transform
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size_divisor=patch_size,
    test_cfg=dict(size_divisor=patch_size))
# Query self-attention and query-to-pixel cross-attention of the transformer decoder.
decoder_attn_cfg = dict(
    embed_dims=256, num_heads=8, attn_drop=0.0, proj_drop=0.0, dropout_layer=None, batch_first=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='SparseViTAdapter',
        vit_cfg=dict(
            arch='uni2-h',
            img_size=224,
            attn_mode='sparse',
            window_size=8,
            drop_path_rate=0.1,
            pretrained=None),
        conv_inplane=64,
        n_points=4,
        deform_num_heads=24,  # 1536 * deform_ratio / 24 = 32 channels per head, as ViT-Adapter-B/L
        deform_ratio=0.5,
        init_values=0.0,
        cffn_ratio=0.25,
        with_cffn=True,
        use_extra_extractor=True,
        add_vit_feature=True,
        norm_cfg=norm_cfg,
        with_cp=False,
        freeze_vit=False),
    decode_head=dict(
        type='Mask2FormerHead',
        in_channels=[embed_dim] * 4,
        strides=[4, 8, 16, 32],
        feat_channels=256,
        out_channels=256,
        num_classes=num_classes,
        num_queries=100,
        num_transformer_feat_level=3,
        align_corners=False,
        pixel_decoder=dict(
            type='mmdet.MSDeformAttnPixelDecoder',
            num_outs=3,
            norm_cfg=dict(type='GN', num_groups=32),
            act_cfg=dict(type='ReLU'),
            encoder=dict(
                num_layers=6,
                layer_cfg=dict(
                    self_attn_cfg=dict(
                        embed_dims=256, num_heads=8, num_levels=3, num_points=4,
                        im2col_step=64, dropout=0.0, batch_first=True, norm_cfg=None,
                        init_cfg=None),
                    ffn_cfg=dict(
                        embed_dims=256, feedforward_channels=1024, num_fcs=2, ffn_drop=0.0,
                        act_cfg=dict(type='ReLU', inplace=True))),
                init_cfg=None),
            positional_encoding=dict(num_feats=128, normalize=True),
            init_cfg=None),
        enforce_decoder_input_project=False,
        positional_encoding=dict(num_feats=128, normalize=True),
        transformer_decoder=dict(
            return_intermediate=True,
            num_layers=9,
            layer_cfg=dict(
                self_attn_cfg=decoder_attn_cfg,
                cross_attn_cfg=decoder_attn_cfg,
                ffn_cfg=dict(
                    embed_dims=256, feedforward_channels=2048, num_fcs=2,
                    act_cfg=dict(type='ReLU', inplace=True), ffn_drop=0.0, dropout_layer=None,
                    add_identity=True)),
            init_cfg=None),
        loss_cls=dict(
            type='mmdet.CrossEntropyLoss',
            use_sigmoid=False,
            loss_weight=2.0,
            reduction='mean',
            class_weight=[1.0] * num_classes + [0.1]),
        loss_mask=dict(
            type='mmdet.CrossEntropyLoss', use_sigmoid=True, reduction='mean', loss_weight=5.0),
        loss_dice=dict(
            type='mmdet.DiceLoss',
            use_sigmoid=True,
            activate=True,
            reduction='mean',
            naive_dice=True,
            eps=1.0,
            loss_weight=5.0),
        train_cfg=dict(
            num_points=12544,
            oversample_ratio=3.0,
            importance_sample_ratio=0.75,
            assigner=dict(
                type='mmdet.HungarianAssigner',
                match_costs=[
                    dict(type='mmdet.ClassificationCost', weight=2.0),
                    dict(type='mmdet.CrossEntropyLossCost', weight=5.0, use_sigmoid=True),
                    dict(type='mmdet.DiceCost', weight=5.0, pred_act=True, eps=1.0),
                ]),
            sampler=dict(type='mmdet.MaskPseudoSampler'))),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
