"""``MaasClient``: the blocking twin of ``AsyncMaasClient``, for code that does not run an event loop.

Each call runs the async client's coroutine on a private event loop thread and waits for it, so
both clients share one implementation; a ``MaasClient`` may be used from many threads at once.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar, Unpack

from services.client.aio import AsyncMaasClient, ClientOptions, GenerationOptions
from services.client.results import TextPiece
from services.common.events import Event

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _blocking(
    method: Callable[Concatenate[AsyncMaasClient, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[MaasClient, _P], _T]:
    """Turn an ``AsyncMaasClient`` method into a ``MaasClient`` one with the same arguments and docstring."""

    @functools.wraps(method)
    def call(self: MaasClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._wait(method(self._client, *args, **kwargs))

    return call


async def _open(gateway: str, registry: str, options: ClientOptions) -> AsyncMaasClient:
    # NOTE: grpc.aio channels belong to the loop they are created on: create them on the client's loop.
    return AsyncMaasClient(gateway, registry, **options)


async def _next(items: AsyncGenerator[_T, None]) -> _T:
    return await anext(items)


async def _close(items: AsyncGenerator[_T, None]) -> None:
    await items.aclose()


class MaasClient:
    """A blocking client of a MaaS gateway and registry; the same methods and errors as ``AsyncMaasClient``.

    Close it, or use it as a context manager, to stop its loop thread.

    Args:
        gateway: host:port of the gateway.
        registry: host:port of the registry.
        **options: ``credentials``, ``metadata``, ``timeout_s``, ``registry_timeout_s``,
            ``min_transfer_bytes_per_s``, as for ``AsyncMaasClient``.
    """

    def __init__(
        self, gateway: str = "127.0.0.1:8001", registry: str = "127.0.0.1:8002", **options: Unpack[ClientOptions]
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="maas-client", daemon=True)
        self._thread.start()
        self._client = self._wait(_open(gateway, registry, options))

    def _wait(self, coro: Coroutine[Any, Any, _T]) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in this thread: stop the call, not just the wait
            raise

    def close(self) -> None:
        """Close the channels and stop the loop thread (a second call does nothing)."""
        if self._loop.is_closed():
            return
        try:
            self._wait(self._client.close())
            self._wait(self._loop.shutdown_asyncgens())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def watch_events(self, after_id: str = "", *, follow: bool = False, model: str = "") -> Iterator[Event]:
        """Iterate over the registry's events after ``after_id`` ("": from now on, "0": the oldest kept).

        Without ``follow`` it ends after the events recorded so far; with it, it blocks for new ones
        until the iteration is closed. Resume after an error from the last event's id.
        """
        return self._iterate(self._client.watch_events(after_id, follow=follow, model=model))

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        version: int | str | None = None,
        timeout_s: float | None = None,
        **options: Unpack[GenerationOptions],
    ) -> Iterator[TextPiece]:
        """Run a generative model on ``prompt``; iterate over its answer piece by piece as it is produced.

        As ``AsyncMaasClient.generate``: the last piece has ``is_final`` and the ``finish_reason``;
        closing the iteration early cancels the call (and the generation).
        """
        return self._iterate(self._client.generate(model, prompt, version=version, timeout_s=timeout_s, **options))

    def _iterate(self, items: AsyncGenerator[_T, None]) -> Iterator[_T]:
        """Iterate over an async generator of the client on its loop thread; close it when done."""
        try:
            while True:
                try:
                    yield self._wait(_next(items))
                except StopAsyncIteration:
                    return
        finally:
            self._wait(_close(items))

    def __enter__(self) -> MaasClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    infer = _blocking(AsyncMaasClient.infer)
    generate_text = _blocking(AsyncMaasClient.generate_text)
    generate_answer = _blocking(AsyncMaasClient.generate_answer)
    model_metadata = _blocking(AsyncMaasClient.model_metadata)
    model_ready = _blocking(AsyncMaasClient.model_ready)
    push = _blocking(AsyncMaasClient.push)
    convert_and_push = _blocking(AsyncMaasClient.convert_and_push)
    tune = _blocking(AsyncMaasClient.tune)
    pull = _blocking(AsyncMaasClient.pull)
    deploy = _blocking(AsyncMaasClient.deploy)
    promote = _blocking(AsyncMaasClient.promote)
    rollback = _blocking(AsyncMaasClient.rollback)
    set_alias = _blocking(AsyncMaasClient.set_alias)
    delete_alias = _blocking(AsyncMaasClient.delete_alias)
    list_aliases = _blocking(AsyncMaasClient.list_aliases)
    undeploy = _blocking(AsyncMaasClient.undeploy)
    list_models = _blocking(AsyncMaasClient.list_models)
    get_model = _blocking(AsyncMaasClient.get_model)
    list_versions = _blocking(AsyncMaasClient.list_versions)
    get_version = _blocking(AsyncMaasClient.get_version)
    delete_model = _blocking(AsyncMaasClient.delete_model)
    update_version = _blocking(AsyncMaasClient.update_version)
    delete_version = _blocking(AsyncMaasClient.delete_version)
    share_model = _blocking(AsyncMaasClient.share_model)
    unshare_model = _blocking(AsyncMaasClient.unshare_model)
    create_tenant = _blocking(AsyncMaasClient.create_tenant)
    list_tenants = _blocking(AsyncMaasClient.list_tenants)
    tenant_report = _blocking(AsyncMaasClient.tenant_report)
    set_tenant_quota = _blocking(AsyncMaasClient.set_tenant_quota)
    cluster_status = _blocking(AsyncMaasClient.cluster_status)
    create_api_key = _blocking(AsyncMaasClient.create_api_key)
    list_api_keys = _blocking(AsyncMaasClient.list_api_keys)
    revoke_api_key = _blocking(AsyncMaasClient.revoke_api_key)
    optimize = _blocking(AsyncMaasClient.optimize)
    get_operation = _blocking(AsyncMaasClient.get_operation)
    wait_operation = _blocking(AsyncMaasClient.wait_operation)
