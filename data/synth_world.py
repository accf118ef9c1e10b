"""The synthetic shapes world: scenes, their images, and the caption grammar.

A `Scene` is the truth of an image: one shape (with a size and a position) or two
shapes (with a relation between them). Images are rendered from a scene with
background, colour and pixel jitter, so several images share one scene.

Captions come from one template grammar, used both to generate and to judge:

- *correct*: fully specified ("a small red circle on the left",
  "a red circle above a blue square"); `caption_matches_scene` is true.
- *weak*: true but underspecified alt-text ("a red shape", "two shapes");
  `caption_is_true` is true, `caption_matches_scene` is false.
- anything else (captions of other scenes, junk) is false for the scene.

Judging enumerates the scene's captions from the same templates as generation, so
the two cannot drift apart; captions are compared after `normalize_caption`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
RELATIONS = ("above", "left of")  # canonical: things[0] is above / left of things[1]
INVERSE = {"above": "below", "left of": "right of"}
CAPTION_KINDS = ("correct", "weak", "swapped", "junk")

_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
# Where a lone shape sits, in unit coordinates (x, y), y down.
_POSITION_CENTRE = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
_RADIUS = {"small": 0.12, "large": 0.21, None: 0.15}  # None: the size of each of two shapes
_JUNK_PHRASES = (
    "click here for deals",
    "free shipping on all orders",
    "buy now and save",
    "best price guaranteed",
    "download hd wallpaper",
    "untitled",
    "sale ends today",
    "subscribe for more",
    "stock photo royalty free",
    "home page banner",
)


@dataclass(frozen=True)
class Thing:
    """One shape of a scene; `size` is None in two-shape scenes (both are drawn alike)."""

    shape: str
    colour: str
    size: str | None = None

    def noun(self) -> str:
        """'red circle' (colour + shape, no size)."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What an image shows. One thing with a `position`, or two things with a `relation`.

    Two-thing scenes are canonical: `relation` is "above" or "left of" and
    `things[0]` is the upper / left one, so equal scenes compare equal.
    """

    things: tuple[Thing, ...]
    position: str | None = None
    relation: str | None = None

    def to_json(self) -> str:
        """A compact JSON string (the truth files store scenes this way)."""
        return json.dumps(
            {
                "things": [[t.shape, t.colour, t.size] for t in self.things],
                "position": self.position,
                "relation": self.relation,
            },
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str) -> Scene:
        """Inverse of `to_json`."""
        obj: dict[str, Any] = json.loads(text)
        things = tuple(Thing(shape, colour, size) for shape, colour, size in obj["things"])
        return Scene(things=things, position=obj["position"], relation=obj["relation"])


def all_scenes() -> tuple[Scene, ...]:
    """Every scene of the world: 144 one-shape and 612 two-shape scenes."""
    return _all_scenes()


@functools.cache
def _all_scenes() -> tuple[Scene, ...]:
    singles = [
        Scene(things=(Thing(shape, colour, size),), position=position)
        for shape in SHAPES
        for colour in COLOURS
        for size in SIZES
        for position in POSITIONS
    ]
    objects = [Thing(shape, colour) for shape in SHAPES for colour in COLOURS]
    pairs = [
        Scene(things=(a, b), relation=relation)
        for a in objects
        for b in objects
        if a != b
        for relation in RELATIONS
    ]
    return tuple(singles + pairs)


def sample_scene(rng: np.random.Generator, two_shape_rate: float = 0.5) -> Scene:
    """A random scene: two shapes with probability `two_shape_rate`, else one."""
    if rng.random() >= two_shape_rate:
        thing = Thing(_pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), _pick(rng, SIZES))
        return Scene(things=(thing,), position=_pick(rng, POSITIONS))
    objects = [Thing(shape, colour) for shape in SHAPES for colour in COLOURS]
    first, second = rng.choice(len(objects), size=2, replace=False)
    return Scene(things=(objects[first], objects[second]), relation=_pick(rng, RELATIONS))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------- captions


def normalize_caption(caption: str) -> str:
    """Lower case, punctuation dropped, single spaces, "an" read as "a": how captions
    are compared (so "An orange circle." equals "a orange circle")."""
    words = re.sub(r"[^a-z0-9 ]+", " ", caption.lower()).split()
    return " ".join("a" if w == "an" else w for w in words)


def _articles(caption: str) -> str:
    """'a orange' -> 'an orange' (generated captions read as English)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)


def correct_captions(scene: Scene) -> tuple[str, ...]:
    """Every fully specified phrasing of `scene` (at least 5, in a fixed order)."""
    return _correct_captions(scene)


@functools.cache
def _correct_captions(scene: Scene) -> tuple[str, ...]:
    return tuple(_articles(c) for c in _correct_templates(scene))


def _correct_templates(scene: Scene) -> tuple[str, ...]:
    if len(scene.things) == 1:
        thing = scene.things[0]
        assert scene.position is not None
        desc = f"{thing.size} {thing.colour} {thing.shape}"
        where = _POSITION_PHRASE[scene.position]
        return (
            f"a {desc} {where}",
            f"there is a {desc} {where}",
            f"{where} there is a {desc}",
            f"a picture of a {desc} {where}",
            f"a {desc} {where} of the image",
        )
    first, second = scene.things
    assert scene.relation is not None
    rel, inv = scene.relation, INVERSE[scene.relation]
    forward = f"a {first.noun()} {rel} a {second.noun()}"
    backward = f"a {second.noun()} {inv} a {first.noun()}"
    return (
        forward,
        backward,
        f"there is {forward}",
        f"there is {backward}",
        f"a picture of {forward}",
        f"a picture of {backward}",
    )


def weak_captions(scene: Scene) -> tuple[str, ...]:
    """True but underspecified captions of `scene` (vague alt-text), in a fixed order."""
    return _weak_captions(scene)


@functools.cache
def _weak_captions(scene: Scene) -> tuple[str, ...]:
    return tuple(_articles(c) for c in _weak_templates(scene))


def _weak_templates(scene: Scene) -> tuple[str, ...]:
    bg = "on a gray background"
    if len(scene.things) == 1:
        t = scene.things[0]
        assert scene.position is not None
        where = _POSITION_PHRASE[scene.position]
        return (
            f"a {t.colour} shape",
            f"a {t.shape}",
            f"a {t.colour} {t.shape}",
            f"a {t.size} shape",
            f"a {t.size} {t.shape}",
            f"a {t.size} {t.colour} shape",
            f"a {t.size} {t.colour} {t.shape}",
            f"a shape {where}",
            f"a {t.shape} {where}",
            f"a {t.colour} shape {where}",
            f"a {t.colour} {t.shape} {where}",
            "one shape",
            f"a shape {bg}",
            f"a {t.colour} {t.shape} {bg}",
            f"a {t.size} shape {bg}",
        )
    a, b = scene.things
    assert scene.relation is not None
    rel = scene.relation
    return (
        "two shapes",
        f"two shapes {bg}",
        f"a {a.noun()} and a {b.noun()}",
        f"a {b.noun()} and a {a.noun()}",
        f"a {a.shape} and a {b.shape}",
        f"a {a.colour} shape and a {b.colour} shape",
        f"a {a.noun()} and another shape",
        f"a {b.noun()} and another shape",
        f"a {a.shape} {rel} a {b.shape}",
        f"a {a.colour} shape {rel} a {b.colour} shape",
        f"a {a.noun()} and a {b.noun()} {bg}",
    )


def junk_caption(rng: np.random.Generator) -> str:
    """Web junk unrelated to any image: file names, ads, placeholders."""
    roll = int(rng.integers(3))
    number = int(rng.integers(10_000))
    if roll == 0:
        return f"IMG_{number:04d}.jpg"
    if roll == 1:
        return f"DSC{number:05d}.JPG"
    return _JUNK_PHRASES[int(rng.integers(len(_JUNK_PHRASES)))]


def caption_matches_scene(caption: str, scene: Scene) -> bool:
    """True when `caption` is a fully specified, correct description of `scene`.

    Any phrasing of the grammar counts ("a red circle above a blue square" and
    "a blue square below a red circle" both match); vague or wrong captions do not.
    """
    return normalize_caption(caption) in _correct_set(scene)


def caption_is_true(caption: str, scene: Scene) -> bool:
    """True when every fact `caption` states holds for `scene` (correct or weak)."""
    text = normalize_caption(caption)
    return text in _correct_set(scene) or text in _weak_set(scene)


def caption_kind(caption: str, scene: Scene) -> str:
    """'correct' (exact), 'weak' (true but vague), 'wrong' (parses, describes another
    scene) or 'other' (not a caption of the grammar)."""
    text = normalize_caption(caption)
    if text in _correct_set(scene):
        return "correct"
    if text in _weak_set(scene):
        return "weak"
    if text in _grammar_index():
        return "wrong"
    return "other"


def scene_of_caption(caption: str) -> Scene | None:
    """The scene a fully specified caption describes, or None if it describes none."""
    return _exact_index().get(normalize_caption(caption))


def scenes_match(a: Scene | None, b: Scene | None) -> bool:
    """Retrieval hit rule: two items are equivalent when their scenes are equal."""
    return a is not None and a == b


@functools.cache
def _correct_set(scene: Scene) -> frozenset[str]:
    return frozenset(normalize_caption(c) for c in correct_captions(scene))


@functools.cache
def _weak_set(scene: Scene) -> frozenset[str]:
    return frozenset(normalize_caption(c) for c in weak_captions(scene))


@functools.cache
def _exact_index() -> dict[str, Scene]:
    return {normalize_caption(c): s for s in all_scenes() for c in correct_captions(s)}


@functools.cache
def _grammar_index() -> frozenset[str]:
    return frozenset(_exact_index()) | frozenset(
        normalize_caption(c) for s in all_scenes() for c in weak_captions(s)
    )


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class RenderConfig:
    """How scenes become pixels."""

    __pydantic_config__ = {"extra": "forbid"}  # inside a run config's `video.world` block

    image_size: int = 32  # output side in pixels
    supersample: int = 2  # render at this multiple, then average-pool (smooth edges)
    background_range: tuple[int, int] = (90, 170)  # gray level of the background
    colour_jitter: int = 20  # +- per channel of a shape's colour
    pixel_noise: float = 6.0  # std of per-pixel gaussian noise
    position_jitter: float = 0.04  # +- unit coordinates of a shape's centre
    radius_jitter: float = 0.1  # +- fraction of a shape's radius


def render_scene(scene: Scene, rng: np.random.Generator, cfg: RenderConfig) -> np.ndarray:
    """Draw `scene` as a (S, S, 3) uint8 RGB array with the jitter `cfg` asks for."""
    gray = float(rng.integers(cfg.background_range[0], cfg.background_range[1] + 1))
    centres = _centres(scene, rng, cfg)
    looks = [_look(thing, rng, cfg) for thing in scene.things]
    return _add_noise(_paint(scene, centres, looks, gray, cfg), rng, cfg)


def render_clip(scene: Scene, rng: np.random.Generator, cfg: RenderConfig, frames: int, drift: float) -> list[np.ndarray]:
    """`frames` (S, S, 3) uint8 frames of `scene` in which the shapes drift and the scene stays true.

    The background, colours and sizes are drawn once per clip; the shapes then move
    linearly by `drift` (unit coordinates, in a random direction) along the axis that
    does not change what a caption says: a lone shape on the left moves up or down, two
    shapes one above the other move sideways together. Pixel noise is fresh per frame.
    """
    gray = float(rng.integers(cfg.background_range[0], cfg.background_range[1] + 1))
    start = _centres(scene, rng, cfg)
    looks = [_look(thing, rng, cfg) for thing in scene.things]
    dx, dy = _free_axis(scene)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    out = []
    for f in range(frames):
        step = sign * drift * (f / max(1, frames - 1) - 0.5)  # -drift/2 .. +drift/2
        centres = [(x + step * dx, y + step * dy) for x, y in start]
        out.append(_add_noise(_paint(scene, centres, looks, gray, cfg), rng, cfg))
    return out


def _free_axis(scene: Scene) -> tuple[float, float]:
    """The unit direction along which the scene's shapes may move without changing its truth."""
    if len(scene.things) == 1:
        return (0.0, 1.0) if scene.position in ("left", "right") else (1.0, 0.0)
    return (1.0, 0.0) if scene.relation == "above" else (0.0, 1.0)


def _look(thing: Thing, rng: np.random.Generator, cfg: RenderConfig) -> tuple[float, np.ndarray]:
    """A shape's jittered radius and colour (drawn in this order)."""
    radius = _RADIUS[thing.size] * (1.0 + rng.uniform(-cfg.radius_jitter, cfg.radius_jitter))
    colour = np.array(COLOURS[thing.colour], dtype=np.float32)
    colour += rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3)
    return radius, colour


def _paint(scene: Scene, centres: list[tuple[float, float]], looks: list[tuple[float, np.ndarray]], gray: float,
           cfg: RenderConfig) -> np.ndarray:  # fmt: skip
    """The noiseless (S, S, 3) float image: shapes at `centres` on a `gray` background."""
    big = cfg.image_size * cfg.supersample
    coords = (np.arange(big, dtype=np.float32) + 0.5) / big
    ys, xs = np.meshgrid(coords, coords, indexing="ij")  # (B, B) each
    canvas = np.full((big, big, 3), gray, dtype=np.float32)  # (B, B, 3)
    for thing, (cx, cy), (radius, colour) in zip(scene.things, centres, looks):
        canvas[_shape_mask(thing.shape, xs - cx, ys - cy, radius)] = colour
    s = cfg.supersample
    return canvas.reshape(cfg.image_size, s, cfg.image_size, s, 3).mean(axis=(1, 3))  # (S, S, 3)


def _add_noise(small: np.ndarray, rng: np.random.Generator, cfg: RenderConfig) -> np.ndarray:
    """Gaussian pixel noise added in place to the float32 image (float32 rounding, as always), as uint8."""
    small += rng.normal(0.0, cfg.pixel_noise, size=small.shape)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _centres(scene: Scene, rng: np.random.Generator, cfg: RenderConfig) -> list[tuple[float, float]]:
    j = cfg.position_jitter
    if len(scene.things) == 1:
        assert scene.position is not None
        x, y = _POSITION_CENTRE[scene.position]
        return [(x + rng.uniform(-j, j), y + rng.uniform(-j, j))]
    # Two shapes: apart along the relation's axis, close on the other one.
    shared = rng.uniform(-2 * j, 2 * j)
    across = [0.5 + shared + rng.uniform(-j, j) for _ in range(2)]
    along = [0.27 + rng.uniform(-j, j), 0.73 + rng.uniform(-j, j)]
    if scene.relation == "above":
        return [(across[0], along[0]), (across[1], along[1])]
    return [(along[0], across[0]), (along[1], across[1])]


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # pointing up: apex at -radius, base at +0.8 radius
        top, bottom = -radius, 0.8 * radius
        frac = (dy - top) / (bottom - top)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= frac * radius)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
