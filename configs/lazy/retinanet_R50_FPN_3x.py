# configs/retinanet_R50_FPN_3x.yaml as a LazyConfig: the 1x config with detectron2's 3x
# schedule (270k iterations, LR x0.1 at 210k and 250k).
from detectron2.model_zoo import get_config

from .retinanet_R50_FPN_1x import dataloader, model, optimizer, train  # noqa: F401

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x
train.max_iter = 270000
