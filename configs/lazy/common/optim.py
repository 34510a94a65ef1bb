# Optimizers of the YAML configs' SOLVER.OPTIMIZER: detectron2's SGD (configs/common/optim.py:
# momentum 0.9, weight decay 1e-4, none on norm layers) and the plugin's AdamW (no weight decay
# on norm and bias parameters, SOLVER.ADAMW_BETAS). `params.model` is set to the model by the
# training script before the optimizer is instantiated.
import torch

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.solver.build import get_default_optimizer_params

SGD = get_config("common/optim.py").SGD

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0, weight_decay_bias=0.0),
    lr=0.002,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
