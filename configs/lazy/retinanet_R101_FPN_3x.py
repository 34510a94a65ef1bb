# configs/retinanet_R101_FPN_3x.yaml as a LazyConfig: ResNet-101 with the 3x schedule.
from .retinanet_R50_FPN_3x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
