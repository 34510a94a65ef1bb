# configs/finetune_R50_FPN.yaml as a LazyConfig: fine-tune detectron2's COCO-trained RetinaNet
# R50-FPN 3x on your own dataset, registered by the training command:
#   python tools/lazyconfig_train_net.py --config-file configs/lazy/finetune_R50_FPN.py \
#       --register-coco my_dataset_train train.json images/ \
#       --register-coco my_dataset_val val.json images/
# With the plugin's command, model.num_classes follows the training dataset unless set on the
# command line; every COCO weight that fits is loaded and the 80-class classification layer is
# re-initialized with the prior-probability bias.
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from .retinanet_R50_FPN_3x import dataloader, model, optimizer, train  # noqa: F401

dataloader.train.dataset.names = "my_dataset_train"
dataloader.test.dataset.names = "my_dataset_val"
dataloader.train.total_batch_size = 8
optimizer.lr = 0.005  # the 1x/3x rate (0.01 at batch 16), scaled to batch 8
# 4500 iterations, LR x0.1 at 3000 and 4000, 200 warmup iterations.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[3000, 4000, 4500]),
    warmup_length=200 / 4500,
    warmup_method="linear",
    warmup_factor=0.001,
)
train.max_iter = 4500
train.checkpointer.period = 1500
train.eval_period = 1500
train.init_checkpoint = (
    "detectron2://COCO-Detection/retinanet_R_50_FPN_3x/190397829/model_final_5bd44e.pkl"
)
train.output_dir = "output/finetune"
