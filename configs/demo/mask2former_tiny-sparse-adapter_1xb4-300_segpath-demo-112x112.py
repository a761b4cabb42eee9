# The CPU demo with windowed sparse attention: 4 x 4 windows on the 8 x 8 ViT grid.
_base_ = ['./mask2former_tiny-dense-adapter_1xb4-300_segpath-demo-112x112.py']
model = dict(backbone=dict(vit_cfg=dict(attn_mode='sparse', window_size=4)))
