"""Artifact storage: the small ``BlobStore`` interface and its local-directory implementation.

An upload is staged in a local file first (ONNX Runtime validates it there), then committed
under its version, after which it never changes. An S3-compatible store implements the same
interface by staging locally and uploading the file on commit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from services.common.errors import NotFound
from services.common.metadata import MODEL_NAME_RE

_T = TypeVar("_T")


async def _run(func: Callable[[], _T]) -> _T:
    # NOTE: file I/O blocks; it runs on the default executor so the event loop never waits on disk.
    return await asyncio.get_running_loop().run_in_executor(None, func)


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


class BlobStore(Protocol):
    """Where artifacts live, keyed by model name and version number."""

    def upload(self) -> AbstractAsyncContextManager[BlobUpload]:
        """Stage a new artifact; leaving the context without a commit discards it."""

    def read(self, model: str, version: int, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        """Yield the artifact of ``version`` of ``model`` in chunks of ``chunk_bytes``.

        Raises:
            NotFound: No such artifact.
        """

    async def delete_version(self, model: str, version: int) -> None:
        """Delete one artifact if it exists."""

    async def delete_model(self, model: str) -> None:
        """Delete every artifact of ``model``."""


class _StagedFile:
    """A local upload file in the staging directory; ``LocalBlobStore`` owns its lifetime."""

    def __init__(self, path: Path, file: BinaryIO, target: Callable[[str, int], Path]) -> None:
        self._path = path
        self._file = file
        self._target = target
        self._is_committed = False

    @classmethod
    def create(cls, staging_dir: Path, target: Callable[[str, int], Path]) -> _StagedFile:
        staging_dir.mkdir(parents=True, exist_ok=True)
        path = staging_dir / f"{uuid.uuid4().hex}.part"
        return cls(path, path.open("xb"), target)

    async def write(self, chunk: bytes) -> None:
        await _run(partial(self._file.write, chunk))

    async def finish(self) -> Path:
        await _run(self._close)
        return self._path

    async def commit(self, model: str, version: int) -> None:
        await _run(partial(self._move_to, self._target(model, version)))

    async def discard(self) -> None:
        if not self._is_committed:
            await _run(self._remove)

    def _close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def _move_to(self, target: Path) -> None:
        self._close()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, target)
        self._is_committed = True

    def _remove(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


class LocalBlobStore:
    """Artifacts in a local directory: ``<root>/<model>/<version>.onnx``, staged in ``<root>/.tmp``.

    Model names never start with '.', so the staging directory cannot collide with a model.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging_dir = root / ".tmp"

    def path(self, model: str, version: int) -> Path:
        """Return the path of the artifact of ``version`` of ``model``."""
        return self._model_dir(model) / f"{version}.onnx"

    def _model_dir(self, model: str) -> Path:
        # NOTE: the registry validates names before they get here; this guards the filesystem
        # against a caller that does not (a name like '../x' must never become a path).
        if not MODEL_NAME_RE.fullmatch(model):
            raise ValueError(f"invalid model name {model!r}")
        return self.root / model

    @asynccontextmanager
    async def upload(self) -> AsyncIterator[BlobUpload]:
        """Stage a new artifact in the staging directory; it is removed unless committed."""
        staged = await _run(partial(_StagedFile.create, self._staging_dir, self.path))
        try:
            yield staged
        finally:
            await staged.discard()

    async def read(self, model: str, version: int, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        """Yield the artifact of ``version`` of ``model`` in chunks of ``chunk_bytes``.

        Raises:
            NotFound: No such artifact.
        """
        path = self.path(model, version)
        try:
            file = await _run(partial(_open_for_read, path))
        except FileNotFoundError:
            raise NotFound(f"the artifact of model '{model}' version {version} is missing") from None
        try:
            while chunk := await _run(partial(file.read, chunk_bytes)):
                yield chunk
        finally:
            await _run(file.close)

    async def delete_version(self, model: str, version: int) -> None:
        """Delete one artifact if it exists."""
        await _run(partial(self.path(model, version).unlink, missing_ok=True))

    async def delete_model(self, model: str) -> None:
        """Delete every artifact of ``model``."""
        await _run(partial(shutil.rmtree, self._model_dir(model), ignore_errors=True))
