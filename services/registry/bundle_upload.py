"""Receiving a bundle upload into a staging directory: announced files streamed, or a tar extracted.

Both ways write each file straight to its place under the staged directory, a chunk at a time
(memory stays at one chunk whatever the file's size), hash it on the way and refuse it, naming its
path, as soon as it differs from what was announced or passes a limit. Paths follow
``services.common.bundles.check_path``: relative, normalised, no '..', so nothing is ever written
outside the staged directory. A tar is read member by member and only regular files and
directories are accepted: links, devices and fifos are refused, never extracted.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tarfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.common.bundles import check_files, check_path
from services.common.errors import InvalidArgument
from services.common.metadata import BundleFile, shown

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_COPY_BYTES = 1024 * 1024
"""Bytes copied at a time from a tar member to its file."""
_TAR_OVERHEAD_BYTES = 1024
"""Tar bytes a member may take beyond its data (header and padding), for the archive's size cap."""


@dataclass(frozen=True)
class BundleLimits:
    """What one bundle may hold (registry settings ``max_bundle_*``)."""

    max_files: int = 1000
    max_file_bytes: int = 32 * 1024**3
    max_total_bytes: int = 64 * 1024**3

    @property
    def max_tar_bytes(self) -> int:
        """Largest tar archive an upload may announce: the total plus each member's header."""
        return self.max_total_bytes + (self.max_files + 2) * _TAR_OVERHEAD_BYTES


def check_announced(files: Sequence[BundleFile], size_bytes: int, limits: BundleLimits) -> None:
    """Check a BUNDLE header's files: paths, sizes, sha256s, count and total.

    Raises:
        InvalidArgument: A file or the total breaks a rule or a limit (the message names it).
    """
    if not files:
        raise InvalidArgument("files must list the bundle's files in a BUNDLE upload")
    if len(files) > limits.max_files:
        raise InvalidArgument(
            f"files lists {len(files)} files, at most {limits.max_files} are allowed (max_bundle_files)"
        )
    check_files(files)
    for file in files:
        if not 0 <= file.size_bytes <= limits.max_file_bytes:
            raise InvalidArgument(
                f"file '{file.path}': size_bytes must be 0..{limits.max_file_bytes} (max_bundle_file_bytes), "
                f"got {file.size_bytes}"
            )
        if not _SHA256_RE.fullmatch(file.sha256):
            raise InvalidArgument(
                f"file '{file.path}': sha256 must be 64 lower-case hex characters, got '{shown(file.sha256)}'"
            )
    total = sum(file.size_bytes for file in files)
    if total > limits.max_total_bytes:
        raise InvalidArgument(
            f"the bundle has {total} bytes, at most {limits.max_total_bytes} are allowed (max_bundle_bytes)"
        )
    if size_bytes != total:
        raise InvalidArgument(f"size_bytes must be the total of the files' sizes ({total}), got {size_bytes}")


async def chunks_only(parts: AsyncIterator[bytes | BundleFile]) -> AsyncIterator[bytes]:
    """Yield the chunks of a single-file or TAR upload, refusing a BUNDLE ``file`` message.

    Raises:
        InvalidArgument: The stream carries a ``file`` message.
    """
    async for part in parts:
        if isinstance(part, BundleFile):
            raise InvalidArgument("file messages are only allowed in a BUNDLE upload (header format)")
        yield part


class _Sink:
    """One file being written under the staged directory, hashed as it grows."""

    def __init__(self, directory: Path, announced: BundleFile) -> None:
        self.announced = announced
        self.received = 0
        self._digest = hashlib.sha256()
        self._path = directory / announced.path
        self._file: IO[bytes] | None = None

    async def open(self) -> None:
        self._file = await asyncio.to_thread(_create, self._path)

    async def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.announced.size_bytes:
            raise InvalidArgument(
                f"file '{self.announced.path}' is larger than its announced size_bytes {self.announced.size_bytes}"
            )
        assert self._file is not None
        await asyncio.to_thread(_append, self._file, self._digest, chunk)

    async def close(self) -> None:
        """Close the file and check its size and sha256 against the announcement."""
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
        if self.received != self.announced.size_bytes:
            raise InvalidArgument(
                f"file '{self.announced.path}' has {self.received} bytes, but its announced size_bytes is "
                f"{self.announced.size_bytes}"
            )
        actual = self._digest.hexdigest()
        if actual != self.announced.sha256:
            raise InvalidArgument(
                f"sha256 mismatch in file '{self.announced.path}': announced {self.announced.sha256}, received {actual}"
            )


def _create(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("xb")  # exclusive: a path is never written twice


def _append(file: IO[bytes], digest: Any, chunk: bytes) -> None:
    file.write(chunk)
    digest.update(chunk)


async def receive_files(
    announced: Sequence[BundleFile], parts: AsyncIterator[bytes | BundleFile], directory: Path
) -> None:
    """Write a BUNDLE upload's files under ``directory``: each ``BundleFile`` part, then its chunks.

    Args:
        announced: The header's files (checked by ``check_announced``), in the order they come.
        parts: The upload after its header: a ``BundleFile`` starts the next file, bytes continue it.
        directory: The staged bundle directory (removed by its owner on failure).

    Raises:
        InvalidArgument: A file comes out of order, differs from its announcement, or is missing;
            the message names the file.
    """
    sink: _Sink | None = None
    try:
        async for part in parts:
            if isinstance(part, BundleFile):
                if sink is not None:
                    await sink.close()
                sink = await _next_sink(announced, sink, part, directory)
            elif sink is None:
                raise InvalidArgument("a BUNDLE upload must send a file message before the file's chunks")
            else:
                await sink.write(part)
        if sink is not None:
            await sink.close()
    except BaseException:
        if sink is not None and sink._file is not None:
            sink._file.close()
        raise
    done = 0 if sink is None else announced.index(sink.announced) + 1
    if done < len(announced):
        raise InvalidArgument(f"the upload ended before file '{announced[done].path}'")


async def _next_sink(
    announced: Sequence[BundleFile], current: _Sink | None, part: BundleFile, directory: Path
) -> _Sink:
    index = 0 if current is None else announced.index(current.announced) + 1
    if index >= len(announced) or part != announced[index]:
        expected = "no more files" if index >= len(announced) else f"file '{announced[index].path}' as announced"
        raise InvalidArgument(f"unexpected file message for '{shown(part.path)}': expected {expected}")
    sink = _Sink(directory, part)
    await sink.open()
    return sink


def extract_tar(archive: Path, directory: Path, limits: BundleLimits) -> list[BundleFile]:
    """Extract the tar at ``archive`` under ``directory`` safely; return its files (blocking: run it in a thread).

    Raises:
        InvalidArgument: The archive is unreadable, or a member is not a regular file or directory,
            has a path that breaks ``check_path``, repeats a path, or passes a limit; the message
            names the member.
    """
    files: list[BundleFile] = []
    total = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = _member_path(member, directory)
                if name is None:
                    continue
                if len(files) >= limits.max_files:
                    raise InvalidArgument(f"the tar has more than {limits.max_files} files (max_bundle_files)")
                if member.size > limits.max_file_bytes:
                    raise InvalidArgument(
                        f"tar member '{name}' has {member.size} bytes, at most {limits.max_file_bytes} are "
                        "allowed (max_bundle_file_bytes)"
                    )
                total += member.size
                if total > limits.max_total_bytes:
                    raise InvalidArgument(
                        f"the tar's files pass {limits.max_total_bytes} bytes at member '{name}' (max_bundle_bytes)"
                    )
                files.append(_extract_member(tar, member, name, directory))
    except tarfile.TarError as exc:
        raise InvalidArgument(f"artifact is not a readable tar archive: {exc}") from None
    if not files:
        raise InvalidArgument("the tar holds no files")
    check_files(files, "tar member")
    return files


def _member_path(member: tarfile.TarInfo, directory: Path) -> str | None:
    """Return the member's bundle path, None for a directory; refuse anything else.

    Raises:
        InvalidArgument: The member is a link, device or fifo, or its path breaks the rules.
    """
    raw = member.name
    name = raw.removeprefix("./").rstrip("/") if raw not in (".", "./") else ""
    if not (member.isreg() or member.isdir()):
        kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "device or fifo"
        raise InvalidArgument(f"tar member '{shown(raw)}' is a {kind}: only regular files and directories are allowed")
    try:
        tarfile.data_filter(member, str(directory))  # the standard library's own checks, first
    except tarfile.FilterError as exc:
        raise InvalidArgument(f"tar member '{shown(raw)}' is refused: {exc}") from None
    if member.isdir() and name == "":
        return None
    check_path(name, "tar member")
    return None if member.isdir() else name


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, directory: Path) -> BundleFile:
    target = directory / name
    if not target.resolve().is_relative_to(directory.resolve()):  # check_path forbids it: defence in depth
        raise InvalidArgument(f"tar member '{name}' would be written outside the bundle")
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has a reader
    digest = hashlib.sha256()
    size = 0
    try:
        with source, _create(target) as out:
            while chunk := source.read(_COPY_BYTES):
                size += len(chunk)
                digest.update(chunk)
                out.write(chunk)
    except FileExistsError:
        raise InvalidArgument(f"tar member '{name}' appears twice in the tar") from None
    except NotADirectoryError:
        raise InvalidArgument(f"tar member '{name}' is inside another member's path") from None
    return BundleFile(name, size, digest.hexdigest())
