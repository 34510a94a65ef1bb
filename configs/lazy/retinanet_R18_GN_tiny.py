# configs/retinanet_R18_GN_tiny.yaml as a LazyConfig: a small RetinaNet that trains from scratch
# on a CPU (ResNet-18 with GroupNorm, 128-channel FPN, 2 convs per subnet, ~192 px inputs,
# AdamW, 720 iterations of 8 images), on the demo's datasets; set the dataset names to your own
# registered datasets. The YAML config also clips gradients (SOLVER.CLIP_GRADIENTS, norm 5),
# which detectron2's LazyConfig optimizers have no option for: this one trains without clipping.
from fvcore.common.param_scheduler import MultiStepParamScheduler

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.modeling.backbone import ResNet
from detectron2.solver import WarmupParamScheduler

from .common.data.coco import dataloader
from .common.models.retinanet import model
from .common.optim import AdamW as optimizer

# ResNet-18 with GroupNorm everywhere, nothing frozen (nothing pretrained to keep).
model.backbone.bottom_up.stem.norm = "GN"
model.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="GN")
model.backbone.bottom_up.freeze_at = 0
model.backbone.out_channels = 128
model.backbone.norm = "GN"
model.backbone.top_block.in_channels = 512  # res5 of ResNet-18
model.head.input_shape = [ShapeSpec(channels=128)] * 5
model.head.conv_dims = [128, 128]
model.head.norm = "GN"
# From scratch: normalize inputs to unit variance (the MSRA weights absorb std into conv1).
model.pixel_std = [57.375, 57.120, 58.395]

dataloader.train.dataset.names = "retinanet_demo_train"
dataloader.test.dataset.names = "retinanet_demo_val"
dataloader.train.total_batch_size = 8
# Small images on 2 cores: decoding in the training process beats worker processes.
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(160, 192, 224), sample_style="choice", max_size=320),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=192, max_size=320),
]

optimizer.lr = 0.002
# 720 iterations, LR x0.1 at 560 and 680, 100 warmup iterations.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[560, 680, 720]),
    warmup_length=100 / 720,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = get_config("common/train.py").train
train.max_iter = 720
train.checkpointer.period = 240
train.eval_period = 0
train.device = "cpu"
train.output_dir = "output/tiny"
