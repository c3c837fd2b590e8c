"""Artifact storage: the small ``BlobStore`` interface and its local-directory implementation.

An upload is staged in a local file first (ONNX Runtime validates it there), then committed
under its version, after which it never changes. The S3-compatible store (``s3blobs.py``)
implements the same interface by staging locally and uploading the file on commit.

Staged files are ``<staging dir>/<uuid>.part``; the staging directory belongs to one registry
process, which removes what a crashed predecessor left there when it starts (``start``).

A bundle (several files, ``services.common.bundles``) is staged as a directory,
``<staging dir>/<uuid>.part/``, and committed as the version's directory of files plus its
manifest (``<version>.manifest.json``, the canonical JSON whose sha256 is the version's).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from services.common.bundles import check_path
from services.common.errors import FailedPrecondition, NotFound
from services.common.metadata import MODEL_NAME_RE

_T = TypeVar("_T")
_STAGED_SUFFIX = ".part"
STAGING_DIR = ".tmp"
"""Name of the staging directory under a data directory (no model name starts with '.')."""


async def _run(func: Callable[[], _T], *, undo: Callable[[_T], object] | None = None) -> _T:
    # NOTE: file I/O blocks; it runs on the default executor so the event loop never waits on disk.
    # A thread cannot be stopped: when the caller is cancelled, wait for it to end before passing the
    # cancellation on, so that the cleanup which follows sees what it did (a file opened or moved);
    # ``undo`` releases a result the cancelled caller will never see (a file it opened).
    future = asyncio.get_running_loop().run_in_executor(None, func)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if undo is not None and not future.cancelled() and future.exception() is None:
            undo(future.result())
        raise


def _open_for_read(path: Path) -> BinaryIO:
    return path.open("rb")


class BlobUpload(Protocol):
    """One artifact being uploaded: append chunks, finish, then commit it under a version."""

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk`` to the staged artifact."""

    async def finish(self) -> Path:
        """Flush the staged artifact and return its local path (for validation)."""

    async def commit(self, model: str, version: int) -> None:
        """Store the finished artifact as ``version`` of ``model``."""


class BundleStage(Protocol):
    """A bundle being uploaded: files written under ``directory``, then committed under a version."""

    directory: Path
    """The staged directory (the bundle's root)."""

    async def commit(self, model: str, version: int, manifest: str) -> None:
        """Store the staged files and ``manifest`` (``bundles.manifest_json``) as ``version`` of ``model``."""


class BlobStore(Protocol):
    """Where artifacts live, keyed by model name and version number."""

    async def start(self) -> None:
        """Prepare the store before the registry serves: remove the staged files of a crashed registry.

        Raises:
            Unavailable: The store cannot be reached or used (the message says why).
        """

    def upload(self) -> AbstractAsyncContextManager[BlobUpload]:
        """Stage a new artifact; leaving the context without a commit discards it."""

    def read(self, model: str, version: int, chunk_bytes: int, offset: int = 0) -> AsyncGenerator[bytes, None]:
        """Yield the artifact of ``version`` of ``model`` from byte ``offset`` on, in chunks of ``chunk_bytes``.

        Raises:
            NotFound: No such artifact.
        """

    def stage_bundle(self) -> AbstractAsyncContextManager[BundleStage]:
        """Stage a new bundle directory; leaving the context without a commit removes it."""

    def read_file(
        self, model: str, version: int, path: str, chunk_bytes: int, offset: int = 0
    ) -> AsyncGenerator[bytes, None]:
        """Yield the file ``path`` of bundle ``version`` of ``model`` from byte ``offset`` on, in chunks.

        Raises:
            NotFound: No such file.
        """

    async def delete_version(self, model: str, version: int) -> None:
        """Delete one artifact (a bundle: its files and manifest) if it exists."""

    async def delete_model(self, model: str) -> None:
        """Delete every artifact of ``model``."""


async def verified_chunks(
    chunks: AsyncIterator[bytes], sha256: str, size_bytes: int, what: str, offset: int = 0
) -> AsyncGenerator[bytes, None]:
    """Yield ``chunks`` of a stored artifact, holding the last one back until the whole checks out.

    A corrupted or replaced artifact thus never reaches a client whole: its stream ends with the
    error instead of its last chunk, whatever the store. A resumed read (``offset`` > 0) is checked
    for its size only: the caller, who holds the first ``offset`` bytes, checks the whole sha256.

    Args:
        chunks: The artifact as the store reads it (from ``offset`` on).
        sha256: The sha256 recorded when it was uploaded.
        size_bytes: The size recorded when it was uploaded.
        what: Names the artifact in the error ("model 'm' version 3").
        offset: Where the read starts.

    Raises:
        FailedPrecondition: The artifact's size or sha256 differs from the record.
    """
    digest = hashlib.sha256()
    received = offset
    held: bytes | None = None
    async for chunk in chunks:
        received += len(chunk)
        if received > size_bytes:
            raise FailedPrecondition(f"the artifact of {what} is corrupted: it has more than its {size_bytes} bytes")
        if not offset:
            await _run(partial(digest.update, chunk))
        if held is not None:
            yield held
        held = chunk
    actual = digest.hexdigest() if not offset else sha256
    if received != size_bytes or actual != sha256:
        raise FailedPrecondition(
            f"the artifact of {what} is corrupted: {received} bytes with sha256 {actual}, "
            f"expected {size_bytes} bytes with sha256 {sha256}"
        )
    if held is not None:
        yield held


class StagedFile:
    """A local upload file in the staging directory; ``staged_file`` owns its lifetime.

    The file is opened by the first write, in a thread, so this object exists before any file
    does: whatever happens (a cancellation included), ``discard`` finds what there is to remove.
    """

    def __init__(self, staging_dir: Path, target: Callable[[str, int], Path]) -> None:
        self._staging_dir = staging_dir
        self._path = staging_dir / f"{uuid.uuid4().hex}{_STAGED_SUFFIX}"
        self._file: BinaryIO | None = None
        self._target = target
        self._is_committed = False

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``."""
        await _run(partial(self._write, chunk))

    async def finish(self) -> Path:
        """Flush and close the file; return its path."""
        await _run(self._close)
        return self._path

    async def commit(self, model: str, version: int) -> None:
        """Move the file to its place as ``version`` of ``model``."""
        await _run(partial(self._move_to, self._target(model, version)))

    async def discard(self) -> None:
        """Remove the file unless it was committed."""
        await _run(self._remove)

    def _opened(self) -> BinaryIO:
        if self._file is None:
            self._staging_dir.mkdir(parents=True, exist_ok=True)
            self._file = self._path.open("xb")
        return self._file

    def _write(self, chunk: bytes) -> None:
        self._opened().write(chunk)

    def _close(self) -> None:
        file = self._opened()
        if not file.closed:
            file.flush()
            os.fsync(file.fileno())
            file.close()

    def _move_to(self, target: Path) -> None:
        self._close()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, target)
        self._is_committed = True

    def _remove(self) -> None:
        if self._file is not None:
            self._file.close()
        if not self._is_committed:
            self._path.unlink(missing_ok=True)


@asynccontextmanager
async def staged_file(staging_dir: Path, target: Callable[[str, int], Path]) -> AsyncIterator[StagedFile]:
    """Stage a new file in ``staging_dir``; it is removed on leaving (a cancellation too) unless committed."""
    staged = StagedFile(staging_dir, target)
    try:
        yield staged
    finally:
        await staged.discard()


def _remove_staged(staging_dir: Path) -> int:
    removed = 0
    for path in staging_dir.glob(f"*{_STAGED_SUFFIX}"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


class StagedBundle:
    """A staged bundle directory; ``staged_bundle`` removes whatever is left of it on leaving."""

    def __init__(self, staging_dir: Path, store: Callable[[Path, str, int, str], Awaitable[None]]) -> None:
        self.directory = staging_dir / f"{uuid.uuid4().hex}{_STAGED_SUFFIX}"
        self._store = store

    async def commit(self, model: str, version: int, manifest: str) -> None:
        """Store the staged files and ``manifest`` as ``version`` of ``model``."""
        await self._store(self.directory, model, version, manifest)


@asynccontextmanager
async def staged_bundle(
    staging_dir: Path, store: Callable[[Path, str, int, str], Awaitable[None]]
) -> AsyncIterator[StagedBundle]:
    """Create a staged bundle directory; ``store`` commits it; it is removed on leaving (a cancellation too)."""
    staged = StagedBundle(staging_dir, store)
    await _run(partial(staged.directory.mkdir, parents=True))
    try:
        yield staged
    finally:
        await _run(partial(shutil.rmtree, staged.directory, ignore_errors=True))


async def read_chunks(path: Path, chunk_bytes: int, missing: str, offset: int = 0) -> AsyncGenerator[bytes, None]:
    """Yield the file at ``path`` from byte ``offset`` on, in chunks of ``chunk_bytes``.

    Raises:
        NotFound: No such file (``missing`` is the message).
    """
    try:
        file = await _run(partial(_open_for_read, path), undo=lambda opened: opened.close())
    except FileNotFoundError:
        raise NotFound(missing) from None
    try:
        if offset:
            await _run(partial(file.seek, offset))
        while chunk := await _run(partial(file.read, chunk_bytes)):
            yield chunk
    finally:
        await _run(file.close)


async def remove_staged_files(staging_dir: Path) -> int:
    """Remove the staged files in ``staging_dir`` (those of a registry that crashed); return how many."""
    return await _run(partial(_remove_staged, staging_dir))


def _manifest_path(bundle_dir: Path) -> Path:
    return bundle_dir.with_name(f"{bundle_dir.name}.manifest.json")


def _move_bundle(staged: Path, target: Path, manifest: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
    _manifest_path(target).write_text(manifest)


class LocalBlobStore:
    """Artifacts in a local directory: ``<root>/<model>/<version>.onnx``, staged in ``<root>/.tmp``.

    A bundle is ``<root>/<model>/<version>/`` (its files) and ``<root>/<model>/<version>.manifest.json``.

    Model names never start with '.', so the staging directory cannot collide with a model.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging_dir = root / STAGING_DIR

    def path(self, model: str, version: int) -> Path:
        """Return the path of the artifact of ``version`` of ``model``."""
        return self._model_dir(model) / f"{version}.onnx"

    def _model_dir(self, model: str) -> Path:
        # NOTE: the registry validates names before they get here; this guards the filesystem
        # against a caller that does not (a name like '../x' must never become a path).
        if not MODEL_NAME_RE.fullmatch(model):
            raise ValueError(f"invalid model name {model!r}")
        return self.root / model

    async def start(self) -> None:
        """Remove the staged files that a crashed registry left."""
        await remove_staged_files(self._staging_dir)

    def upload(self) -> AbstractAsyncContextManager[BlobUpload]:
        """Stage a new artifact in the staging directory; it is removed unless committed."""
        return staged_file(self._staging_dir, self.path)

    async def read(self, model: str, version: int, chunk_bytes: int, offset: int = 0) -> AsyncGenerator[bytes, None]:
        """Yield the artifact of ``version`` of ``model`` from byte ``offset`` on, in chunks of ``chunk_bytes``.

        Raises:
            NotFound: No such artifact.
        """
        missing = f"the artifact of model '{model}' version {version} is missing"
        async with aclosing(read_chunks(self.path(model, version), chunk_bytes, missing, offset)) as chunks:
            async for chunk in chunks:
                yield chunk

    def bundle_dir(self, model: str, version: int) -> Path:
        """Return the directory of bundle ``version`` of ``model`` (its manifest is beside it)."""
        return self._model_dir(model) / str(version)

    def stage_bundle(self) -> AbstractAsyncContextManager[BundleStage]:
        """Stage a bundle directory in the staging directory; commit moves it in place."""
        return staged_bundle(self._staging_dir, self._commit_bundle)

    async def _commit_bundle(self, directory: Path, model: str, version: int, manifest: str) -> None:
        await _run(partial(_move_bundle, directory, self.bundle_dir(model, version), manifest))

    async def read_file(
        self, model: str, version: int, path: str, chunk_bytes: int, offset: int = 0
    ) -> AsyncGenerator[bytes, None]:
        """Yield the file ``path`` of bundle ``version`` of ``model`` from byte ``offset`` on, in chunks.

        Raises:
            NotFound: No such file.
        """
        check_path(path)
        missing = f"file '{path}' of model '{model}' version {version} is missing"
        file_path = self.bundle_dir(model, version) / path
        async with aclosing(read_chunks(file_path, chunk_bytes, missing, offset)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def delete_version(self, model: str, version: int) -> None:
        """Delete one artifact (a bundle: its directory and manifest) if it exists."""
        await _run(partial(self.path(model, version).unlink, missing_ok=True))
        directory = self.bundle_dir(model, version)
        await _run(partial(_manifest_path(directory).unlink, missing_ok=True))
        await _run(partial(shutil.rmtree, directory, ignore_errors=True))

    async def delete_model(self, model: str) -> None:
        """Delete every artifact of ``model``."""
        await _run(partial(shutil.rmtree, self._model_dir(model), ignore_errors=True))
