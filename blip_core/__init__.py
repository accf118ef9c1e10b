"""blip_core: BLIP's MED model in plain PyTorch, generation, checkpoints and HF interop.

Names are imported lazily so `import blip_core` stays cheap (transformers is only
loaded by the tokenizer and the Hugging Face bridge).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MEDConfig": "blip_core.config",
    "VisionConfig": "blip_core.config",
    "TextConfig": "blip_core.config",
    "preset": "blip_core.config",
    "MED": "blip_core.med",
    "generate": "blip_core.generation",
    "save": "blip_core.checkpoint",
    "load": "blip_core.checkpoint",
    "LoadedModel": "blip_core.checkpoint",
    "export_hf": "blip_core.hf",
    "Tokenizer": "blip_core.tokenizer",
    "build_tokenizer": "blip_core.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blip_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
