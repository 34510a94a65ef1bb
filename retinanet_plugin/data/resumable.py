"""A training data loader that a resumed run continues exactly where the killed run stopped.

detectron2's training loader restarts its sampler's shuffled stream from the beginning on
``--resume``, draws augmentations from whichever worker process maps an image, and loses the
half-filled aspect-ratio buckets, so a resumed run sees other batches than an uninterrupted one.
:class:`ResumableTrainLoader` keeps detectron2's pieces (its dataset filtering, sampler, mapper,
``MapDataset`` and ``AspectRatioGroupedDataset``) and makes the stream a function of the sampler's
seed and the iteration:

- every image of the stream has a position (its place in this rank's share of the sampler's
  stream); its augmentations draw from Python's, numpy's and torch's global RNGs reseeded from
  (seed, rank, position), so they do not depend on the worker that maps it or on the run's history;
- to start at iteration ``i``, the loader replays the first ``i`` batches from the images' sizes
  alone (no decoding), then maps the images left in the aspect-ratio buckets followed by the rest
  of the stream.

Only the sampler's seed is saved (:meth:`ResumableTrainLoader.state_dict`). An image that cannot be
read is skipped with a warning and a count (:class:`SkipUnreadableImages`), and detectron2's
``MapDataset`` maps a random other one instead, which is not replayed: batches after such a skip
may differ from an uninterrupted run's.
"""

import contextlib
import itertools
import logging
import operator
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils import data as torchdata

from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import AspectRatioGroupedDataset, DatasetFromList, MapDataset
from detectron2.utils import comm

from ..compat.private_api import (
    sampler_index_stream,
    sampler_seed,
    set_sampler_seed,
    train_loader_arguments,
)

__all__ = ["ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _rng_seeded(entropy: Sequence[int]) -> Iterator[None]:
    """Seeds Python's, numpy's and torch's CPU global RNGs from ``entropy`` and restores their
    previous states afterwards, so the caller's random streams are untouched. (Augmentations run
    on the CPU; ``torch.manual_seed`` would also reseed, and lose, the CUDA RNGs.)"""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _rank_indices(sampler, rank: int, world_size: int) -> Iterator[int]:
    """A rank's share of the sampler's infinite index stream, as detectron2's samplers
    (``TrainingSampler``, ``RepeatFactorTrainingSampler``, ...) iterate it."""
    return itertools.islice(sampler_index_stream(sampler), rank, None, world_size)


class _PositionedStream(torchdata.IterableDataset):
    """Maps the images at the given positions of this rank's stream, each with its augmentation
    RNGs seeded from (seed, rank, position); shards the positions over data loader workers."""

    def __init__(self, mapped: MapDataset, sampler, leftovers: List[int], next_position: int):
        self.mapped = mapped
        self.sampler = sampler
        self.seed = sampler_seed(sampler)
        self.leftovers = leftovers
        self.next_position = next_position
        # Read here, in the main process: workers are not part of the process group.
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()

    def __iter__(self) -> Iterator[Dict]:
        positions = itertools.chain(self.leftovers, itertools.count(self.next_position))
        worker = torchdata.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            positions = itertools.islice(positions, worker.id, None, worker.num_workers)
        indices = _rank_indices(self.sampler, self.rank, self.world_size)
        current, index = -1, None
        for position in positions:  # strictly increasing
            while current < position:
                index = next(indices)
                current += 1
            with _rng_seeded((self.seed, self.rank, position)):
                yield self.mapped[index]


# What reading a truncated, corrupt or missing image raises in detectron2's read_image: PIL's
# UnidentifiedImageError and "image file is truncated" are OSErrors; some broken PNG chunks give
# SyntaxError.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError)


class SkipUnreadableImages:
    """A mapper that returns None for an image that cannot be read, with a warning naming the
    file and the count so far; detectron2's ``MapDataset`` then maps a random other image
    instead, as it does for any None.

    Args:
        mapper: maps a dataset dict to the model's input dict (e.g. detectron2's DatasetMapper).
    """

    def __init__(self, mapper: Callable[[Dict], Dict]):
        self.mapper = mapper
        self.num_skipped = 0  # per data loader process

    def __call__(self, record: Dict) -> Optional[Dict]:
        try:
            return self.mapper(record)
        except UNREADABLE_IMAGE_ERRORS as e:
            self.num_skipped += 1
            logger.warning(
                "Skipped %s: cannot read it (%s: %s); %d images skipped so far by this data "
                "loader process",
                record.get("file_name"),
                type(e).__name__,
                e,
                self.num_skipped,
            )
            return None


def _plain_batches(items, batch_size: int) -> Iterator[List[Dict]]:
    iterator = iter(items)
    while True:
        yield [next(iterator) for _ in range(batch_size)]


class ResumableTrainLoader:
    """An infinite iterable of this rank's training batches (lists of mapped dataset dicts) that
    can start at any iteration with the batches an uninterrupted run would have had there.

    Args:
        dataset: the dataset dicts (each with "file_name", and "width"/"height" for grouping), as
            a list or a map-style dataset such as detectron2's ``DatasetFromList``.
        mapper: maps a dataset dict to the model's input dict (e.g. detectron2's DatasetMapper).
            Its randomness must come from Python's, numpy's or torch's global RNG, as
            detectron2's augmentations' does.
        sampler: a detectron2 training sampler (with ``_infinite_indices`` and ``_seed``). If
            its seed is None or negative (detectron2 after 0.6 passes ``SEED -1`` on), a seed
            shared by all processes is drawn, as detectron2 0.6 does; it is saved for resume.
        batch_size: images per batch on this rank.
        aspect_ratio_grouping: batch landscape and portrait images separately, as detectron2's
            ``AspectRatioGroupedDataset`` does.
        num_workers: data loader worker processes.
    """

    def __init__(
        self,
        dataset: Union[List[Dict], torchdata.Dataset],
        mapper: Callable[[Dict], Dict],
        sampler,
        batch_size: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
    ):
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        self.dataset = dataset
        self.mapped = MapDataset(dataset, SkipUnreadableImages(mapper))
        self.sampler = sampler
        seed = sampler_seed(sampler)
        if seed is None or seed < 0:
            # Every rank must call this (it synchronises), as every rank builds its loader.
            set_sampler_seed(sampler, comm.shared_random_seed())
            logger.info(
                "Training data shuffle seed %d (drawn: the sampler's seed was %s)",
                sampler_seed(sampler),
                seed,
            )
        self.batch_size = batch_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        # The iteration whose batch the next iterator yields first.
        self.start_iter = 0

    def state_dict(self) -> Dict[str, int]:
        """What a checkpoint needs to rebuild the stream: the sampler's seed (random per run
        unless SEED is set)."""
        return {"seed": sampler_seed(self.sampler)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        set_sampler_seed(self.sampler, state["seed"])

    def _is_landscape(self, record: Dict) -> bool:
        if "width" in record and "height" in record:
            width, height = record["width"], record["height"]
        else:  # the mapper fills them in from the image; its header is enough here
            with Image.open(record["file_name"]) as image:
                width, height = image.size
        return width > height  # AspectRatioGroupedDataset's two buckets

    def replay(self, num_batches: int) -> Tuple[List[int], int]:
        """Forms the first ``num_batches`` batches of this rank's stream from image sizes only.

        Returns:
            The positions left waiting in the aspect-ratio buckets after those batches (in stream
            order) and the position of the next image the stream would read.
        """
        if not self.aspect_ratio_grouping:
            return [], num_batches * self.batch_size
        buckets: Tuple[List[int], List[int]] = ([], [])
        position, batches = 0, 0
        indices = _rank_indices(self.sampler, comm.get_rank(), comm.get_world_size())
        landscape: Dict[int, bool] = {}  # each record is read once, however many epochs
        while batches < num_batches:
            index = next(indices)
            if index not in landscape:
                landscape[index] = self._is_landscape(self.dataset[index])
            bucket = buckets[0 if landscape[index] else 1]
            bucket.append(position)
            position += 1
            if len(bucket) == self.batch_size:
                bucket.clear()
                batches += 1
        return sorted(buckets[0] + buckets[1]), position

    def __iter__(self) -> Iterator[List[Dict]]:
        leftovers, next_position = self.replay(self.start_iter)
        if self.start_iter:
            logger.info(
                "Training data resumes at iteration %d: image %d of this rank's stream "
                "(seed %d), %d images waiting in aspect-ratio buckets",
                self.start_iter,
                next_position,
                sampler_seed(self.sampler),
                len(leftovers),
            )
        stream = _PositionedStream(self.mapped, self.sampler, leftovers, next_position)
        loader = torchdata.DataLoader(
            stream,
            num_workers=self.num_workers,
            collate_fn=operator.itemgetter(0),  # one mapped dict at a time, as detectron2
            worker_init_fn=worker_init_reset_seed,
            # Worker seeds from the stream's seed rather than a draw from the global torch RNG.
            generator=torch.Generator().manual_seed(sampler_seed(self.sampler)),
        )
        if self.aspect_ratio_grouping:
            return iter(AspectRatioGroupedDataset(loader, self.batch_size))
        return _plain_batches(loader, self.batch_size)


def build_resumable_train_loader(cfg, mapper=None, dataset=None) -> ResumableTrainLoader:
    """detectron2's ``build_detection_train_loader(cfg, mapper, dataset=dataset)`` (same datasets,
    filtering, DATALOADER.SAMPLER_TRAIN, batch size per rank, grouping and workers) as a
    :class:`ResumableTrainLoader`."""
    kwargs = train_loader_arguments(cfg, mapper, dataset=dataset)
    world_size = comm.get_world_size()
    total = kwargs["total_batch_size"]
    if total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH = {total} must be divisible by the number of processes "
            f"({world_size})"
        )
    return ResumableTrainLoader(
        kwargs["dataset"],
        kwargs["mapper"],
        kwargs["sampler"],
        batch_size=total // world_size,
        aspect_ratio_grouping=kwargs["aspect_ratio_grouping"],
        num_workers=kwargs["num_workers"],
    )
