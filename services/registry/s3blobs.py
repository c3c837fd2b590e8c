"""Artifacts in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW...).

Objects are ``<prefix><model>/<version>.onnx`` in one bucket; a bundle is one object per file,
``<prefix><model>/<version>/<path>``, and its manifest ``<prefix><model>/<version>.manifest.json``.
An upload is staged in a local file (``staged_file``: ONNX Runtime validates it there), then
sent on commit: in one PUT up to ``part_bytes``, else as a multipart upload read part by part
from the file, so memory stays at one part whatever the size; a failed multipart upload is
aborted, leaving no parts behind.

boto3 is synchronous: every call runs in a thread (``asyncio.to_thread``), never on the event
loop, and has connect/read timeouts. Only the registry talks to the bucket: workers download
through ``DownloadVersion``, so they need no credentials. Integrity: the registry checks every
artifact it serves against the version's sha256 (``ModelStore.download_version``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import boto3
import botocore.exceptions
import structlog
from botocore.config import Config

from services.common.bundles import check_path
from services.common.errors import MaasError, NotFound, Unavailable
from services.common.metadata import MODEL_NAME_RE
from services.registry.blobs import (
    BlobUpload,
    BundleStage,
    StagedFile,
    remove_staged_files,
    staged_bundle,
    staged_file,
)

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_MIB = 1024 * 1024
MIN_PART_BYTES = 5 * _MIB
"""S3's smallest part (but the last): smaller ones fail the multipart upload with EntityTooSmall."""
_DELETE_PAGE = 1000
"""Most keys one DeleteObjects call takes."""
_MISSING = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class S3Config:
    """Where the bucket is and how to talk to it."""

    bucket: str
    endpoint_url: str | None = None
    """None: AWS S3 of ``region``."""
    region: str = "us-east-1"
    access_key_id: str = ""
    """Empty: boto3's default credential chain (environment, IAM role of the pod...)."""
    secret_access_key: str = ""
    prefix: str = ""
    """Prepended to every key (e.g. ``maas/``)."""
    part_bytes: int = 64 * _MIB
    """Size of one part of a multipart upload (at least 5 MiB)."""
    timeout_s: float = 30.0
    """Connect and read timeout of one S3 call."""


def create_s3_client(config: S3Config) -> Any:
    """Build a boto3 S3 client (thread-safe) for ``config``."""
    credentials = {}
    if config.access_key_id:
        credentials = {"aws_access_key_id": config.access_key_id, "aws_secret_access_key": config.secret_access_key}
    return boto3.session.Session().client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        config=Config(
            connect_timeout=config.timeout_s,
            read_timeout=config.timeout_s,
            retries={"mode": "standard", "max_attempts": 3},
            # S3-compatible servers on a plain host:port have no bucket subdomains.
            s3={"addressing_style": "path" if config.endpoint_url else "auto"},
        ),
        **credentials,
    )


def _describe(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", "error"))
    return type(exc).__name__


class _S3Upload:
    """A staged file sent to the bucket on commit; the staged file is removed either way."""

    def __init__(self, staged: StagedFile, store: S3BlobStore) -> None:
        self._staged = staged
        self._store = store

    async def write(self, chunk: bytes) -> None:
        await self._staged.write(chunk)

    async def finish(self) -> Path:
        return await self._staged.finish()

    async def commit(self, model: str, version: int) -> None:
        path = await self._staged.finish()
        await self._store.put_file(path, self._store.key(model, version))


def _not_a_target(model: str, version: int) -> Path:
    raise AssertionError("an S3 upload is sent on commit, never moved")


class S3BlobStore:
    """Artifacts in an S3 bucket, staged under ``staging_dir`` on the way in.

    Args:
        config: The bucket and how to reach it.
        staging_dir: Local directory of uploads in progress (owned by this registry process).
        client: A boto3 S3 client (``create_s3_client``).
    """

    def __init__(self, config: S3Config, staging_dir: Path, client: Any) -> None:
        self.config = config
        self._staging_dir = staging_dir
        self._client = client

    def key(self, model: str, version: int) -> str:
        """Return the object key of ``version`` of ``model``."""
        return f"{self._model_prefix(model)}{version}.onnx"

    def _model_prefix(self, model: str) -> str:
        # NOTE: the registry validates names first; this guards the key space against a caller
        # that does not ('a/b' would reach into another model's objects).
        if not MODEL_NAME_RE.fullmatch(model):
            raise ValueError(f"invalid model name {model!r}")
        return f"{self.config.prefix}{model}/"

    async def _call(self, what: str, func: Callable[[], _T]) -> _T:
        """Run one blocking boto3 call in a thread, translating its failures.

        Raises:
            NotFound: The object does not exist.
            Unavailable: S3 cannot be reached or refuses the request.
        """
        try:
            return await asyncio.to_thread(func)
        except botocore.exceptions.ClientError as exc:
            if _describe(exc) in _MISSING:
                raise NotFound(f"{what}: no such object") from exc
            log.warning("s3_request_failed", what=what, reason=_describe(exc))
            raise Unavailable(f"artifact store refused to {what}: {_describe(exc)}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            log.warning("s3_unreachable", what=what, reason=_describe(exc))
            raise Unavailable(f"artifact store unreachable ({what}): {_describe(exc)}") from exc

    async def start(self) -> None:
        """Remove the staged files of a crashed registry and check that the bucket can be used.

        Raises:
            Unavailable: The bucket is missing, refuses these credentials, or cannot be reached.
        """
        await remove_staged_files(self._staging_dir)
        bucket = self.config.bucket
        try:
            await self._call(f"open bucket '{bucket}'", partial(self._client.head_bucket, Bucket=bucket))
        except NotFound:
            raise Unavailable(f"artifact store has no bucket '{bucket}' (create it, or set s3_bucket)") from None

    def upload(self) -> AbstractAsyncContextManager[BlobUpload]:
        """Stage a new artifact locally; commit sends it to the bucket, leaving removes the local file."""
        return self._upload()

    @asynccontextmanager
    async def _upload(self) -> AsyncGenerator[BlobUpload, None]:
        async with staged_file(self._staging_dir, _not_a_target) as staged:
            yield _S3Upload(staged, self)

    async def put_file(self, path: Path, key: str) -> None:
        """Send the file at ``path`` to ``key``: one PUT, or a multipart upload above ``part_bytes``.

        Raises:
            Unavailable: S3 cannot be reached or refuses the upload.
        """
        size = (await asyncio.to_thread(path.stat)).st_size
        file = await asyncio.to_thread(path.open, "rb")
        try:
            if size <= self.config.part_bytes:
                body = await asyncio.to_thread(file.read)
                put = partial(self._client.put_object, Bucket=self.config.bucket, Key=key, Body=body)
                await self._call("store the artifact", put)
            else:
                await self._put_multipart(file, key)
        finally:
            await asyncio.to_thread(file.close)
        log.info("s3_artifact_stored", key=key, size_bytes=size)

    async def _put_multipart(self, file: BinaryIO, key: str) -> None:
        bucket = self.config.bucket
        created = await self._call(
            "start a multipart upload", partial(self._client.create_multipart_upload, Bucket=bucket, Key=key)
        )
        upload_id = created["UploadId"]
        try:
            parts = await self._put_parts(file, key, upload_id)
            complete = partial(
                self._client.complete_multipart_upload,
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
            )  # fmt: skip
            await self._call("complete a multipart upload", complete)
        except BaseException:
            abort = partial(self._client.abort_multipart_upload, Bucket=bucket, Key=key, UploadId=upload_id)
            # NOTE: shielded: a cancelled upload must still release its parts.
            await asyncio.shield(self._abort(abort))
            raise

    async def _put_parts(self, file: BinaryIO, key: str, upload_id: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        while body := await asyncio.to_thread(file.read, self.config.part_bytes):
            number = len(parts) + 1
            put = partial(
                self._client.upload_part,
                Bucket=self.config.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body,
            )  # fmt: skip
            reply = await self._call(f"store part {number}", put)
            parts.append({"PartNumber": number, "ETag": reply["ETag"]})
        return parts

    async def _abort(self, abort: Callable[[], object]) -> None:
        try:
            await self._call("abort a multipart upload", abort)
        except MaasError as exc:
            log.warning("s3_multipart_not_aborted", reason=exc.message)

    async def read(self, model: str, version: int, chunk_bytes: int, offset: int = 0) -> AsyncGenerator[bytes, None]:
        """Yield the artifact of ``version`` of ``model`` from byte ``offset`` on, in chunks of ``chunk_bytes``.

        Raises:
            NotFound: No such artifact.
            Unavailable: S3 cannot be reached or refuses the request.
        """
        missing = f"the artifact of model '{model}' version {version} is missing"
        async for chunk in self._read_key(self.key(model, version), chunk_bytes, missing, offset):
            yield chunk

    def _bundle_prefix(self, model: str, version: int) -> str:
        return f"{self._model_prefix(model)}{version}/"

    def _manifest_key(self, model: str, version: int) -> str:
        return f"{self._model_prefix(model)}{version}.manifest.json"

    def stage_bundle(self) -> AbstractAsyncContextManager[BundleStage]:
        """Stage a bundle directory locally; commit sends its files and manifest, leaving removes it."""
        return staged_bundle(self._staging_dir, self._commit_bundle)

    async def _commit_bundle(self, directory: Path, model: str, version: int, manifest: str) -> None:
        prefix = self._bundle_prefix(model, version)
        files = await asyncio.to_thread(lambda: sorted(p for p in directory.rglob("*") if p.is_file()))
        try:
            for path in files:
                await self.put_file(path, prefix + path.relative_to(directory).as_posix())
            put = partial(
                self._client.put_object,
                Bucket=self.config.bucket, Key=self._manifest_key(model, version), Body=manifest.encode(),
            )  # fmt: skip
            await self._call("store the manifest", put)
        except BaseException:
            # NOTE: shielded: a cancelled upload must not leave half a bundle in the bucket.
            await asyncio.shield(self._delete_quietly(model, version))
            raise

    async def _delete_quietly(self, model: str, version: int) -> None:
        try:
            await self.delete_version(model, version)
        except MaasError as exc:
            log.warning("s3_bundle_not_deleted", model=model, version=version, reason=exc.message)

    async def read_file(
        self, model: str, version: int, path: str, chunk_bytes: int, offset: int = 0
    ) -> AsyncGenerator[bytes, None]:
        """Yield the file ``path`` of bundle ``version`` of ``model`` from byte ``offset`` on, in chunks.

        Raises:
            NotFound: No such file.
            Unavailable: S3 cannot be reached or refuses the request.
        """
        check_path(path)
        missing = f"file '{path}' of model '{model}' version {version} is missing"
        async for chunk in self._read_key(self._bundle_prefix(model, version) + path, chunk_bytes, missing, offset):
            yield chunk

    async def _read_key(self, key: str, chunk_bytes: int, missing: str, offset: int = 0) -> AsyncGenerator[bytes, None]:
        # NOTE: a resumed read is a ranged GET (bytes=offset-); the caller never asks past the end.
        ranged = {"Range": f"bytes={offset}-"} if offset else {}
        get = partial(self._client.get_object, Bucket=self.config.bucket, Key=key, **ranged)
        try:
            reply = await self._call("read the artifact", get)
        except NotFound:
            raise NotFound(missing) from None
        body = reply["Body"]
        try:
            while chunk := await self._call("read the artifact", partial(body.read, chunk_bytes)):
                yield chunk
        finally:
            await asyncio.to_thread(body.close)

    async def delete_version(self, model: str, version: int) -> None:
        """Delete one artifact (a bundle: its files and manifest) if it exists."""
        for key in (self.key(model, version), self._manifest_key(model, version)):
            delete = partial(self._client.delete_object, Bucket=self.config.bucket, Key=key)
            await self._call("delete the artifact", delete)
        await self._delete_prefix(self._bundle_prefix(model, version))

    async def delete_model(self, model: str) -> None:
        """Delete every artifact of ``model``."""
        await self._delete_prefix(self._model_prefix(model))

    async def _delete_prefix(self, prefix: str) -> None:
        while keys := await self._call("list the artifacts", partial(self._keys, prefix)):
            objects = {"Objects": [{"Key": key} for key in keys], "Quiet": True}
            delete = partial(self._client.delete_objects, Bucket=self.config.bucket, Delete=objects)
            reply = await self._call("delete the artifacts", delete)
            if errors := reply.get("Errors"):  # else the same keys would be listed again forever
                raise Unavailable(f"artifact store refused to delete the artifacts: {errors[0].get('Code', 'error')}")

    def _keys(self, prefix: str) -> list[str]:
        reply = self._client.list_objects_v2(Bucket=self.config.bucket, Prefix=prefix, MaxKeys=_DELETE_PAGE)
        return [item["Key"] for item in reply.get("Contents", [])]
