"""Faster inference of the backbone and head, with the plain model's detections.

:class:`InferenceRunner` runs a :class:`FocalLossRetinaNet`'s backbone and head at inference
(``MODEL.INFERENCE_OPTIMIZATION``):

- **FrozenBN folding**: each detectron2 ``Conv2d`` whose norm is a ``FrozenBatchNorm2d`` becomes
  one convolution with weight ``w * s`` and bias ``b * s + beta - mean * s``, where
  ``s = gamma / sqrt(var + eps)``, which saves a pass over every activation of the ResNet. The
  folded convolutions live in a copy of the backbone that shares every other tensor with the
  model and is not a submodule of it, so ``state_dict()``, checkpoints and training never see it.
- **channels-last**: the images enter the backbone as (N, C, H, W) tensors in channels-last
  memory order; convolutions keep the layout of their input, so the whole backbone and head run
  in the layout oneDNN and cuDNN prefer.
- **Winograd convolutions** (:mod:`.winograd`): on CPU, in float32, the 3x3 convolutions on
  large feature maps run NNPACK's Winograd algorithm. They need the (N, C, H, W) layout: with
  channels-last on too, the backbone runs channels-last (where its 1x1 convolutions are
  fastest) and the head, nearly all 3x3 convolutions, gets its inputs in (N, C, H, W).
- **torch.compile** of backbone and head (inductor, with weight freezing on CPU) with
  ``dynamic=True``: sizes are symbolic, so images of new sizes reuse the compiled graphs (only
  a guard of the convolution's kernel choice on the feature map's size may add a graph) instead
  of compiling per size; padding images to a few size buckets instead would change the
  detections near the bottom and right borders.

The copy (and its compiled version) is built at the first inference call and rebuilt whenever a
weight or buffer of backbone or head changed since (in place, by ``load_state_dict`` or an
optimizer step, or by moving the model), which the runner tells from each tensor's storage and
version counter; ``model.train()`` drops it. Every choice gives the plain float32 model's
detections up to float rounding (tests/test_inference_optimization.py). The runner stays out of
the way while the model is scripted, traced (export), or compiled as a whole.
"""

import contextlib
import copy
import itertools
import re
from typing import ContextManager, List, Tuple

import torch
from torch import Tensor, nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from ..config.validation import add_key_rule
from .winograd import WinogradConvolutions, winograd_applies

__all__ = [
    "INFERENCE_DTYPES",
    "InferenceRunner",
    "fold_frozen_batchnorm",
    "native_bfloat16",
    "resolve_inference_dtype",
]

INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _compile_available(enabled) -> str:
    if enabled and not hasattr(torch, "compile"):
        return "needs torch >= 2.0 (torch.compile); set it to False"
    return None


add_key_rule("MODEL.INFERENCE_OPTIMIZATION.COMPILE", _compile_available)


# ------------------------------------------------------------------------------ dtype
def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU with bfloat16 support, or a
    CPU with the avx512_bf16 or AMX instructions (elsewhere bfloat16 is emulated, and slower than
    float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = re.search(r"^flags\s*:(.*)$", f.read(), re.MULTILINE)
    except OSError:
        return False
    return bool(flags) and bool({"avx512_bf16", "amx_bf16"} & set(flags.group(1).split()))


def resolve_inference_dtype(name: str, device) -> str:
    """``MODEL.INFERENCE_DTYPE`` for a model on ``device``: "auto" becomes "bfloat16" where
    :func:`native_bfloat16`, else "float32"; other names are returned as they are."""
    if name != "auto":
        return name
    return "bfloat16" if native_bfloat16(device) else "float32"


# ---------------------------------------------------------------------------- folding
@torch.no_grad()
def fold_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which every detectron2 ``Conv2d`` with a ``FrozenBatchNorm2d``
    norm is a single convolution with the norm folded into its weight and bias.

    The copy shares all other parameters and buffers with ``module`` (no memory for them) and
    needs no gradients; ``module`` is unchanged. For an input x, each folded conv gives
    ``norm(conv(x))`` up to float rounding.
    """
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    folded = copy.deepcopy(module, shared)
    for conv in folded.modules():
        if isinstance(conv, Conv2d) and isinstance(conv.norm, FrozenBatchNorm2d):
            norm = conv.norm
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
            bias = norm.bias - norm.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter(bias, requires_grad=False)
            conv.norm = None
    return folded


class _BackboneAndHead(nn.Module):
    """Backbone, then head on the features named ``in_features``: the part of inference that
    :class:`InferenceRunner` speeds up, as one module to compile."""

    def __init__(self, backbone: nn.Module, head: nn.Module, in_features: List[str]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.in_features = list(in_features)

    def forward(
        self, images: Tensor, contiguous_head_inputs: bool = False
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        features = self.backbone(images)
        features = [features[f] for f in self.in_features]
        if contiguous_head_inputs:
            features = [x.contiguous() for x in features]
        logits, deltas = self.head(features)
        return features, logits, deltas


def _tensor_key(t: Tensor) -> Tuple:
    try:
        version = t._version
    except RuntimeError:  # an inference tensor, which has no version counter
        version = -1
    return (t.data_ptr(), version, t.dtype, t.device)


# ----------------------------------------------------------------------------- runner
class InferenceRunner:
    """Runs a RetinaNet's backbone and head at inference with the chosen speed-ups.

    Not an ``nn.Module``: what it builds is not part of the model's modules or state_dict;
    copying the model (``copy.deepcopy``, pickling) gives a runner with nothing built.
    """

    def __init__(
        self, fold_frozen_bn: bool, channels_last: bool, compile: bool, winograd: bool = False
    ):
        """
        Args:
            fold_frozen_bn: fold each ``FrozenBatchNorm2d`` into its convolution.
            channels_last: run backbone and head on channels-last tensors (the head in
                (N, C, H, W) where the Winograd convolutions apply).
            compile: ``torch.compile`` backbone and head (``dynamic=True``; CPU: inductor with
                weight freezing). The first call compiles.
            winograd: on CPU in float32, run the eligible 3x3 convolutions by NNPACK's Winograd
                algorithm (:mod:`.winograd`); not with ``compile``, whose kernels replace them.
        """
        self.fold_frozen_bn = fold_frozen_bn
        self.channels_last = channels_last
        self.compile = compile
        self.winograd = winograd
        self.clear()

    def clear(self) -> None:
        """Drops what was built (it is rebuilt at the next call)."""
        self._runner = None
        self._key = None

    @property
    def enabled(self) -> bool:
        """Whether any speed-up is on."""
        return self.fold_frozen_bn or self.channels_last or self.compile or self.winograd

    @staticmethod
    def applies() -> bool:
        """False while the model is being scripted, traced or compiled as a whole: then the
        model's own modules run, as they are."""
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return False
        compiler = getattr(torch, "compiler", None)
        return not (compiler is not None and compiler.is_compiling())

    def __call__(
        self, backbone: nn.Module, head: nn.Module, in_features: List[str], images: Tensor
    ) -> Tuple[List[Tensor], Tuple[List[Tensor], List[Tensor]]]:
        """Features and head outputs of ``images``.

        Args:
            backbone, head, in_features: the model's backbone, head and head input features.
            images: (N, C, H, W) normalized, padded images.

        Returns:
            (features, (logits, deltas)): per level, (N, C', Hi, Wi) features, (N, A*K, Hi, Wi)
            logits and (N, A*4, Hi, Wi) deltas, as ``head(backbone(images))``.
        """
        runner = self.built(backbone, head, in_features, images.device)
        images, convolutions, contiguous_head_inputs = self.prepared(images)
        with convolutions:
            features, logits, deltas = runner(images, contiguous_head_inputs)
        return features, (logits, deltas)

    def prepared(self, images: Tensor) -> Tuple[Tensor, ContextManager, bool]:
        """How backbone and head run ``images``: the images in the backbone's layout, the
        context both run in (the Winograd convolutions where they apply, else nothing), and
        whether the head's inputs are made contiguous (N, C, H, W) for the Winograd
        convolutions. With both speed-ups, the backbone runs channels-last (its 1x1
        convolutions are faster so) and the head, nearly all 3x3 convolutions, Winograd."""
        winograd = self.winograd and not self.compile and winograd_applies(images.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        convolutions = WinogradConvolutions() if winograd else contextlib.nullcontext()
        return images, convolutions, winograd

    def built(self, backbone: nn.Module, head: nn.Module, in_features: List[str], device):
        """The module that runs backbone and head (folded, compiled) for the current weights:
        the one built before if no weight changed since, else a new one. Its ``backbone`` and
        ``head`` attributes (of the module it compiled, ``_orig_mod``, when compiled) can be
        called on their own."""
        key = tuple(
            _tensor_key(t)
            for t in itertools.chain(
                backbone.parameters(), backbone.buffers(), head.parameters(), head.buffers()
            )
        )
        if self._runner is None or key != self._key:
            self._runner = self._build(backbone, head, in_features, torch.device(device))
            self._key = key
        return self._runner

    def _build(self, backbone, head, in_features, device) -> nn.Module:
        if self.fold_frozen_bn:
            backbone = fold_frozen_batchnorm(backbone)
        runner = _BackboneAndHead(backbone, head, in_features)
        if not self.compile:
            return runner
        # Freezing turns the weights into constants the compiler can fold and pre-pack for
        # oneDNN; a weight change rebuilds (and recompiles) through the key above.
        options = {"freezing": True} if device.type == "cpu" else None
        return torch.compile(runner, dynamic=True, options=options)

    def __deepcopy__(self, memo) -> "InferenceRunner":
        return InferenceRunner(self.fold_frozen_bn, self.channels_last, self.compile, self.winograd)

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("_runner", "_key")}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.clear()
