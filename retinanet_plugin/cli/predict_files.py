"""Which files ``predict`` reads and writes: the images and videos its ``--input`` options name,
the outputs that mirror them under ``--output``, and the checks that a run replaces nothing it
did not write (``predict_run.json`` lists a run's files for ``--overwrite``)."""

import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from retinanet_plugin.data.images import IMAGE_EXTENSIONS
from retinanet_plugin.data.video import VIDEO_EXTENSIONS
from retinanet_plugin.errors import UserError

logger = logging.getLogger(__name__)


class PredictError(UserError, ValueError):
    """A prediction command that cannot work as given."""


RESULTS_FILE = "coco_results.json"
# The list of a run's files, so that --overwrite deletes exactly those.
RUN_FILE = "predict_run.json"
# --yolo-txt: the class names by index, one a line.
YOLO_CLASSES_FILE = "classes.txt"


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def _folder_files(folder: str, extensions: Tuple[str, ...]) -> Tuple[List[str], int]:
    """The files with ``extensions`` in ``folder`` and its sub-folders, sorted, and the number
    of other files there."""
    found, others = [], 0
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(extensions):
                found.append(os.path.join(parent, name))
            else:
                others += 1
    return found, others


def find_images(
    inputs: Sequence[str], option: str = "--input", videos: bool = False
) -> Tuple[List[Tuple[str, str]], List[str]]:
    """The image files (and video files if ``videos``) that ``--input`` options name, in
    order, without repeats.

    Args:
        inputs: files (taken whatever their extension), folders (their image files by extension,
            sub-folders included) and glob patterns (their matches, as files or folders).
        option: the option they were given with, for the messages.

    Returns:
        A list of (file, root): each file with the folder whose tree its picture mirrors (the
        input folder, or the file's own folder); and the input folders, matched ones included.

    Raises:
        PredictError: an input that does not exist, matches nothing or holds no image.
    """
    extensions = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if videos else ())
    kinds = "images or videos" if videos else "images"
    found: Dict[str, Tuple[str, str]] = {}  # normalized path -> (path, root)
    folders: List[str] = []
    skipped = 0
    for item in inputs:
        if os.path.isdir(item) or os.path.isfile(item):
            matches = [item]
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise PredictError(f"{option} {item}: no image file matched (no file matches it)")
        else:
            raise PredictError(f"{option} {item} does not exist")
        given = 0
        for match in matches:
            if os.path.isdir(match):
                files, others = _folder_files(match, extensions)
                folders.append(match)
                skipped += others
                pairs = [(path, match) for path in files]
            elif match == item or match.lower().endswith(extensions):  # named, or matching
                pairs = [(match, os.path.dirname(match) or ".")]
            else:
                skipped += 1
                pairs = []
            given += len(pairs)
            for path, root in pairs:
                found.setdefault(os.path.normpath(os.path.abspath(path)), (path, root))
        if not given:
            raise PredictError(
                f"{option} {item}: no image file matched (none with the extensions "
                f"{', '.join(extensions)} in it or its sub-folders)"
            )
    if skipped:
        logger.info("Left out %d file(s) in the %s folders that are not %s", skipped, option, kinds)
    return list(found.values()), folders


@dataclass
class OutputNames:
    """The files a run writes for one input, relative to ``--output`` ("" for none)."""

    drawing: str  # the annotated picture (.png) or video (.mp4)
    json: str = ""  # --per-image-json
    yolo: str = ""  # --yolo-txt

    def files(self) -> List[str]:
        return [name for name in (self.drawing, self.json, self.yolo) if name]


def output_names(
    files: Sequence[Tuple[str, str]], per_image_json: bool = False, yolo_txt: bool = False
) -> List[OutputNames]:
    """The outputs of each file, mirroring its path under the folder that all inputs' roots
    share: the drawing with ".png" added unless it is a PNG (".mp4" for a video, unless it is
    one), ``name.json`` for ``--per-image-json``, the name with ".txt" for its extension for
    ``--yolo-txt``.

    Raises:
        PredictError: two files would get one output (e.g. ``a.jpg`` and ``a.jpg.png``, or
            ``a.jpg`` and ``a.png`` with ``--yolo-txt``).
    """
    common = os.path.commonpath([os.path.abspath(root) for _, root in files])
    names = []
    # Case-insensitive, as the names would collide on macOS's and Windows' file systems.
    owners = {YOLO_CLASSES_FILE: "the class list of --yolo-txt"} if yolo_txt else {}
    for path, _ in files:
        name = os.path.relpath(os.path.abspath(path), common)
        suffix = ".mp4" if is_video(path) else ".png"
        outputs = OutputNames(
            drawing=name if name.lower().endswith(suffix) else name + suffix,
            json=name + ".json" if per_image_json else "",
            yolo=os.path.splitext(name)[0] + ".txt" if yolo_txt else "",
        )
        for output in outputs.files():
            other = owners.setdefault(output.lower(), path)
            if other != path:
                verb = "drawn" if output == outputs.drawing else "written"
                raise PredictError(
                    f"--input: {other} and {path} would both be {verb} as {output}; rename one "
                    "of them or predict them into separate --output folders"
                )
        names.append(outputs)
    return names


def picture_names(files: Sequence[Tuple[str, str]]) -> List[str]:
    """The drawing of each file, relative to the output folder (see :func:`output_names`)."""
    return [names.drawing for names in output_names(files)]


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def earlier_run(output_dir: str) -> List[str]:
    """The files of an earlier run in ``output_dir`` (paths relative to it), [] if none.

    Raises:
        PredictError: a results file without the list of its run's files, or a list that
            cannot be read.
    """
    run_file = os.path.join(output_dir, RUN_FILE)
    if not os.path.lexists(run_file):
        if os.path.lexists(os.path.join(output_dir, RESULTS_FILE)):
            raise PredictError(
                f"--output {output_dir} holds a {RESULTS_FILE} without the {RUN_FILE} that lists "
                "its run's pictures, so they cannot be told apart from other files; choose "
                "another --output, or delete that folder"
            )
        return []
    try:
        with open(run_file) as f:
            names = json.load(f)["files"]
        # Only names inside the folder: --overwrite deletes them.
        if not all(
            isinstance(n, str) and _inside(os.path.join(output_dir, n), output_dir) for n in names
        ):
            raise ValueError("it names a file outside the folder")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PredictError(
            f"--output {output_dir}: its {RUN_FILE}, the list of an earlier run's files, cannot "
            f"be read ({type(e).__name__}: {e}); choose another --output, or delete that folder"
        ) from e
    return names


def check_output(output_dir: str, inputs, outputs: Sequence[str], overwrite: bool):
    """Refuses an output folder where the run would replace or mix with files it did not write.

    Args:
        output_dir: ``--output``.
        inputs: :func:`find_images`' result.
        outputs: the files the run writes for its inputs (:func:`output_names`), relative to
            ``output_dir``.
        overwrite: ``--overwrite``.

    Returns:
        The earlier run's files to delete before writing (empty without one).

    Raises:
        PredictError: ``output_dir`` is a file, an input folder or inside one, or the folder of
            an input file; it holds an earlier run and ``overwrite`` is False; or an output's
            name is taken by a file that no earlier run wrote.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise PredictError(f"--output {output_dir} is a file; name a folder for the pictures")
    files, folders = inputs
    file_folders = {os.path.dirname(path) or "." for path, _ in files}
    for folder in folders + sorted(f for f in file_folders if _inside(f, output_dir)):
        if _inside(output_dir, folder):
            raise PredictError(
                f"--output {output_dir} is, or is inside, the input folder {folder}: the "
                "pictures would replace or mix with your images, and a later run would take them "
                "as input; choose a folder outside it"
            )
    earlier = earlier_run(output_dir)
    if earlier and not overwrite:
        raise PredictError(
            f"--output {output_dir} holds an earlier predict run ({RESULTS_FILE}, "
            f"{len(earlier) - 2} output file(s)); pass --overwrite to replace it, or choose "
            "another --output"
        )
    for name in outputs:
        taken = _taken(output_dir, name, earlier)
        if taken:
            what = "picture" if name.lower().endswith(".png") else "output"
            raise PredictError(
                f"--output {output_dir} already holds {taken}, which no earlier predict run "
                f"wrote, where the {what} {name} goes; choose another --output"
            )
    return earlier


def _taken(output_dir: str, picture: str, earlier: Sequence[str]) -> str:
    """The file in ``output_dir`` that writing ``picture`` (a relative path) would replace or
    that stands where one of its sub-folders goes, unless an earlier run wrote it; "" if none."""
    parts = picture.split(os.sep)
    for depth in range(1, len(parts) + 1):
        name = os.sep.join(parts[:depth])
        path = os.path.join(output_dir, name)
        if depth == len(parts) and name not in earlier and os.path.lexists(path):
            return name
        if depth < len(parts) and os.path.lexists(path) and not os.path.isdir(path):
            return name
    return ""


def remove_earlier_run(output_dir: str, earlier: Sequence[str]) -> None:
    """Deletes the files of an earlier run (and the sub-folders they leave empty)."""
    removed = 0
    for name in sorted(earlier, key=lambda n: n == RUN_FILE):  # the list last
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            removed += 1
        parent = os.path.dirname(name)
        while parent:
            try:
                os.rmdir(os.path.join(output_dir, parent))
            except OSError:  # not empty
                break
            parent = os.path.dirname(parent)
    logger.warning(
        "--overwrite: removed the %d file(s) of the earlier predict run in %s", removed, output_dir
    )
