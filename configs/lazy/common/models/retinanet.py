# The plugin's RetinaNet R50-FPN as a LazyConfig: the model configs/Base-RetinaNet.yaml builds
# (same modules, parameter names and defaults), written as detectron2's
# configs/common/models/retinanet.py writes its own, with the plugin's meta-architecture, head
# and anchor generator. The plugin's loss options are spelled out with their defaults.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from retinanet_plugin import FocalLossHead, FocalLossRetinaNet, RetinaNetAnchorGenerator

model = L(FocalLossRetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        norm="",
        # in_channels: the channels of res5 (2048 for ResNet-50 and deeper, 512 for 18 and 34).
        top_block=L(LastLevelP6P7)(in_channels=2048, out_channels="${..out_channels}"),
    ),
    head=L(FocalLossHead)(
        # One shape per level P3..P7: the FPN's output channels.
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes="${..num_classes}",
        # 3 octave scales x 3 aspect ratios of the anchor generator.
        num_anchors=9,
        conv_dims=[256, 256, 256, 256],
        norm="",
        prior_prob=0.01,
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    anchor_generator=L(RetinaNetAnchorGenerator)(
        sizes=[[32], [64], [128], [256], [512]],
        scales_per_octave=3,
        aspect_ratios=[[0.5, 1.0, 2.0]],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(
        thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True
    ),
    num_classes=80,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    smooth_l1_beta=0.0,
    box_reg_loss_type="smooth_l1",
    cls_loss_type="focal",
    loss_normalizer="ema",
    loss_normalizer_momentum=0.9,
    loss_normalizer_init=100.0,
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.5,
    max_detections_per_image=100,
    inference_dtype="float32",
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
)
