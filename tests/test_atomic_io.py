"""Crash-safe writes and the output-directory check."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from retinanet_plugin.checkpoint.atomic_io import (
    OutputDirError,
    atomic_write,
    check_output_dir,
    remove_leftover_temp_files,
)


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with atomic_write(str(path)) as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"  # not visible before the block completes
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_written_file_gets_the_mode_open_would_give(tmp_path):
    """mkstemp's temporary file is private (0600); the replaced file follows the umask."""
    previous = os.umask(0o027)
    try:
        with atomic_write(str(tmp_path / "f.bin")) as f:
            f.write(b"x")
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "plain.bin").stat().st_mode & 0o777 == 0o640


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="No space"):
        with atomic_write(str(path)) as f:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # the temporary file is gone


def test_sigkill_mid_write_keeps_the_old_file(tmp_path):
    """A process killed while writing leaves the previous content readable."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"old" * 1000)
    script = textwrap.dedent(
        f"""
        import os, signal
        from retinanet_plugin.checkpoint.atomic_io import atomic_write
        with atomic_write({str(path)!r}) as f:
            f.write(b"new" * 10)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"old" * 1000
    # It leaves its temporary file, which the next start removes (and nothing else).
    leftover = [name for name in os.listdir(tmp_path) if name != "f.bin"]
    assert len(leftover) == 1 and leftover[0].startswith(".f.bin.")
    for name in (".f.bin.tmp", "f.bin.12345678.tmp", ".notes.txt"):
        (tmp_path / name).write_text("a user's file")
    assert remove_leftover_temp_files(str(tmp_path)) == [str(tmp_path / leftover[0])]
    assert sorted(os.listdir(tmp_path)) == [
        ".f.bin.tmp",
        ".notes.txt",
        "f.bin",
        "f.bin.12345678.tmp",
    ]


def test_check_output_dir_creates_and_accepts_a_writable_dir(tmp_path):
    check_output_dir(str(tmp_path / "new" / "dir"))
    assert os.listdir(tmp_path / "new" / "dir") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_check_output_dir_names_an_unwritable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match=f"{locked} is not writable"):
        check_output_dir(str(locked))


def test_check_output_dir_names_a_path_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="is not writable"):
        check_output_dir(str(blocker / "sub"))


def test_check_output_dir_needs_the_free_space(tmp_path):
    with pytest.raises(OutputDirError, match="MiB free"):
        check_output_dir(str(tmp_path), min_free_bytes=2**62)


class _FolderHandler:
    """A PathManager handler for "testfs://" paths, stored in a local folder: storage other than
    the local disk, as s3:// or manifold:// are for detectron2 users."""

    def __new__(cls, root):
        from iopath.common.file_io import PathHandler

        class Handler(PathHandler):
            def _get_supported_prefixes(self):
                return ["testfs://"]

            def _local(self, path):
                return os.path.join(root, path[len("testfs://") :])

            def _get_local_path(self, path, **kwargs):
                return self._local(path)

            def _open(self, path, mode="r", **kwargs):
                return open(self._local(path), mode)

            def _mkdirs(self, path, **kwargs):
                os.makedirs(self._local(path), exist_ok=True)

            def _exists(self, path, **kwargs):
                return os.path.exists(self._local(path))

            def _isfile(self, path, **kwargs):
                return os.path.isfile(self._local(path))

            def _isdir(self, path, **kwargs):
                return os.path.isdir(self._local(path))

        return Handler()


def test_output_dir_on_other_storage_is_written_through_path_manager(tmp_path):
    """An OUTPUT_DIR that PathManager handles with another handler (no rename, no free-space
    query) is checked and written through PathManager, including checkpoints."""
    import torch

    from detectron2.utils.file_io import PathManager
    from retinanet_plugin.checkpoint.checkpointer import RetinaNetCheckpointer

    PathManager.register_handler(_FolderHandler(str(tmp_path)), allow_override=True)
    check_output_dir("testfs://run")
    assert (tmp_path / "run").is_dir()
    with atomic_write("testfs://run/notes.txt", "w") as f:
        f.write("remote")
    assert (tmp_path / "run" / "notes.txt").read_text() == "remote"
    checkpointer = RetinaNetCheckpointer(torch.nn.Linear(2, 1), "testfs://run")
    checkpointer.save("model_0000001")
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000001.pth"
    saved = torch.load(tmp_path / "run" / "model_0000001.pth", weights_only=True)
    assert set(saved["model"]) == {"weight", "bias"}
