"""retinanet_plugin.compat.private_api: each private detectron2 API the plugin uses behaves as
detectron2's own public behavior says, and its absence is one clear error naming it."""

import itertools

import pytest
import torch

import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from conftest import plugin_cfg
from detectron2.data.samplers import TrainingSampler
from retinanet_plugin.compat import private_api
from retinanet_plugin.compat.private_api import Detectron2APIError


class _Bare:
    """An object with none of the private attributes."""


def _sampler():
    return TrainingSampler(10, seed=3)


def _evaluator(name, output_dir):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator

    record = {"file_name": "a.jpg", "image_id": 1, "height": 8, "width": 8, "annotations": []}
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).set(thing_classes=["thing"])
    return COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=str(output_dir))


# (call that uses the private API, module holding it, its name)
MODULE_LEVEL = [
    (
        lambda: private_api.train_loader_arguments(plugin_cfg("retinanet_R18_GN_tiny.yaml")),
        "detectron2.data.build",
        "_train_loader_from_config",
    ),
    (private_api.find_free_port, "detectron2.engine.launch", "_find_free_port"),
    (
        private_api.dense_box_regression_loss,
        "detectron2.modeling.box_regression",
        "_dense_box_regression_loss",
    ),
    (
        lambda: private_api.set_local_process_group(None),
        "detectron2.utils.comm",
        "_LOCAL_PROCESS_GROUP",
    ),
]


@pytest.mark.parametrize(
    "call, module_name, name", MODULE_LEVEL, ids=[name for _, _, name in MODULE_LEVEL]
)
def test_missing_module_level_private_api_is_one_clear_error(monkeypatch, call, module_name, name):
    import importlib

    monkeypatch.delattr(importlib.import_module(module_name), name)
    with pytest.raises(Detectron2APIError) as info:
        call()
    message = str(info.value)
    assert f"`{module_name}.{name}`" in message
    assert private_api.TESTED_VERSIONS in message
    assert "the installed detectron2 (" in message


ATTRIBUTES = [
    (lambda obj: next(private_api.sampler_index_stream(obj)), "_infinite_indices"),
    (private_api.sampler_seed, "_seed"),
    (lambda obj: private_api.set_sampler_seed(obj, 1), "_seed"),
    (private_api.inner_trainer, "_trainer"),
    (private_api.restart_data_iterator, "_data_loader_iter"),
    (private_api.evaluator_coco_api, "_coco_api"),
    (private_api.evaluator_output_dir, "_output_dir"),
    (lambda obj: private_api.ema_update(obj, "n", 1.0, 1.0, 0.9), "_ema_update"),
    (private_api.option_actions, "_actions"),
    (private_api.evaluates_boxes_only, "_tasks"),
]


@pytest.mark.parametrize("call, name", ATTRIBUTES, ids=[name for _, name in ATTRIBUTES])
def test_missing_private_attribute_is_one_clear_error(call, name):
    with pytest.raises(Detectron2APIError, match=f"`{__name__}._Bare.{name}`"):
        call(_Bare())


def test_sampler_index_stream_and_seed_are_the_samplers():
    """The index stream is what the sampler yields in one process; setting the seed changes the
    stream to that of a sampler built with it."""
    sampler = _sampler()
    assert private_api.sampler_seed(sampler) == 3
    assert list(itertools.islice(private_api.sampler_index_stream(sampler), 25)) == list(
        itertools.islice(iter(_sampler()), 25)
    )
    private_api.set_sampler_seed(sampler, 8)
    assert list(itertools.islice(private_api.sampler_index_stream(sampler), 25)) == list(
        itertools.islice(iter(TrainingSampler(10, seed=8)), 25)
    )


def test_train_loader_arguments_are_those_of_detectron2s_loader():
    """The keys build_detection_train_loader takes, for the config's batch size and workers."""
    from detectron2.data import DatasetCatalog

    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", "DATASETS.TRAIN", "('compat_api_train',)")
    box = {"bbox": [1, 1, 4, 4], "bbox_mode": 0, "category_id": 0}
    record = {"file_name": "a.jpg", "image_id": 1, "height": 8, "width": 8, "annotations": [box]}
    DatasetCatalog.register("compat_api_train", lambda: [record])
    try:
        arguments = private_api.train_loader_arguments(cfg)
    finally:
        DatasetCatalog.remove("compat_api_train")
    assert arguments["total_batch_size"] == cfg.SOLVER.IMS_PER_BATCH
    assert arguments["num_workers"] == cfg.DATALOADER.NUM_WORKERS
    assert len(arguments["dataset"]) == 1
    assert isinstance(arguments["sampler"], TrainingSampler)


@pytest.mark.parametrize("sqrt", [True, False])
def test_repeat_factors_follow_repeat_sqrt(sqrt):
    """DATALOADER.REPEAT_SQRT (upstream main's key): each image repeated max(1, t / f) times, or
    the square root of that, f the fraction of images holding its rarest class; hand-computed
    for 10 images: class 0 in 9 (f 0.9), class 1 in 2 (f 0.2), class 2 in 5 (f 0.5), t = 1."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    classes_per_image = [{0, 1}, {1}] + [{0, 2}] * 5 + [{0}] * 3
    records = [
        {
            "file_name": f"{i}.jpg",
            "image_id": i,
            "height": 8,
            "width": 8,
            "annotations": [
                {"bbox": [1, 1, 4, 4], "bbox_mode": 0, "category_id": c} for c in sorted(classes)
            ],
        }
        for i, classes in enumerate(classes_per_image)
    ]
    cfg = plugin_cfg(
        "retinanet_R18_GN_tiny.yaml",
        *("DATASETS.TRAIN", "('compat_repeat_train',)"),
        *("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"),
        *("DATALOADER.REPEAT_THRESHOLD", "1.0", "DATALOADER.REPEAT_SQRT", str(sqrt)),
    )
    DatasetCatalog.register("compat_repeat_train", lambda: records)
    try:
        sampler = private_api.train_loader_arguments(cfg)["sampler"]
    finally:
        DatasetCatalog.remove("compat_repeat_train")
    linear = torch.tensor([5.0, 5.0] + [2.0] * 5 + [1 / 0.9] * 3, dtype=torch.float64)
    expected = linear.sqrt() if sqrt else linear
    assert isinstance(sampler, RepeatFactorTrainingSampler)
    factors = (sampler._int_part + sampler._frac_part).double()
    torch.testing.assert_close(factors, expected, rtol=1e-6, atol=0)


def test_restart_data_iterator_starts_the_loader_again():
    """After a restart the trainer's next batch is the loader's first again."""
    from detectron2.engine import SimpleTrainer

    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    trainer = SimpleTrainer(model, [["first"], ["second"]], optimizer)
    assert next(trainer._data_loader_iter) == ["first"]
    private_api.restart_data_iterator(trainer)
    assert next(trainer._data_loader_iter) == ["first"]


def test_box_evaluation_equals_detectron2s_and_changes_no_global(request, tmp_path):
    """With pycocotools' COCOeval passed in, evaluate_box_predictions gives detectron2's own
    results and results file (category ids mapped back to the dataset's), and leaves
    detectron2's module globals as they were."""
    from pycocotools.cocoeval import COCOeval

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator, coco_evaluation
    from detectron2.structures import BoxMode

    name = f"compat_api_{request.node.name}"
    box = {"bbox": [2.0, 3.0, 9.0, 9.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    record = {"file_name": "a.jpg", "image_id": 1, "height": 16, "width": 16, "annotations": [box]}
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).set(thing_classes=["thing"], thing_dataset_id_to_contiguous_id={7: 0})
    try:
        outputs = {}
        for way in ("detectron2", "adapter"):
            (tmp_path / way).mkdir()  # as evaluate() makes it before _eval_predictions
            evaluator = COCOEvaluator(
                name, tasks=("bbox",), distributed=False, output_dir=str(tmp_path / way)
            )
            evaluator._use_fast_impl = False  # detectron2's official-COCOeval path
            evaluator._results = {}  # what evaluate() sets before _eval_predictions
            predictions = [
                {
                    "image_id": 1,
                    "instances": [
                        {"image_id": 1, "category_id": 0, "bbox": bbox, "score": score}
                        for bbox, score in [([2.0, 3.0, 9.0, 8.0], 0.9), ([0, 0, 5, 5], 0.4)]
                    ],
                }
            ]
            globals_before = dict(vars(coco_evaluation))
            if way == "detectron2":
                evaluator._eval_predictions(predictions)
            else:
                private_api.evaluate_box_predictions(evaluator, predictions, None, COCOeval)
            assert vars(coco_evaluation) == globals_before
            results_file = tmp_path / way / "coco_instances_results.json"
            outputs[way] = (repr(evaluator._results), results_file.read_text())  # nan != nan
        assert outputs["adapter"] == outputs["detectron2"]
        assert '"category_id": 7' in outputs["adapter"][1]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_find_free_port_can_be_bound():
    import socket

    port = private_api.find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
