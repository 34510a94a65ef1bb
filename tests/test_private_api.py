"""retinanet_plugin.compat.private_api: each private detectron2 API the plugin uses behaves as
detectron2's own public behavior says, and its absence is one clear error naming it."""

import itertools
import pickle

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
        lambda: private_api.pkl_unpickler(pickle.load).__enter__(),
        "detectron2.checkpoint.detection_checkpoint",
        "pickle",
    ),
    (
        private_api.check_coco_evaluator_hooks,
        "detectron2.evaluation.coco_evaluation",
        "COCOeval_opt",
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
    (
        lambda obj: private_api.coco_eval_class_for_fast_path(obj, None).__enter__(),
        "_use_fast_impl",
    ),
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


def test_coco_eval_class_swap_is_restored_even_after_an_error(request, tmp_path):
    """Inside, detectron2 picks the given class (COCOeval_opt with _use_fast_impl) or pycocotools
    (None); afterwards both are back, also when evaluation raised."""
    from pycocotools.cocoeval import COCOeval

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import coco_evaluation

    name = f"compat_api_{request.node.name}"
    evaluator = _evaluator(name, tmp_path)
    try:
        saved = coco_evaluation.COCOeval_opt, evaluator._use_fast_impl

        class Marker(COCOeval):
            pass

        with pytest.raises(KeyError):
            with private_api.coco_eval_class_for_fast_path(evaluator, Marker):
                assert coco_evaluation.COCOeval_opt is Marker and evaluator._use_fast_impl
                raise KeyError("evaluation failed")
        assert (coco_evaluation.COCOeval_opt, evaluator._use_fast_impl) == saved
        with private_api.coco_eval_class_for_fast_path(evaluator, None):
            assert evaluator._use_fast_impl is False
        assert (coco_evaluation.COCOeval_opt, evaluator._use_fast_impl) == saved
        assert private_api.evaluator_coco_api(evaluator).getImgIds() == [1]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_pkl_unpickler_is_what_detectron2_loads_pkl_files_with(tmp_path):
    """detectron2's DetectionCheckpointer reads a .pkl through the given load function inside the
    context, and through pickle again after it."""
    from detectron2.checkpoint import DetectionCheckpointer

    path = tmp_path / "weights.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(1).numpy()}, "__author__": "test"}, f)
    calls = []

    def load(f, **kwargs):
        calls.append(kwargs)
        return pickle.load(f, **kwargs)

    checkpointer = DetectionCheckpointer(torch.nn.Linear(1, 1))
    with private_api.pkl_unpickler(load):
        loaded = checkpointer._load_file(str(path))
    assert calls == [{"encoding": "latin1"}]
    assert loaded["__author__"] == "test"
    checkpointer._load_file(str(path))
    assert len(calls) == 1


def test_find_free_port_can_be_bound():
    import socket

    port = private_api.find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
