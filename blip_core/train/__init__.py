"""BLIP training: `train(cfg, dataset_factory, tokenizer=None) -> TrainResult` and its config.

The caller supplies the data as a factory `(rank, world_size) -> dataset` (blip_core
never reads shards itself); see `blip_core.train.loop` for what a run writes.
"""

from blip_core.momentum import QueueSizeError
from blip_core.train.checkpoint import CheckpointError, latest_checkpoint
from blip_core.train.config import MODES, OBJECTIVES, TrainConfig
from blip_core.train.loop import DatasetFactory, EmptyDatasetError, NonFiniteLossError, TrainResult, train
from blip_core.train.state import CheckpointMismatchError

__all__ = [
    "MODES",
    "OBJECTIVES",
    "CheckpointError",
    "CheckpointMismatchError",
    "DatasetFactory",
    "EmptyDatasetError",
    "NonFiniteLossError",
    "QueueSizeError",
    "TrainConfig",
    "TrainResult",
    "latest_checkpoint",
    "train",
]
