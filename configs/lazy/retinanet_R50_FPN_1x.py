# configs/retinanet_R50_FPN_1x.yaml as a LazyConfig (detectron2's
# configs/COCO-Detection/retinanet_R_50_FPN_1x.py with the plugin's model): the same model, SGD
# at LR 0.01 for 16 images per batch, detectron2's 1x schedule (90k iterations, LR x0.1 at 60k
# and 80k, 1000 warmup iterations), COCO 2017. Train with
#   python tools/lazyconfig_train_net.py --config-file configs/lazy/retinanet_R50_FPN_1x.py
from detectron2.model_zoo import get_config

from .common.data.coco import dataloader  # noqa: F401
from .common.models.retinanet import model  # noqa: F401
from .common.optim import SGD as optimizer

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train = get_config("common/train.py").train

optimizer.lr = 0.01
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
