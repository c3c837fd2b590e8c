"""Bundle files on the client's side: a directory scanned for upload, a download written into a directory.

Both hold one chunk in memory at a time whatever a file's size. A download writes each file to
``<path>.part`` beside its place, checks its size and sha256, then renames it: a file at its
final path is always whole and verified. A file already in place with the right size and sha256
is not downloaded again (``is_complete``); a ``.part`` file left by an interrupted download is
resumed from its length (``part_sizes``: the registry sends the rest), its prefix hashed first
so the whole file's sha256 is still checked. A ``.part`` file is kept when a download fails in
transit, removed when the file it makes up is corrupt.

Several processes may fill one directory (workers on one machine sharing a model cache):
``directory_lock`` makes them take turns, so a ``.part`` file is only ever written by one of
them, and the ones that waited find the files in place. A single file downloaded to a path of
the caller's choosing takes turns on its ``.part`` file instead (``part_lock``), which leaves
nothing behind once the file is in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from services.common.bundles import PART_SUFFIX, check_files, check_path
from services.common.errors import InvalidArgument
from services.common.metadata import BundleFile

HASH_CHUNK_BYTES = 1024 * 1024


@contextlib.asynccontextmanager
async def directory_lock(directory: Path) -> AsyncIterator[None]:
    """Hold an exclusive lock on ``directory`` (a ``<name>.lock`` file beside it) while filling it.

    The lock is the kernel's (``flock``): a process that dies releases it. Waiting happens in a
    thread, so the event loop goes on; a cancelled waiter releases the lock once it gets it.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = directory.parent / f"{directory.name}.lock"
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # NOTE: shielded so that a cancelled caller's thread never takes the lock after the
        # descriptor was closed (the lock would be left to a closed, reused descriptor number).
        await asyncio.shield(asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX))
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock


@contextlib.asynccontextmanager
async def part_lock(target: Path) -> AsyncIterator[None]:
    """Hold an exclusive lock on the download of the file ``target``: on its ``.part`` file (``flock``).

    A process that waited finds the ``.part`` file it locked renamed in place (or removed), and
    locks the current one instead. A ``.part`` file still empty at the end is removed: so is the
    one a waiter created after the file was in place. As ``directory_lock``, the kernel releases
    the lock of a process that dies, and the wait happens in a thread.
    """
    part = _part_path(target)
    part.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # NOTE: shielded for the reason given in directory_lock.
            await asyncio.shield(asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX))
            if _is_same_file(descriptor, part):
                break
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)
    try:
        yield
    finally:
        try:
            if _is_same_file(descriptor, part) and os.fstat(descriptor).st_size == 0:
                part.unlink()
        finally:
            os.close(descriptor)  # closing the descriptor releases the lock


def _is_same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


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


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + PART_SUFFIX)


def part_sizes(root: Path, files: Sequence[BundleFile]) -> dict[str, int]:
    """Return the length of each of ``files``' ``.part`` files under ``root`` that a download can resume (blocking).

    Only a non-empty regular ``.part`` file no longer than its file counts; a longer one is
    downloaded again from its start.
    """
    sizes: dict[str, int] = {}
    for file in files:
        part = _part_path(root / file.path)
        try:
            if part.is_symlink() or not part.is_file():
                continue
            size = part.stat().st_size
        except OSError:
            continue
        if 0 < size <= file.size_bytes:
            sizes[file.path] = size
    return sizes


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
        places: Where a file goes under ``root`` by its bundle path, when not at that path (a
            single-file version's ``model.onnx`` downloaded to a name of the caller's choosing).
    """

    def __init__(self, root: Path, what: str, places: Mapping[str, str] | None = None) -> None:
        self._root = root
        self._what = what
        self._places = dict(places or {})
        self._file: IO[bytes] | None = None
        self._current: BundleFile | None = None
        self._target: Path | None = None
        self._digest = hashlib.sha256()
        self._received = 0

    def start(self, file: BundleFile, offset: int = 0) -> None:
        """Finish the file in progress, then open ``file``'s ``.part`` file.

        Args:
            file: The file the registry announces.
            offset: Resume: the ``.part`` file's first ``offset`` bytes are kept (and hashed), the
                chunks that follow are appended to them; 0 starts the file afresh.

        Raises:
            InvalidArgument: The registry sent a path outside the bundle rule, the previous file is
                corrupt, or the ``.part`` file to resume is shorter than ``offset``.
        """
        self.finish()
        check_path(file.path)
        target = self._root / self._places.get(file.path, file.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = _part_path(target)
        self._current, self._target, self._digest, self._received = file, target, hashlib.sha256(), 0
        if not offset:
            self._file = part.open("wb")
            return
        self._file = part.open("r+b")
        while self._received < offset and (chunk := self._file.read(min(HASH_CHUNK_BYTES, offset - self._received))):
            self._digest.update(chunk)
            self._received += len(chunk)
        if self._received != offset:
            self.discard()
            raise InvalidArgument(f"download of file '{file.path}' of {self._what}: its partial file changed meanwhile")
        self._file.truncate(offset)

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
        if self._file is None or self._current is None or self._target is None:
            return
        file, current, target = self._file, self._current, self._target
        self._file = self._current = self._target = None
        file.close()
        part = Path(file.name)
        if self._received != current.size_bytes or self._digest.hexdigest() != current.sha256:
            part.unlink(missing_ok=True)
            raise InvalidArgument(f"download of file '{current.path}' of {self._what} is corrupt (sha256 mismatch)")
        os.replace(part, target)

    def discard(self) -> None:
        """Close the ``.part`` file in progress, if any, keeping it for a resumed download."""
        if self._file is not None:
            self._file.close()
            self._file = self._current = self._target = None
