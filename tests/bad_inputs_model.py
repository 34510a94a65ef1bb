"""Bad-input cases: model (see bad_input_env.py; run by test_bad_inputs.py)."""

from typing import Dict

from bad_input_env import Case

CASES: Dict[str, Case] = {}

CASES["model-anchor-sizes-listing-octave-scales"] = Case(
    "train_net.py",
    "`MODEL.ANCHOR_GENERATOR.SIZES` listing 3 sizes per level (detectron2's model zoo) with "
    "`SCALES_PER_OCTAVE 3` (27 anchors per location instead of 9)",
    lambda e: e.train(
        "MODEL.ANCHOR_GENERATOR.SIZES",
        "[[32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406], [512, 645, 812]]",
    ),
    [
        "MODEL.ANCHOR_GENERATOR.SIZES has 3 sizes per level (9 anchors per location",
        "SCALES_PER_OCTAVE 3",
        "27 anchors per location",
        "set SCALES_PER_OCTAVE 1",
    ],
)
