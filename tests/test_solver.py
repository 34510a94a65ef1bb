"""SOLVER.OPTIMIZER: detectron2's SGD by default, AdamW without decay on norm and bias."""

import pytest
import torch

from conftest import plugin_cfg
from detectron2.modeling import build_model
from retinanet_plugin.engine.solver import build_optimizer, has_fused_adamw


def tiny(*opts):
    torch.manual_seed(0)
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", *opts)
    return cfg, build_model(cfg)


def test_default_is_detectron2_sgd():
    _, model = tiny()
    cfg = plugin_cfg("retinanet_R50_FPN_1x.yaml")  # add_retinanet_config's default optimizer
    assert cfg.SOLVER.OPTIMIZER == "SGD"
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(group["momentum"] == cfg.SOLVER.MOMENTUM for group in optimizer.param_groups)


def test_adamw_decays_only_weights_of_convs():
    cfg, model = tiny(
        "SOLVER.OPTIMIZER",
        "AdamW",
        "SOLVER.BASE_LR",
        "0.001",
        "SOLVER.WEIGHT_DECAY",
        "0.05",
        "SOLVER.ADAMW_BETAS",
        "(0.8, 0.99)",
    )
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    norm_types = (torch.nn.GroupNorm, torch.nn.BatchNorm2d)
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            expected = 0.0 if isinstance(module, norm_types) or name == "bias" else 0.05
            assert decay[id(param)] == expected, f"{module_name}.{name}"
    assert all(g["betas"] == (0.8, 0.99) and g["lr"] == 0.001 for g in optimizer.param_groups)
    assert len(decay) == len(list(model.parameters()))


def test_adamw_step_matches_torch_adamw():
    """One step of the configured optimizer equals torch's AdamW on the same groups."""
    cfg, model = tiny("SOLVER.OPTIMIZER", "AdamW", "SOLVER.CLIP_GRADIENTS.ENABLED", "False")
    reference = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer = build_optimizer(cfg, model)
    optimizer.step()
    lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for before, after in zip(reference, model.parameters()):
        # First AdamW step with gradient 1: p - lr * wd * p - lr * 1 (bias-corrected m / sqrt(v)).
        expected = before - lr * decay[id(after)] * before - lr * 1.0 / (1.0 + 1e-8)
        torch.testing.assert_close(after.detach(), expected, rtol=1e-5, atol=1e-7)
    assert wd > 0


def test_adamw_uses_the_fused_kernel_with_the_per_tensor_update():
    """Where torch has a fused CPU AdamW, the optimizer uses it, and three steps with changing
    gradients (and gradient clipping) match AdamW's update computed in float64."""
    cfg, model = tiny("SOLVER.OPTIMIZER", "AdamW", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5")
    optimizer = build_optimizer(cfg, model)
    assert bool(optimizer.defaults.get("fused")) == has_fused_adamw("cpu")
    params = list(model.parameters())
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    lr, (beta1, beta2), eps = cfg.SOLVER.BASE_LR, cfg.SOLVER.ADAMW_BETAS, 1e-8
    expected = [p.detach().double().clone() for p in params]
    first = [torch.zeros_like(e) for e in expected]
    second = [torch.zeros_like(e) for e in expected]
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.grad = grad.float()
            # detectron2's "norm" clipping: each parameter's gradient on its own.
            grad = grad.float().double() * min(1.0, 0.5 / (grad.float().double().norm() + 1e-6))
            expected[i] *= 1 - lr * decay[id(p)]
            first[i] = beta1 * first[i] + (1 - beta1) * grad
            second[i] = beta2 * second[i] + (1 - beta2) * grad**2
            denominator = (second[i] / (1 - beta2**step)).sqrt() + eps
            expected[i] -= lr * first[i] / (1 - beta1**step) / denominator
        optimizer.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_named():
    cfg, model = tiny("SOLVER.OPTIMIZER", "Lion")
    with pytest.raises(ValueError, match="Lion"):
        build_optimizer(cfg, model)
