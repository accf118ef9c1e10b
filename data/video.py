"""Video bytes <-> frames through PyAV (ffmpeg's libraries, bundled with the wheel).

`sample_frames(data, n)` decodes `n` frames spaced uniformly over a clip's duration, as
BLIP's zero-shot video evaluation samples them (frame ``i`` is the one showing at
``i * duration / n``: the start of each of n equal segments). It seeks: for a target
more than `SEEK_GAP_S` past the last decoded frame it jumps to the keyframe before the
target and decodes forward from there, so a long video costs about n GOPs, not its
length. It never raises for bad bytes: a `DecodedVideo` carries the frames or an
``error`` of the form ``"<kind>: <detail>"`` (kinds below), which ingestion stores.

`encode_video(frames, fps, codec)` writes RGB frames as one clip in memory (the
synthetic video world and the tests make their clips with it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Failure kinds (text before the colon of a failed row's `error`).
EMPTY = "empty"  # no bytes, or a stream without a single decodable frame
UNDECODABLE = "undecodable"  # ffmpeg cannot open or decode it
NO_VIDEO = "no_video_stream"
TOO_LONG = "too_long"
TOO_LARGE = "too_large"
TRUNCATED = "truncated"  # the stream ends well before its stated duration

# Limits: a clip longer, bigger or with larger frames than these is a failed row.
MAX_DURATION_S = 3600.0  # MSR-VTT clips are 10-30 s; an hour is surely not a clip
MAX_BYTES = 1 << 30
MAX_FRAME_PIXELS = 4096 * 4096
# Seek when the next target lies this far past the last decoded frame; closer targets
# are reached by decoding on (cheaper than a seek back to the previous keyframe).
SEEK_GAP_S = 2.0
# A target later than the last frame by more than this share of the duration (or two
# frame intervals, whichever is more) means the stream was cut short.
_TRUNCATION_SHARE = 0.05

CODECS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    # name: (container format, ffmpeg encoder, pixel format, encoder options)
    "h264": ("mp4", "libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),
    "h264-lossless": ("mp4", "libx264rgb", "rgb24", {"crf": "0", "preset": "veryfast"}),
    "vp9": ("webm", "libvpx-vp9", "yuv420p", {"crf": "30", "b": "0", "deadline": "realtime"}),
    "ffv1": ("matroska", "ffv1", "bgr0", {}),  # lossless
}


@dataclass(frozen=True)
class VideoLimits:
    """What `sample_frames` refuses (each a failed row with its reason)."""

    max_duration_s: float = MAX_DURATION_S
    max_bytes: int = MAX_BYTES
    max_frame_pixels: int = MAX_FRAME_PIXELS


@dataclass
class VideoInfo:
    """What the container says about the clip's video stream."""

    duration_s: float
    fps: float | None
    width: int
    height: int
    codec: str
    container: str
    frames: int | None  # as the container states it (None when it does not)


@dataclass
class DecodedVideo:
    """`frames` (RGB PIL images, one per target time) or `error`; `info` when the header read."""

    frames: list[Image.Image] = field(default_factory=list)
    error: str | None = None
    info: VideoInfo | None = None
    times: list[float] = field(default_factory=list)  # presentation time of each returned frame
    decoded: int = 0  # frames the decoder produced (seeking keeps this far below the clip's count)

    @property
    def ok(self) -> bool:
        return self.error is None


def sample_times(duration_s: float, n: int) -> list[float]:
    """BLIP's uniform sampling: the start of each of `n` equal segments of the clip."""
    if n < 1:
        raise ValueError(f"n must be >= 1 frames, got {n}")
    return [i * duration_s / n for i in range(n)]


def sample_frames(data: bytes | None, n: int, limits: VideoLimits | None = None) -> DecodedVideo:
    """Decode `n` frames uniformly spaced over the clip in `data` (any container / codec
    ffmpeg reads); never raises for bad bytes (see the module docstring)."""
    import av

    limits = limits or VideoLimits()
    if not data:
        return DecodedVideo(error=f"{EMPTY}: no bytes")
    if len(data) > limits.max_bytes:
        return DecodedVideo(error=f"{TOO_LARGE}: {len(data)} bytes > {limits.max_bytes}")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            return _sample(container, n, limits)
    except av.FFmpegError as exc:
        return DecodedVideo(error=f"{UNDECODABLE}: {_reason(exc)}")
    except (ValueError, OSError, EOFError, MemoryError) as exc:  # PyAV raises these for odd streams too
        return DecodedVideo(error=f"{UNDECODABLE}: {type(exc).__name__}: {exc}")


def probe(data: bytes | None, limits: VideoLimits | None = None) -> DecodedVideo:
    """Check a clip the way ingestion does: header, limits and two frames (at 0 and half
    way, which also catches a file cut in half)."""
    return sample_frames(data, 2, limits)


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.replace("\n", " ")[:200]


def _info(container, stream) -> VideoInfo:
    ctx = stream.codec_context
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    if not duration and container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    rate = stream.average_rate or stream.guessed_rate
    return VideoInfo(
        duration_s=float(duration or 0.0),
        fps=float(rate) if rate else None,
        width=int(ctx.width or 0),
        height=int(ctx.height or 0),
        codec=ctx.name,
        container=container.format.name,
        frames=int(stream.frames) or None,
    )


def _check(info: VideoInfo, limits: VideoLimits) -> str | None:
    if info.duration_s > limits.max_duration_s:
        return f"{TOO_LONG}: {info.duration_s:.1f} s > {limits.max_duration_s:.0f} s"
    if info.width * info.height > limits.max_frame_pixels:
        return f"{TOO_LARGE}: frames of {info.width}x{info.height} > {limits.max_frame_pixels} pixels"
    return None


def _sample(container, n: int, limits: VideoLimits) -> DecodedVideo:
    if not container.streams.video:
        return DecodedVideo(error=f"{NO_VIDEO}: the file holds no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    info = _info(container, stream)
    if (problem := _check(info, limits)) is not None:
        return DecodedVideo(error=problem, info=info)
    if info.duration_s <= 0:  # no stated duration: decode it all (bounded by the byte limit)
        return _sample_unknown_length(container, stream, n, info)
    targets = sample_times(info.duration_s, n)
    interval = 1.0 / info.fps if info.fps else 0.0
    out = DecodedVideo(info=info)
    frames = _Frames(container, stream)
    for t in targets:
        if frames.last is None or t - frames.last_time > SEEK_GAP_S:
            frames.seek(t)
        picked = frames.at(t)
        if picked is None:
            break
        image, time = picked
        out.frames.append(image)
        out.times.append(time)
    out.decoded = frames.decoded
    if not out.frames:
        return DecodedVideo(error=f"{EMPTY}: no decodable frame", info=info, decoded=frames.decoded)
    slack = max(2 * interval, _TRUNCATION_SHARE * info.duration_s)
    if len(out.frames) < n or targets[-1] - out.times[-1] > slack:
        reached = out.times[-1]
        return DecodedVideo(error=f"{TRUNCATED}: frames end at {reached:.2f} s of {info.duration_s:.2f} s",
                            info=info, decoded=frames.decoded)  # fmt: skip
    return out


class _Frames:
    """A forward cursor over a stream's decoded frames that can seek; keeps the last frame."""

    def __init__(self, container, stream) -> None:
        self.container, self.stream = container, stream
        self.iterator = None
        self.last = None  # the newest decoded frame (an av.VideoFrame)
        self.last_time = -1.0
        self.pending = None  # a frame decoded past the previous target, not yet consumed
        self.decoded = 0

    def seek(self, t: float) -> None:
        """Jump to the keyframe at or before `t` (in the stream's time base)."""
        if t > 0 and self.stream.time_base is not None:
            self.container.seek(int(t / self.stream.time_base), stream=self.stream, backward=True, any_frame=False)
        elif self.iterator is not None:
            self.container.seek(0, stream=self.stream, backward=True, any_frame=False)
        self.iterator = self.container.decode(self.stream)
        self.last, self.last_time, self.pending = None, -1.0, None

    def _next(self):
        if self.pending is not None:
            frame, self.pending = self.pending, None
            return frame
        try:
            frame = next(self.iterator)
        except StopIteration:
            return None
        self.decoded += 1
        return frame

    def at(self, t: float) -> tuple[Image.Image, float] | None:
        """The frame showing at `t` (the last one starting at or before it; the first frame
        for targets before the stream starts); None when the stream has no frame left."""
        while True:
            frame = self._next()
            if frame is None:
                break
            time = _frame_time(frame, self.last_time)
            if time > t + 1e-6 and self.last is not None:
                self.pending = frame
                break
            self.last, self.last_time = frame, time
            if time > t:  # the stream starts after t: its first frame shows at t
                break
        if self.last is None:
            return None
        return self.last.to_image(), self.last_time


def _frame_time(frame, previous: float) -> float:
    if frame.time is not None:
        return float(frame.time)
    return previous + 1e-3  # no timestamp: keep order


def _sample_unknown_length(container, stream, n: int, info: VideoInfo) -> DecodedVideo:
    frames = []
    for frame in container.decode(stream):
        frames.append(frame)
    if not frames:
        return DecodedVideo(error=f"{EMPTY}: no decodable frame", info=info)
    picks = [int(i * len(frames) / n) for i in range(n)]
    return DecodedVideo(
        frames=[frames[i].to_image() for i in picks], info=info,
        times=[_frame_time(frames[i], float(i)) for i in picks], decoded=len(frames),
    )  # fmt: skip


def encode_video(frames: Sequence[np.ndarray], fps: int = 8, codec: str = "h264", gop: int | None = None) -> bytes:
    """Encode (H, W, 3) uint8 RGB frames as one clip in memory (`CODECS` names the choices).

    `gop`: frames between keyframes (None: the encoder's default). H.264 and VP9 with
    4:2:0 chroma need even sides.
    """
    import av

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    if not frames:
        raise ValueError("encode_video needs at least one frame")
    fmt, encoder, pix_fmt, options = CODECS[codec]
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = dict(options)
        if gop is not None:
            stream.codec_context.gop_size = gop
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
