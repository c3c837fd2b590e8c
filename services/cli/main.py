"""The ``maas`` command line (typer)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.table import Table

from inference import grpc_service_pb2_grpc
from services.cli import convert
from services.cli.examples import affine_model
from services.cli.supervisor import Supervisor, UpOptions
from services.common.errors import MaasError, NotFound, map_rpc_error
from services.common.logging import configure_logging
from services.common.metadata import ModelRecord
from services.common.registry_client import RegistryClient

_T = TypeVar("_T")

app = typer.Typer(help="MaaS: register ONNX models and call them over gRPC (KServe v2).", no_args_is_help=True)
models_app = typer.Typer(help="Push, list, show and remove models.", no_args_is_help=True)
registry_app = typer.Typer(help="The registry service.", no_args_is_help=True)
gateway_app = typer.Typer(help="The gateway service (public KServe v2 endpoint).", no_args_is_help=True)
inference_app = typer.Typer(help="The inference worker service.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(registry_app, name="registry")
app.add_typer(gateway_app, name="gateway")
app.add_typer(inference_app, name="inference")

out = Console()
err = Console(stderr=True)


class CliSettings(BaseSettings):
    """Where the CLI finds the services (``MAAS_GATEWAY``, ``MAAS_REGISTRY``)."""

    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="ignore")

    gateway: str = "127.0.0.1:8001"
    """host:port of the gateway (the defaults of `maas up`)."""
    registry: str = "127.0.0.1:8002"
    """host:port of the registry."""


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        return asyncio.run(coro)
    except MaasError as exc:
        err.print(f"[red]error[/red] {exc.grpc_code.name}: {exc.message}")
        raise typer.Exit(1) from None


async def _with_registry(action: Callable[[RegistryClient], Awaitable[_T]]) -> _T:
    client = RegistryClient(CliSettings().registry)
    try:
        return await action(client)
    finally:
        await client.close()


def _given(**options: Any) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}


Port = Annotated[int | None, typer.Option(help="gRPC port (0 picks a free one).")]
Host = Annotated[str | None, typer.Option(help="Address to bind.")]
RedisUrl = Annotated[str | None, typer.Option(help="Redis URL (default: MAAS_REDIS_URL).")]
LogJson = Annotated[bool | None, typer.Option("--log-json/--log-console", help="Log format.")]
MetricsPort = Annotated[int | None, typer.Option(help="Prometheus metrics port (0 picks one).")]


def _serve(service: str, **flags: Any) -> None:
    if service == "registry":
        from services.registry.server import serve as serve_registry
        from services.registry.settings import RegistrySettings

        settings: Any = RegistrySettings(**_given(**flags))
        runner: Any = serve_registry
    elif service == "gateway":
        from services.gateway.server import serve as serve_gateway
        from services.gateway.settings import GatewaySettings

        settings, runner = GatewaySettings(**_given(**flags)), serve_gateway
    else:
        from services.inference.server import serve as serve_inference
        from services.inference.settings import InferenceSettings

        settings, runner = InferenceSettings(**_given(**flags)), serve_inference
    configure_logging(settings.log_level, json=settings.log_json, service=service)
    asyncio.run(runner(settings))


@registry_app.command("serve")
def registry_serve(
    port: Port = None, host: Host = None, redis_url: RedisUrl = None, log_json: LogJson = None,
    metrics_port: MetricsPort = None,
    data_dir: Annotated[Path | None, typer.Option(help="Blob store directory.")] = None,
) -> None:  # fmt: skip
    """Run the registry (models, versions, deployments)."""
    _serve("registry", port=port, host=host, redis_url=redis_url, log_json=log_json,
           metrics_port=metrics_port, data_dir=data_dir)  # fmt: skip


@gateway_app.command("serve")
def gateway_serve(
    port: Port = None, host: Host = None, redis_url: RedisUrl = None, log_json: LogJson = None,
    metrics_port: MetricsPort = None,
    registry_address: Annotated[str | None, typer.Option(help="host:port of the registry.")] = None,
) -> None:  # fmt: skip
    """Run a gateway (the public KServe v2 gRPC endpoint)."""
    _serve("gateway", port=port, host=host, redis_url=redis_url, log_json=log_json,
           metrics_port=metrics_port, registry_address=registry_address)  # fmt: skip


@inference_app.command("serve")
def inference_serve(
    port: Port = None, host: Host = None, redis_url: RedisUrl = None, log_json: LogJson = None,
    metrics_port: MetricsPort = None,
    registry_address: Annotated[str | None, typer.Option(help="host:port of the registry.")] = None,
    pool: Annotated[str | None, typer.Option(help="Worker pool whose deployments to serve.")] = None,
    providers: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
) -> None:  # fmt: skip
    """Run an inference worker (pulls batches from Redis, runs ONNX Runtime)."""
    _serve("inference", port=port, host=host, redis_url=redis_url, log_json=log_json,
           metrics_port=metrics_port, registry_address=registry_address, pool=pool,
           providers=providers)  # fmt: skip


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=0, help="Number of inference workers.")] = 1,
    gateway_port: Annotated[int, typer.Option(help="Gateway gRPC port (0 picks one).")] = 8001,
    registry_port: Annotated[int, typer.Option(help="Registry gRPC port (0 picks one).")] = 8002,
    data_dir: Annotated[Path, typer.Option(help="Where Redis data, artifacts and caches live.")] = Path(".maas"),
    redis_url: Annotated[
        str | None, typer.Option(envvar="MAAS_REDIS_URL", help="Use this Redis instead of the embedded one.")
    ] = None,
    log_json: LogJson = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    access_log_sample: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of successful calls logged (errors always are).")
    ] = 1.0,
) -> None:
    """Run the whole suite on this machine: Redis, registry, gateway and workers. Ctrl-C stops it."""
    configure_logging(log_level, json=bool(log_json), service="up")
    options = UpOptions(
        data_dir=data_dir.resolve(), workers=workers, gateway_port=gateway_port, registry_port=registry_port,
        redis_url=redis_url, log_json=bool(log_json), log_level=log_level, access_log_sample=access_log_sample,
    )  # fmt: skip
    supervisor = Supervisor(options)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    try:
        endpoints = supervisor.start()
        err.print(
            f"[bold green]MaaS is up[/]: gateway [bold]{endpoints['gateway']}[/] (KServe v2 gRPC), "
            f"registry {endpoints['registry']}, {workers} worker(s), redis {endpoints['redis_url']}. Ctrl-C stops."
        )
        supervisor.supervise()
    except RuntimeError as exc:
        err.print(f"[red]error[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        supervisor.stop()


def _describe(model: ModelRecord) -> str:
    if model.deployment is None:
        return "not deployed"
    d = model.deployment
    return f"v{d.version} on pool {d.pool} (max batch {d.max_batch_size}, wait {d.max_wait_ms} ms)"


@models_app.command("push")
def models_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The .onnx file.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name.")],
    description: Annotated[str, typer.Option(help="Set when the model is created.")] = "",
    no_deploy: Annotated[bool, typer.Option("--no-deploy", help="Upload only.")] = False,
    max_batch_size: Annotated[int | None, typer.Option(help="Deployment: largest batch.")] = None,
    max_wait_ms: Annotated[int | None, typer.Option(help="Deployment: batch fill wait.")] = None,
    pool: Annotated[str | None, typer.Option(help="Deployment: worker pool.")] = None,
) -> None:
    """Upload FILE as a new version of model NAME (created if needed) and deploy it."""
    data = file.read_bytes()

    async def push(client: RegistryClient) -> None:
        try:
            await client.get_model(name)
        except NotFound:
            await client.create_model(name, description)
        version = await client.upload_version(name, data)
        size, sha = version.size_bytes, version.sha256[:12]
        out.print(f"pushed model '{name}' version {version.version} ({size} bytes, sha256 {sha})")
        if not no_deploy:
            dep = await client.deploy(
                name, version.version, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, pool=pool
            )
            out.print(f"deployed '{name}' version {dep.version} on pool {dep.pool}")

    _run(_with_registry(push))


@models_app.command("example")
def models_example(
    path: Annotated[Path, typer.Argument(dir_okay=False, help="Where to write the .onnx file.")],
) -> None:
    """Write a tiny example model: y = 2x + 1 on FP32 [-1, 4] (input "x", output "y")."""
    path.write_bytes(affine_model())
    out.print(f"wrote {path}: y = 2x + 1, input x FP32 [-1, 4], output y FP32 [-1, 4]")


@models_app.command("ls")
def models_ls() -> None:
    """List models and their deployments."""
    models = _run(_with_registry(lambda c: c.list_models()))
    table = Table("model", "latest", "deployment", "description")
    for model in models:
        table.add_row(model.name, str(model.latest_version or "-"), _describe(model), model.description)
    out.print(table)


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Show a model, its versions and their signatures."""

    async def show(client: RegistryClient) -> None:
        model = await client.get_model(name)
        out.print(f"[bold]{model.name}[/] {model.description}  deployment: {_describe(model)}")
        for v in await client.list_versions(name):
            sig = ", ".join(f"{t.name}:{t.datatype}{list(t.shape)}" for t in v.inputs)
            outs = ", ".join(f"{t.name}:{t.datatype}{list(t.shape)}" for t in v.outputs)
            out.print(f"  v{v.version}  {v.size_bytes} bytes  sha256 {v.sha256[:12]}  ({sig}) -> ({outs})")

    _run(_with_registry(show))


@models_app.command("rm")
def models_rm(name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Delete a model with all its versions and its deployment."""
    _run(_with_registry(lambda c: c.delete_model(name)))
    out.print(f"deleted model '{name}'")


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Option(help="Version to deploy (0: the latest).")] = 0,
    max_batch_size: Annotated[int | None, typer.Option(help="Largest batch (1..1024).")] = None,
    max_wait_ms: Annotated[int | None, typer.Option(help="Batch fill wait (0..1000 ms).")] = None,
    pool: Annotated[str | None, typer.Option(help="Worker pool.")] = None,
    max_queue_length: Annotated[int | None, typer.Option(help="Queue limit before RESOURCE_EXHAUSTED.")] = None,
) -> None:
    """Deploy a model version (replaces the current deployment)."""
    dep = _run(
        _with_registry(
            lambda c: c.deploy(
                name, version, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, pool=pool,
                max_queue_length=max_queue_length,
            )
        )
    )  # fmt: skip
    out.print(f"deployed '{name}' version {dep.version} on pool {dep.pool} (max batch {dep.max_batch_size})")


@app.command()
def undeploy(name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Remove a model's deployment."""
    _run(_with_registry(lambda c: c.undeploy(name)))
    out.print(f"undeployed '{name}'")


@app.command()
def infer(
    name: Annotated[str, typer.Argument(help="Model name.")],
    inputs: Annotated[list[str], typer.Option("--input", "-i", help="name=JSON or name=FILE.npy (repeat).")],
    version: Annotated[str, typer.Option(help="Model version ('' = deployed).")] = "",
    timeout_s: Annotated[float, typer.Option("--timeout", help="Deadline in seconds.")] = 30.0,
) -> None:
    """Call a model through the gateway and print its outputs as JSON."""
    result = _run(_infer(name, version, inputs, timeout_s))
    typer.echo(json.dumps(result))


async def _infer(name: str, version: str, inputs: list[str], timeout_s: float) -> dict[str, Any]:
    arrays = await asyncio.to_thread(lambda: dict(convert.parse_input(spec) for spec in inputs))
    async with grpc.aio.insecure_channel(CliSettings().gateway) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            metadata = await stub.ModelMetadata(convert.metadata_request(name, version), timeout=timeout_s)
            request = convert.infer_request(name, version, arrays, metadata)
            return convert.infer_result(await stub.ModelInfer(request, timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "gateway") from exc


@app.command()
def status() -> None:
    """Show models, deployments and whether a live worker serves each."""
    table = Table("model", "deployment", "ready")
    for model, ready in _run(_status()):
        table.add_row(model.name, _describe(model), "[green]yes[/]" if ready else "[red]no[/]")
    out.print(table)


async def _status() -> list[tuple[ModelRecord, bool]]:
    models = await _with_registry(lambda c: c.list_models())
    async with grpc.aio.insecure_channel(CliSettings().gateway) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        rows = []
        for model in models:
            try:
                ready = (await stub.ModelReady(convert.ready_request(model.name), timeout=5)).ready
            except grpc.aio.AioRpcError as exc:
                raise map_rpc_error(exc, "gateway") from exc
            rows.append((model, bool(ready)))
        return rows


def main() -> None:
    """Entry point of the ``maas`` console script."""
    app(prog_name="maas")
    sys.exit(0)
