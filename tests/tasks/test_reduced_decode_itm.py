"""The stages' reduced decode (issue 16): ITM scores barely move, and the setting is hashed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from stage_helpers import caption, tiny_model

import blip_core
from blip_core.image import ImageTransform
from data.synth_photo import photo_jpeg
from tasks.caption import CaptionConfig
from tasks.execution import ExecutionConfig, semantic_settings
from tasks.filter import FilterConfig
from tasks.image_batches import image_batches, index_batches

# The filter decides at threshold 0.5 on P(match); a change far below 1e-2 cannot move
# a decision except for a score already within that distance of the threshold.
_MAX_SCORE_CHANGE = 1e-2
_SIZES = [(1600, 1200)] * 8 + [(640, 480)] * 8  # 16 real-size web JPEGs


def itm_scores(loaded: blip_core.LoadedModel, jpg: pa.Array, decode: str) -> np.ndarray:
    """P(match) of image i with caption(i), the images decoded through the stages' loader."""
    transform = ImageTransform(loaded.model.config.vision.image_size)
    batches = index_batches(np.arange(len(jpg)), 8)
    execution = ExecutionConfig(num_workers=0, device="cpu")
    scores = []
    with torch.no_grad():
        for rows, (pixels, errors) in zip(batches, image_batches(jpg, batches, transform, execution, torch.device("cpu"), decode)):
            assert not any(errors)
            ids, mask = loaded.tokenizer.encode([caption(r) for r in rows], mode="itm", max_length=35)
            scores.append(loaded.model.itm_probability(pixels, ids, mask).numpy())
    return np.concatenate(scores)


@pytest.mark.parametrize("image_size", [224, 32])
def test_itm_change_reduced_vs_exact(tmp_path: Path, image_size: int) -> None:
    loaded = blip_core.load(tiny_model(tmp_path, image_size=image_size))
    jpg = pa.array([photo_jpeg(i, w, h) for i, (w, h) in enumerate(_SIZES)], pa.binary())
    exact, reduced = itm_scores(loaded, jpg, "exact"), itm_scores(loaded, jpg, "reduced")
    change = np.abs(reduced - exact)
    print(f"ITM change at {image_size} px over {len(jpg)} JPEGs: max {change.max():.2e} mean {change.mean():.2e}, "
          f"score spread across images {exact.std():.2e}")  # fmt: skip
    assert change.max() < _MAX_SCORE_CHANGE
    assert change.max() < exact.std()  # the images differ more than the two decodes of one image


def test_decode_is_a_semantic_setting() -> None:
    for cls in (CaptionConfig, FilterConfig):
        assert cls().decode == "reduced"
        assert semantic_settings(cls())["decode"] == "reduced"
        assert semantic_settings(cls(decode="exact")) != semantic_settings(cls())
        with pytest.raises(ValueError, match="decode must be one of"):
            cls(decode="fast")


def test_unknown_decode_mode_is_refused() -> None:
    jpg = pa.array([photo_jpeg(0, 64, 48)], pa.binary())
    with pytest.raises(ValueError, match="decode must be one of"):
        list(image_batches(jpg, [[0]], ImageTransform(32), ExecutionConfig(num_workers=0), torch.device("cpu"), "fast"))
