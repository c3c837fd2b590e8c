"""Bundle files on the client's side: a directory scanned for upload, a download written into a directory.

Both hold one chunk in memory at a time whatever a file's size. A download writes each file to
``<path>.part`` beside its place, checks its size and sha256, then renames it: a file at its
final path is always whole and verified. A file already in place with the right size and sha256
is not downloaded again (``is_complete``); a partial ``.part`` file is downloaded again from
its start (the registry streams whole files).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO

from services.common.bundles import check_files, check_path
from services.common.errors import InvalidArgument
from services.common.metadata import BundleFile

HASH_CHUNK_BYTES = 1024 * 1024
_PART_SUFFIX = ".part"


def file_digest(path: Path) -> tuple[str, int]:
    """Return the sha256 and size of the file at ``path``, read a chunk at a time (blocking)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def scan_directory(root: Path) -> list[tuple[BundleFile, Path]]:
    """Return every file under ``root`` with its bundle path, size and sha256, by path (blocking).

    Raises:
        InvalidArgument: ``root`` is not a directory, holds a link or another non-regular file,
            or a path breaks the bundle path rule (the message names it).
    """
    if not root.is_dir():
        raise InvalidArgument(f"'{root}' is not a directory")
    found: list[tuple[BundleFile, Path]] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise InvalidArgument(f"'{relative}' is a link or a special file: a bundle holds regular files only")
        if path.is_file():
            check_path(relative)
            sha256, size = file_digest(path)
            found.append((BundleFile(relative, size, sha256), path))
    if not found:
        raise InvalidArgument(f"directory '{root}' holds no files")
    check_files([file for file, _ in found])
    return found


def is_complete(root: Path, file: BundleFile) -> bool:
    """Whether ``file`` is already at its place under ``root`` with its size and sha256 (blocking)."""
    path = root / file.path
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size != file.size_bytes:
            return False
        return file_digest(path)[0] == file.sha256
    except OSError:
        return False


class BundleWriter:
    """Writes downloaded files under ``root``: ``start`` a file, ``write`` its chunks, ``finish`` it (blocking calls).

    Args:
        root: The version's directory.
        what: Names the version in errors ("model 'm' version 3").
    """

    def __init__(self, root: Path, what: str) -> None:
        self._root = root
        self._what = what
        self._file: IO[bytes] | None = None
        self._current: BundleFile | None = None
        self._digest = hashlib.sha256()
        self._received = 0

    def start(self, file: BundleFile) -> None:
        """Finish the file in progress, then open ``file``'s ``.part`` file.

        Raises:
            InvalidArgument: The registry sent a path outside the bundle rule, or the previous file is corrupt.
        """
        self.finish()
        check_path(file.path)
        target = self._root / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        self._file = target.with_name(target.name + _PART_SUFFIX).open("wb")
        self._current, self._digest, self._received = file, hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        """Append ``chunk`` to the file in progress.

        Raises:
            InvalidArgument: No file was started.
        """
        if self._file is None:
            raise InvalidArgument(f"download of {self._what}: a chunk came before its file")
        self._file.write(chunk)
        self._digest.update(chunk)
        self._received += len(chunk)

    def finish(self) -> None:
        """Close the file in progress, check it and move it in place.

        Raises:
            InvalidArgument: Its size or sha256 differs from the registry's record.
        """
        if self._file is None or self._current is None:
            return
        file, current = self._file, self._current
        self._file = self._current = None
        file.close()
        part = Path(file.name)
        if self._received != current.size_bytes or self._digest.hexdigest() != current.sha256:
            part.unlink(missing_ok=True)
            raise InvalidArgument(f"download of file '{current.path}' of {self._what} is corrupt (sha256 mismatch)")
        os.replace(part, self._root / current.path)

    def discard(self) -> None:
        """Close and remove the ``.part`` file in progress, if any."""
        if self._file is not None:
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
            self._file = self._current = None
