# The data of detectron2's configs/common/data/coco.py (COCO 2017, its resize and flip, 16 images
# per batch) read as the plugin's YAML training reads it: images through the plugin's reader
# (retinanet_plugin.data.ImageMapper, the reader of predict and export) and COCO evaluation with
# the plugin's choice of COCOeval (TEST.COCO_EVAL_BACKEND in the YAML configs).
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from retinanet_plugin.data import ImageMapper
from retinanet_plugin.evaluation import RetinaNetCOCOEvaluator

dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.mapper._target_ = ImageMapper
dataloader.train.mapper.use_instance_mask = False  # RetinaNet uses boxes only
dataloader.test.mapper._target_ = ImageMapper
dataloader.evaluator = L(RetinaNetCOCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    backend="faster_coco_eval",
    # The operating threshold of the evaluator's per-class diagnostics (the model's).
    score_threshold=0.05,
)
