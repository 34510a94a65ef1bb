"""Reading video files frame by frame, with OpenCV (``cv2``, detectron2's own dependency for its
video demo), for ``predict``: a video is predicted as the sequence of its frames.

A file that OpenCV cannot open, or in which it decodes no frame, raises :class:`VideoReadError`,
one line naming the file.
"""

import math
from typing import Iterator, List

import numpy as np

from ..errors import UserError

__all__ = ["VIDEO_EXTENSIONS", "DEFAULT_FPS", "VideoReadError", "video_fps", "video_frames"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
# The frame rate of an annotated video when its input's container does not state one.
DEFAULT_FPS = 25.0


class VideoReadError(UserError, OSError):
    """A video file that cannot be read (missing, not a video, no decodable frame)."""


def _capture(path: str):
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise VideoReadError(
            f"{path}: OpenCV cannot open it as a video (missing, not a video, or a codec that "
            "this OpenCV build lacks)"
        )
    return capture


def video_fps(path: str) -> float:
    """The frame rate ``path`` states, :data:`DEFAULT_FPS` where it states none.

    Raises:
        VideoReadError: OpenCV cannot open the file.
    """
    import cv2

    capture = _capture(path)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return float(fps) if math.isfinite(fps) and fps > 0 else DEFAULT_FPS


def video_frames(path: str, batch_size: int) -> Iterator[List[np.ndarray]]:
    """The frames of a video file in order, ``batch_size`` at a time (the last batch may be
    shorter): each an (H, W, 3) uint8 array in BGR order, as OpenCV decodes it.

    Raises:
        VideoReadError: OpenCV cannot open the file, or decodes no frame in it.
    """
    capture = _capture(path)
    batch: List[np.ndarray] = []
    frames = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames += 1
            batch.append(frame)
            if len(batch) == batch_size:
                yield batch
                batch = []
    finally:
        capture.release()
    if batch:
        yield batch
    if not frames:
        raise VideoReadError(f"{path}: OpenCV opens it but decodes no frame (empty or corrupt)")
