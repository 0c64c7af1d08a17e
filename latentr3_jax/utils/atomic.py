"""Write files so that a reader never sees half of one: temp file in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str = "utf-8"):
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


class FileSet:
    """Several files of one folder replaced together: each is written to a temp file beside
    its target, and only when all are written are they renamed into place (a crash while
    writing leaves the old set untouched; only the renames, microseconds long, can split
    it). Use through `atomic_files`."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(os.fspath(folder))
        os.makedirs(self.folder, exist_ok=True)
        self._pending: list = []   # (tmp, final)

    def _new_temp(self, name: str):
        final = os.path.join(self.folder, name)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(name) + ".", suffix=".tmp",
                                   dir=os.path.dirname(final))
        self._pending.append((tmp, final))
        return fd, tmp

    def temp_path(self, name: str) -> str:
        """A fresh temp path to write `name` to (the caller writes it, e.g. a library saver)."""
        fd, tmp = self._new_temp(name)
        os.close(fd)
        return tmp

    def write_text(self, name: str, text: str, encoding: str = "utf-8") -> None:
        fd, _ = self._new_temp(name)
        with os.fdopen(fd, "w", encoding=encoding) as f:   # commit() syncs it to disk
            f.write(text)

    def commit(self) -> None:
        for tmp, _ in self._pending:   # bytes on disk before any rename
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending = []

    def discard(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._pending = []


@contextlib.contextmanager
def atomic_files(folder: str):
    """`with atomic_files(d) as fs: fs.write_text('a.csv', ...); save(fs.temp_path('w.bin'))`:
    all of them replace their targets at the end, or none does."""
    fs = FileSet(folder)
    try:
        yield fs
        fs.commit()
    except BaseException:
        fs.discard()
        raise


@contextlib.contextmanager
def atomic_dir(path: str):
    """`with atomic_dir(d) as tmp: save_folder(tmp)`: the folder `tmp` replaces `d` when the
    block ends without error (a leftover temp folder from a crash is removed first)."""
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        yield tmp
        if os.path.isdir(path):
            old = path + ".old"
            if os.path.isdir(old):
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_mode() -> int:
    """The mode a new file gets under this process's umask (temp files are created 0600;
    a folder others read needs the usual mode back)."""
    mask = None
    try:  # Linux: read it without setting it (os.umask would race with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask
