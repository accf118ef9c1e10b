"""Imported by each worker of the run's Dask LocalCluster as it starts (`preload`).

It imports what a shard task's first model load would otherwise import lazily: the stage
modules, `blip_core`'s checkpoint and tokenizer code (transformers) and `torch._dynamo`
(torch imports it the first time the model's weights are initialised), seconds in all
on a busy CPU, paid while the flow's earlier stages run instead of inside the first
shard task. Nothing else happens here: importing it twice changes nothing.
"""

from __future__ import annotations

import torch._dynamo  # noqa: F401

import blip_core.checkpoint  # noqa: F401
import blip_core.tokenizer  # noqa: F401
import tasks.caption  # noqa: F401
import tasks.filter  # noqa: F401
