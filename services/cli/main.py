"""The ``maas`` command line (typer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from services.cli import conversion as conversion_cli
from services.cli import convert, optimize_view
from services.cli import generate as generate_cli
from services.cli import status as cluster_view
from services.cli import tune as tune_cli
from services.cli.examples import affine_model
from services.cli.supervisor import Supervisor, UpOptions
from services.client import MaasClient
from services.common.auth import TenantQuota, TenantRecord, bearer
from services.common.errors import MaasError, PermissionDenied
from services.common.generation import is_generative
from services.common.logging import configure_logging
from services.common.metadata import ModelRecord, Split, VersionRecord, parse_class_labels
from services.common.optimization import OperationRecord
from services.common.redis_acl import redact_url
from services.common.registry_client import ProgressCallback
from services.common.status import ClusterStatus
from services.common.tls import CertificateFiles, TlsConfigError, channel_credentials
from services.common.usage import TenantUsage

app = typer.Typer(help="MaaS: register ONNX models and call them over gRPC (KServe v2).", no_args_is_help=True)
models_app = typer.Typer(help="Push, list, show, share and remove models.", no_args_is_help=True)
registry_app = typer.Typer(help="The registry service.", no_args_is_help=True)
gateway_app = typer.Typer(help="The gateway service (public KServe v2 endpoint).", no_args_is_help=True)
inference_app = typer.Typer(help="The inference worker service.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(registry_app, name="registry")
app.add_typer(gateway_app, name="gateway")
app.add_typer(inference_app, name="inference")

out = Console()
err = Console(stderr=True)
log = structlog.get_logger(__name__)


class CliSettings(BaseSettings):
    """Where the CLI finds the services (``MAAS_GATEWAY``, ``MAAS_REGISTRY``), and TLS (``MAAS_TLS_*``)."""

    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="ignore")

    gateway: str = "127.0.0.1:8001"
    """host:port of the gateway (the defaults of `maas up`)."""
    registry: str = "127.0.0.1:8002"
    """host:port of the registry."""
    tls_ca: Path | None = None
    """PEM CA of the services' certificates: call them over TLS (``--ca``)."""
    tls_cert: Path | None = None
    """PEM client certificate, for servers that require mutual TLS (``--cert``)."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert`` (``--key``)."""
    api_key: SecretStr | None = None
    """API key sent with every call (``--api-key``, env ``MAAS_API_KEY``); unset: ``api_key_file``."""
    api_key_file: Path = Path(".maas/auth/admin.key")
    """File holding the key when none is given (``maas up`` writes its admin key there; env ``MAAS_API_KEY_FILE``)."""
    min_transfer_bytes_per_s: float = Field(default=1024 * 1024, gt=0)
    """Slowest link ``maas models push``/``pull`` is given time for: their deadline is 300 s plus the
    size at this throughput (1 MiB/s: a 10 GiB bundle gets 300 s + 10240 s)."""

    def key(self) -> str | None:
        """Return the API key to send: ``api_key``, else the contents of ``api_key_file`` if it exists."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        try:
            return self.api_key_file.read_text().strip() or None
        except FileNotFoundError:
            return None


_global_flags: dict[str, Any] = {}
"""``--ca``, ``--cert``, ``--key`` and ``--api-key`` as given before the command (they override ``MAAS_*``)."""


@app.callback()
def _global_options(
    ca: Annotated[Path | None, typer.Option(help="PEM CA: call the services over TLS (env MAAS_TLS_CA).")] = None,
    cert: Annotated[Path | None, typer.Option(help="PEM client certificate, mutual TLS (env MAAS_TLS_CERT).")] = None,
    key: Annotated[Path | None, typer.Option(help="PEM key of --cert (env MAAS_TLS_KEY).")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (env MAAS_API_KEY; default: the key file `maas up` writes).")
    ] = None,
) -> None:
    """MaaS: register ONNX models and call them over gRPC (KServe v2)."""
    _global_flags.update(_given(tls_ca=ca, tls_cert=cert, tls_key=key, api_key=api_key))


@contextmanager
def _client() -> Iterator[MaasClient]:
    """Yield a client of the services CliSettings names; a MaaS error ends the command with its status."""
    settings = CliSettings(**_global_flags)
    try:
        credentials = channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
    except TlsConfigError as exc:
        err.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        metadata = bearer(settings.key())
        with MaasClient(
            settings.gateway, settings.registry, credentials=credentials, metadata=metadata,
            min_transfer_bytes_per_s=settings.min_transfer_bytes_per_s,
        ) as client:  # fmt: skip
            yield client
    except MaasError as exc:
        err.print(f"[red]error[/red] {exc.grpc_code.name}: {exc.message}")
        raise typer.Exit(1) from None


def _given(**options: Any) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}


Port = Annotated[int | None, typer.Option(help="gRPC port (0 picks a free one).")]
Host = Annotated[str | None, typer.Option(help="Address to bind.")]
RedisUrl = Annotated[str | None, typer.Option(help="Redis URL (default: MAAS_REDIS_URL).")]
RedisClusterFlag = Annotated[
    bool | None,
    typer.Option(
        "--redis-cluster/--no-redis-cluster",
        help="Redis Cluster mode: --redis-url names any node (default: MAAS_REDIS_CLUSTER).",
        show_default=False,
    ),
]
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
    metrics_port: MetricsPort = None, redis_cluster: RedisClusterFlag = None,
    data_dir: Annotated[Path | None, typer.Option(help="Blob store directory.")] = None,
) -> None:  # fmt: skip
    """Run the registry (models, versions, deployments)."""
    _serve("registry", port=port, host=host, redis_url=redis_url, redis_cluster=redis_cluster, log_json=log_json,
           metrics_port=metrics_port, data_dir=data_dir)  # fmt: skip


@gateway_app.command("serve")
def gateway_serve(
    port: Port = None, host: Host = None, redis_url: RedisUrl = None, log_json: LogJson = None,
    metrics_port: MetricsPort = None, redis_cluster: RedisClusterFlag = None,
    registry_address: Annotated[str | None, typer.Option(help="host:port of the registry.")] = None,
) -> None:  # fmt: skip
    """Run a gateway (the public KServe v2 gRPC endpoint)."""
    _serve("gateway", port=port, host=host, redis_url=redis_url, redis_cluster=redis_cluster, log_json=log_json,
           metrics_port=metrics_port, registry_address=registry_address)  # fmt: skip


@inference_app.command("serve")
def inference_serve(
    port: Port = None, host: Host = None, redis_url: RedisUrl = None, log_json: LogJson = None,
    metrics_port: MetricsPort = None, redis_cluster: RedisClusterFlag = None,
    registry_address: Annotated[str | None, typer.Option(help="host:port of the registry.")] = None,
    pool: Annotated[str | None, typer.Option(help="Worker pool whose deployments to serve.")] = None,
    providers: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
) -> None:  # fmt: skip
    """Run an inference worker (pulls batches from Redis, runs ONNX Runtime)."""
    _serve("inference", port=port, host=host, redis_url=redis_url, redis_cluster=redis_cluster, log_json=log_json,
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
    redis_cluster: Annotated[
        bool,
        typer.Option(
            envvar="MAAS_REDIS_CLUSTER", help="--redis-url names a node of a Redis Cluster (needs --redis-url)."
        ),
    ] = False,
    log_json: LogJson = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    access_log_sample: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of successful calls logged (errors always are).")
    ] = 1.0,
    tls: Annotated[bool, typer.Option(help="Serve TLS everywhere (local CA, certificates in DATA_DIR/tls).")] = False,
    mtls: Annotated[bool, typer.Option(help="Also require client certificates (mutual TLS; implies --tls).")] = False,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="No API keys: anyone may call anything.")] = False,
    unix_sockets: Annotated[
        bool,
        typer.Option(
            envvar="MAAS_UP_UNIX_SOCKETS",
            help="Services reach Redis, and workers the gateway's reply listener, over Unix sockets (else TCP).",
        ),
    ] = True,
) -> None:
    """Run the whole suite on this machine: Redis, registry, gateway and workers. Ctrl-C stops it."""
    configure_logging(log_level, json=bool(log_json), service="up")
    if no_auth:
        log.warning("auth_disabled", hint="--no-auth: every caller may call, upload, deploy or delete anything")
    options = UpOptions(
        data_dir=data_dir.resolve(), workers=workers, gateway_port=gateway_port, registry_port=registry_port,
        redis_url=redis_url, redis_cluster=redis_cluster, log_json=bool(log_json), log_level=log_level,
        access_log_sample=access_log_sample,
        tls=tls, mtls=mtls, auth=not no_auth, unix_sockets=unix_sockets,
    )  # fmt: skip
    supervisor = Supervisor(options)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    try:
        endpoints = supervisor.start()
        err.print(
            f"[bold green]MaaS is up[/]: gateway [bold]{endpoints['gateway']}[/] (KServe v2 gRPC), "
            f"registry {endpoints['registry']}, {workers} worker(s), "
            f"redis {redact_url(str(endpoints['redis_url']))}. Ctrl-C stops."
        )
        if supervisor.auth_files is not None:
            transport = "-plaintext" if supervisor.certs is None else _grpcurl_tls(supervisor.certs, is_mutual=mtls)
            key_hint = _auth_hint(supervisor.auth_files.admin_key, str(endpoints["gateway"]), transport)
            err.print(key_hint, markup=False, highlight=False, soft_wrap=True)
        if supervisor.certs is not None:
            hint = _tls_hint(supervisor.certs, str(endpoints["gateway"]), is_mutual=mtls)
            err.print(hint, markup=False, highlight=False, soft_wrap=True)  # commands to copy: no line breaks
        supervisor.supervise()
    except RuntimeError as exc:
        err.print(f"[red]error[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        supervisor.stop()


def _auth_hint(key_file: Path, gateway: str, transport: str) -> str:
    """How to call a `maas up` suite with its administrator key (printed on the user's terminal only).

    ``transport``: grpcurl's flags for the gateway's port (``-plaintext``, or ``_grpcurl_tls``'s).
    """
    key = key_file.read_text().strip()
    return (
        f"API keys are on. Administrator key (also in {key_file}, which the CLI reads from this directory):\n"
        f"  {key}\n"
        f"  CLI elsewhere: export MAAS_API_KEY=$(cat {key_file})\n"
        f'  tritonclient: client.infer(..., headers={{"authorization": "Bearer {key}"}})\n'
        f'  grpcurl: grpcurl {transport} -H "authorization: Bearer {key}" {gateway} list\n'
        "  Create keys for others: maas keys create --tenant T --name N --scope infer --models 'fraud-*'"
    )


def _tls_hint(certs: CertificateFiles, gateway: str, *, is_mutual: bool) -> str:
    """How to call a `maas up --tls` suite with the CLI, tritonclient and grpcurl."""
    ca = certs.ca_cert
    client = f", certificate_chain='{certs.client_cert}', private_key='{certs.client_key}'" if is_mutual else ""
    env = f" MAAS_TLS_CERT={certs.client_cert} MAAS_TLS_KEY={certs.client_key}" if is_mutual else ""
    return (
        f"TLS{' (mutual)' if is_mutual else ''}: CA {ca}\n"
        f"  maas:         export MAAS_TLS_CA={ca}{env}\n"
        f"  tritonclient: InferenceServerClient('{gateway}', ssl=True, root_certificates='{ca}'{client})\n"
        f"  grpcurl:      grpcurl {_grpcurl_tls(certs, is_mutual=is_mutual)} {gateway} list"
    )


def _grpcurl_tls(certs: CertificateFiles, *, is_mutual: bool) -> str:
    """Return grpcurl's flags for a `maas up --tls` port: the CA, and with ``is_mutual`` the client certificate."""
    client = f" -cert {certs.client_cert} -key {certs.client_key}" if is_mutual else ""
    return f"-cacert {certs.ca_cert}{client}"


def _describe(model: ModelRecord, *, is_generative: bool = False) -> str:
    if model.deployment is None:
        return "not deployed"
    d = model.deployment
    versions = f"v{d.version}" if len(d.split) == 1 else _split_text(d.split)
    return f"{versions} on pool {d.pool} ({cluster_view.serving_text(d, is_generative=is_generative)})"


def _is_generative(client: MaasClient, model: ModelRecord) -> bool:
    """Whether the model's deployed version is a generative model (answered token by token, not batched)."""
    if model.deployment is None:
        return False
    return is_generative(client.get_version(model.name, model.deployment.version).platform)


def _split_text(split: Split) -> str:
    return ", ".join(f"v{version}={weight}%" for version, weight in split)


def _aliases(model: ModelRecord) -> str:
    return ", ".join(f"{alias} -> v{version}" for alias, version in model.aliases) or "none"


def _read_labels(path: Path) -> tuple[str, ...]:
    try:
        return parse_class_labels(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise typer.BadParameter(f"not UTF-8 text: {path}", param_hint="--labels") from None


def _labels(version: VersionRecord) -> str:
    return f"  {len(version.class_labels)} class labels" if version.class_labels else ""


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]


def _jsonable(record: Any) -> Any:
    return None if record is None else asdict(record)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data))


def _label_map(items: list[str] | None, option: str) -> dict[str, str]:
    """``K=V`` options -> a label map (the registry checks the keys and values)."""
    labels = {}
    for item in items or ():
        key, has_value, value = item.partition("=")
        if not has_value or not key:
            raise typer.BadParameter(f"expected K=V, got '{item}'", param_hint=option)
        labels[key] = value
    return labels


def _version_notes(version: VersionRecord) -> str:
    labels = ", ".join(f"{key}={value}" for key, value in sorted(version.labels.items())) or "none"
    pushed = version.pushed_by or "unknown"
    return f"pushed by {pushed}  labels: {labels}  description: {version.description or '-'}"


@models_app.command("push")
def models_push(
    file: Annotated[
        Path,
        typer.Argument(exists=True, help="The .onnx file, a bundle directory (DIR/) or a bundle's .tar archive."),
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name.")],
    description: Annotated[
        str, typer.Option(help="The version's description (also the model's when this push creates it).")
    ] = "",
    label: Annotated[list[str] | None, typer.Option("--label", help="Version label K=V (repeat).")] = None,
    no_deploy: Annotated[bool, typer.Option("--no-deploy", help="Upload only.")] = False,
    max_batch_size: Annotated[int | None, typer.Option(help="Deployment: largest batch.")] = None,
    max_wait_ms: Annotated[int | None, typer.Option(help="Deployment: batch fill wait.")] = None,
    pool: Annotated[str | None, typer.Option(help="Deployment: worker pool.")] = None,
    labels: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Class labels for class_count: line i names class index i."),
    ] = None,
    custom_ops: Annotated[
        list[str] | None,
        typer.Option(
            "--custom-ops", help="Custom-operator library the model needs (repeat); only onnxruntime-extensions."
        ),
    ] = None,
    entry: Annotated[
        str, typer.Option("--entry", help="Bundle: the .onnx file to load (default: the only .onnx at the top).")
    ] = "",
) -> None:
    """Upload FILE (an .onnx file, a bundle DIR/ or a .tar) as a new version of model NAME and deploy it."""
    class_labels = () if labels is None else _read_labels(labels)
    version_labels = _label_map(label, "--label")
    with _client() as client:
        with _transfer_bar("uploading", file.name, _size_of(file)) as progress:
            version = client.push(
                name, file, description=description, progress=progress, class_labels=class_labels,
                labels=version_labels, custom_ops=custom_ops or (), entry_point=entry,
            )  # fmt: skip
        size, sha = version.size_bytes, version.sha256[:12]
        out.print(f"pushed model '{name}' version {version.version} ({size} bytes, sha256 {sha}){_labels(version)}")
        if not no_deploy:
            settings = _given(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, pool=pool)
            dep = client.deploy(name, version.version, **settings)
            out.print(f"deployed '{name}' version {dep.version} on pool {dep.pool}")


def _size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (a bundle)."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def _transfer_bar(verb: str, name: str, total: int | None) -> Iterator[ProgressCallback]:
    """Show a progress bar (on stderr) that the yielded callback drives; it may be called from any thread."""
    columns = (TextColumn(f"{verb} {{task.description}}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(name, total=total)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="Model name.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the .onnx file (a bundle: its directory).")
    ],
    version: Annotated[int, typer.Option(help="Version to download (0: the latest).")] = 0,
) -> None:
    """Download a version's .onnx file, or a bundle's files into a directory (streamed, sha256-checked)."""
    with _client() as client, _transfer_bar("downloading", f"{name} v{version or 'latest'}", None) as progress:
        record = client.pull(name, output, version=version, progress=progress)
    out.print(f"pulled model '{name}' version {record.version} to {output} ({record.size_bytes} bytes, sha256 ok)")


@models_app.command("example")
def models_example(
    path: Annotated[Path, typer.Argument(dir_okay=False, help="Where to write the .onnx file.")],
) -> None:
    """Write a tiny example model: y = 2x + 1 on FP32 [-1, 4] (input "x", output "y")."""
    path.write_bytes(affine_model())
    out.print(f"wrote {path}: y = 2x + 1, input x FP32 [-1, 4], output y FP32 [-1, 4]")


@models_app.command("ls")
def models_ls(
    prefix: Annotated[str, typer.Option(help="Only models whose name starts with it.")] = "",
    label: Annotated[
        list[str] | None, typer.Option("--label", help="Only models with a version labelled K=V (repeat: all).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List models and their deployments."""
    wanted = _label_map(label, "--label")
    with _client() as client:
        models = client.list_models(prefix, wanted)
    if as_json:
        _print_json([asdict(model) for model in models])
        return
    table = Table("model", "latest", "deployment", "description")
    for model in models:
        table.add_row(model.name, str(model.latest_version or "-"), _describe(model), model.description)
    out.print(table)


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int | None, typer.Option(help="Only this version (with its lineage and report).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show a model, its versions and their signatures, labels, who pushed them, lineage and reports."""
    with _client() as client:
        model = client.get_model(name)
        versions = client.list_versions(name) if version is None else [client.get_version(name, version)]
        if as_json:
            _print_json(asdict(model) | {"versions": [asdict(v) for v in versions]})
            return
        out.print(f"[bold]{model.name}[/] {model.description}  deployment: {_describe(model)}")
        out.print(f"  aliases: {_aliases(model)}")
        out.print(f"  {_ownership(model)}")
        if model.deployment is not None and model.deployment.previous_traffic:
            previous = _split_text(model.deployment.previous_traffic)
            out.print(f"  rollback to: {previous}")
        for v in versions:
            sig = ", ".join(f"{t.name}:{t.datatype}{list(t.shape)}" for t in v.inputs)
            outs = ", ".join(f"{t.name}:{t.datatype}{list(t.shape)}" for t in v.outputs)
            out.print(f"  v{v.version}  {v.size_bytes} bytes  sha256 {v.sha256[:12]}  ({sig}) -> ({outs}){_labels(v)}")
            out.print(f"      {_version_notes(v)}", markup=False, highlight=False)
            if v.lineage is not None:
                out.print(f"      {optimize_view.lineage_text(v.lineage)}", markup=False, highlight=False)
            if v.report is not None:
                out.print(optimize_view.reports_table([v.report], title=f"v{v.version} report"))


@models_app.command("optimize")
def models_optimize(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Option(help="Source version (0: the latest).")] = 0,
    transform: Annotated[str, typer.Option(help="graph, int8-dynamic, int8-static or fp16.")] = "",
    max_abs_diff: Annotated[float | None, typer.Option(help="Largest output difference allowed.")] = None,
    calibration: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help=".npz: one array per input (rows).")
    ] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Try the transforms for --device, keep the fastest.")] = False,
    device: Annotated[str, typer.Option(help="cpu or gpu: what the variant is for.")] = "cpu",
    option: Annotated[list[str] | None, typer.Option("--option", help="Transform option K=V (repeat).")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the operation id and return.")] = False,
) -> None:
    """Derive a faster or smaller variant of a version as a new version (a registry operation)."""
    with _client() as client:
        operation = client.optimize(
            name, version, transform, auto=auto, device=device, max_abs_diff=max_abs_diff,
            options=_label_map(option, "--option"), calibration=calibration,
        )  # fmt: skip
        out.print(f"operation {operation.id} started", markup=False, highlight=False)
        if not no_wait:
            _follow_operation(client, operation.id)


@models_app.command("operation")
def models_operation(
    operation_id: Annotated[str, typer.Argument(help="The operation id (from `maas models optimize`).")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until it ends.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show an optimisation operation: state, progress, report table, new version or error."""
    with _client() as client:
        if wait:
            _follow_operation(client, operation_id)
            return
        operation = client.get_operation(operation_id)
        if as_json:
            _print_json(asdict(operation))
            return
        out.print(optimize_view.operation_text(operation), markup=False, highlight=False)
        if operation.reports:
            out.print(optimize_view.reports_table(operation.reports))


def _follow_operation(client: MaasClient, operation_id: str) -> None:
    """Print an operation's progress until it ends, then its report table; exit 1 if it FAILED."""

    def progress(operation: OperationRecord) -> None:
        out.print(f"  {operation.progress_percent:3d}% {operation.progress_message}", markup=False, highlight=False)

    operation = client.wait_operation(operation_id, progress)
    out.print(optimize_view.operation_text(operation), markup=False, highlight=False)
    if operation.reports:
        out.print(optimize_view.reports_table(operation.reports))
    if operation.error_code:
        raise typer.Exit(1)


def _ownership(model: ModelRecord) -> str:
    if not model.owner:
        return "owner: none (every tenant sees it)"
    return f"owner: {model.owner}  shared with: {', '.join(model.shared_with) or 'no other tenant'}"


@models_app.command("share")
def models_share(
    name: Annotated[str, typer.Argument(help="Model name.")],
    tenant: Annotated[str, typer.Option(help="The tenant whose keys may then read and infer it.")],
) -> None:
    """Share a model with another tenant (read and infer; only the owner tenant or an admin may)."""
    with _client() as client:
        model = client.share_model(name, tenant)
    out.print(f"shared model '{name}' with tenant '{tenant}'\n  {_ownership(model)}")


@models_app.command("unshare")
def models_unshare(
    name: Annotated[str, typer.Argument(help="Model name.")],
    tenant: Annotated[str, typer.Option(help="The tenant to stop sharing it with.")],
) -> None:
    """Stop sharing a model with a tenant."""
    with _client() as client:
        model = client.unshare_model(name, tenant)
    out.print(f"stopped sharing model '{name}' with tenant '{tenant}'\n  {_ownership(model)}")


@models_app.command("rm")
def models_rm(
    name: Annotated[str, typer.Argument(help="Model name.")],
    force: Annotated[bool, typer.Option("--force", help="Undeploy it first if it is deployed.")] = False,
) -> None:
    """Delete a model with all its versions (a deployed one only with --force)."""
    with _client() as client:
        client.delete_model(name, force=force)
    out.print(f"deleted model '{name}'")


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[
        list[str] | None,
        typer.Option(help="Version to deploy (default: the latest), or V=WEIGHT (repeat: a split summing to 100)."),
    ] = None,
    promote: Annotated[int | None, typer.Option(help="Send all traffic to this version.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Largest batch (1..1024).")] = None,
    max_wait_ms: Annotated[int | None, typer.Option(help="Batch fill wait (0..1000 ms).")] = None,
    pool: Annotated[str | None, typer.Option(help="Worker pool.")] = None,
    max_queue_length: Annotated[int | None, typer.Option(help="Queue limit before RESOURCE_EXHAUSTED.")] = None,
) -> None:
    """Deploy a model version, or split traffic among versions (replaces the current deployment).

    Options left out keep the current deployment's values (the defaults on a first deploy). The
    split replaced is kept: `maas rollback NAME` goes back to it.
    """
    settings = _given(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, pool=pool,
                      max_queue_length=max_queue_length)  # fmt: skip
    single, traffic = _traffic(version or [], promote)
    with _client() as client:
        dep = client.deploy(name, single, traffic=traffic, keep_settings=True, **settings)
    out.print(f"deployed '{name}' {_split_text(dep.split)} on pool {dep.pool} (max batch {dep.max_batch_size})")


def _traffic(versions: list[str], promote: int | None) -> tuple[int, dict[int, int] | None]:
    """``--version``s and ``--promote`` -> (one version, or 0) and (a weight by version, or None)."""
    if promote is not None:
        if versions:
            raise typer.BadParameter("give --promote or --version, not both", param_hint="--promote")
        return 0, {promote: 100}
    if len(versions) == 1 and "=" not in versions[0]:
        return _int(versions[0], "V"), None
    weights: dict[int, int] = {}
    for item in versions:
        number, has_weight, weight = item.partition("=")
        if not has_weight:
            raise typer.BadParameter(f"expected V=WEIGHT in a split, got '{item}'", param_hint="--version")
        weights[_int(number, "V")] = _int(weight, "WEIGHT")
    return 0, weights or None


def _int(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise typer.BadParameter(f"{what} must be a whole number, got '{text}'", param_hint="--version")
    return int(text)


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Go back to the traffic split before the last deploy (or rollback), keeping the settings."""
    with _client() as client:
        dep = client.rollback(name)
    out.print(f"rolled back '{name}' to {_split_text(dep.split)}")


# `maas alias`: names for versions (services/registry/rollout.py).
alias_app = typer.Typer(help="Aliases: names for versions (e.g. production -> 3).", no_args_is_help=True)
app.add_typer(alias_app, name="alias")


@alias_app.command("set")
def alias_set(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="Alias (a name, not a number); 'default' serves unversioned calls.")],
    version: Annotated[int, typer.Argument(help="Version it points to.")],
) -> None:
    """Point ALIAS at VERSION of model NAME (creates or moves it)."""
    with _client() as client:
        client.set_alias(name, alias, version)
    out.print(f"alias '{alias}' of '{name}' -> version {version}")


@alias_app.command("rm")
def alias_rm(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Argument(help="Alias.")],
) -> None:
    """Remove an alias."""
    with _client() as client:
        client.delete_alias(name, alias)
    out.print(f"removed alias '{alias}' of '{name}'")


@alias_app.command("ls")
def alias_ls(name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """List a model's aliases."""
    with _client() as client:
        aliases = client.list_aliases(name)
    table = Table("alias", "version")
    for alias, version in aliases:
        table.add_row(alias, str(version))
    out.print(table)


@app.command()
def undeploy(name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Remove a model's deployment."""
    with _client() as client:
        client.undeploy(name)
    out.print(f"undeployed '{name}'")


@app.command()
def infer(
    name: Annotated[str, typer.Argument(help="Model name.")],
    inputs: Annotated[list[str], typer.Option("--input", "-i", help="name=JSON or name=FILE.npy (repeat).")],
    version: Annotated[str, typer.Option(help="Model version ('' = deployed).")] = "",
    timeout_s: Annotated[float, typer.Option("--timeout", help="Deadline in seconds.")] = 30.0,
) -> None:
    """Call a model through the gateway and print its outputs as JSON."""
    with _client() as client:
        arrays = dict(convert.parse_input(spec) for spec in inputs)
        signature = client.model_metadata(name, version=version, timeout_s=timeout_s)
        cast = convert.cast_inputs(name, arrays, signature)
        result = client.infer(name, cast, version=version, timeout_s=timeout_s)
    typer.echo(json.dumps(convert.result_json(result)))


@app.command()
def status(as_json: JsonFlag = False) -> None:
    """Show models and deployments, live workers, each model version's queue and last-minute calls."""
    table = Table("model", "deployment", "ready")
    states = []
    with _client() as client:
        for model in client.list_models():
            ready = client.model_ready(model.name, timeout_s=5)
            generative = _is_generative(client, model)
            deployment = _jsonable(model.deployment)
            states.append({"model": model.name, "deployment": deployment, "ready": ready, "generative": generative})
            described = _describe(model, is_generative=generative)
            table.add_row(model.name, described, "[green]yes[/]" if ready else "[red]no[/]")
        report: list[tuple[TenantRecord, TenantUsage]] | None = None
        cluster: ClusterStatus | None = None
        with contextlib.suppress(PermissionDenied):  # a tenant admin sees its tenant's usage and models
            report = client.tenant_report()
            cluster = client.cluster_status()
    if as_json:
        tenants = None if report is None else [asdict(tenant) | {"usage": asdict(used)} for tenant, used in report]
        _print_json({"models": states, "tenants": tenants} | (cluster_view.to_json(cluster) if cluster else {}))
        return
    out.print(table)
    if cluster is not None:
        cluster_view.print_view(out, cluster)
    if report is None:
        out.print("tenants, workers and queues: need a key with the admin scope (a tenant's: its own models)")
    elif report:
        out.print(_tenant_table(report, with_description=False))


@app.command()
def top(
    interval_s: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")] = 1.0,
    iterations: Annotated[int, typer.Option(min=0, help="Refreshes before exiting (0: until Ctrl-C).")] = 0,
) -> None:
    """Show workers and queues live, refreshed every second, until Ctrl-C (admin scope)."""
    with _client() as client:
        live = Live(console=out, auto_refresh=False) if out.is_terminal else None
        try:
            with live or contextlib.nullcontext():
                count = 0
                while True:
                    cluster = client.cluster_status()
                    if live is not None:
                        live.update(cluster_view.render(cluster), refresh=True)
                    else:  # not a terminal (a pipe, a test): one screen after another
                        cluster_view.print_view(out, cluster)
                    count += 1
                    if count == iterations:
                        return
                    time.sleep(interval_s)
        except KeyboardInterrupt:
            return


# `maas redis acl`: the Redis users of the service roles (services/common/redis_acl.py).
redis_app = typer.Typer(help="Redis users (ACL) of the services.", no_args_is_help=True)
app.add_typer(redis_app, name="redis")


@redis_app.command("acl")
def redis_acl_rules(
    output_format: Annotated[
        str, typer.Option("--format", help="file: users.acl lines; commands: ACL SETUSER commands (redis-cli).")
    ] = "file",
    passwords: Annotated[
        Path, typer.Option(help="user=password lines; created with new random passwords (mode 0600) if missing.")
    ] = Path("redis-passwords.env"),
) -> None:
    """Print the Redis users of the gateway, worker, registry and monitor roles (passwords hashed).

    Single Redis (or Sentinel) only: on a Redis Cluster (--redis-cluster) the roles lack the
    CLUSTER and COMMAND commands the cluster client needs; use the cluster's own users there.
    """
    from services.common import redis_acl

    if output_format not in ("file", "commands"):
        err.print(f"[red]error[/red] --format: expected 'file' or 'commands', got '{output_format}'")
        raise typer.Exit(2)
    if not passwords.exists():
        redis_acl.write_passwords(passwords, redis_acl.new_passwords())
        err.print(f"wrote new passwords to {passwords} (mode 0600; 'default' is the admin's)")
    known = redis_acl.read_passwords(passwords)
    missing = [role for role in redis_acl.ROLES if not known.get(role)]
    if missing:
        err.print(f"[red]error[/red] {passwords}: no password for {', '.join(missing)} (user=password lines)")
        raise typer.Exit(1)
    if output_format == "file":
        typer.echo(redis_acl.acl_file(known), nl=False)
    else:
        for command in redis_acl.setuser_commands(known):
            typer.echo(" ".join(command))


# `maas keys` and `maas tenants`: identities (admin scope; services/registry/identities.py).
keys_app = typer.Typer(
    help="API keys (admin scope). A tenant's admin key manages its own tenant's keys only; "
    "the 'system' tenant's admin key (`maas up`'s) manages every tenant's.",
    no_args_is_help=True,
)
tenants_app = typer.Typer(
    help="Tenants (admin scope). `create` and `set-quota` need the 'system' tenant's admin key; "
    "a tenant's admin key lists only its own tenant.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")

_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _expires_at_ms(expires_in: str | None) -> int:
    """``30d`` (s, m, h or d) -> the Unix time in ms that far from now; None -> 0 (never)."""
    if expires_in is None:
        return 0
    number, unit = expires_in[:-1], expires_in[-1:]
    if unit not in _DURATION_UNITS_S or not number.isascii() or not number.isdigit() or int(number) == 0:
        raise typer.BadParameter(f"expected a positive number and s, m, h or d (e.g. 30d), got '{expires_in}'")
    return int((time.time() + int(number) * _DURATION_UNITS_S[unit]) * 1000)


def _when(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at_ms / 1000)) + " UTC" if at_ms else "never"


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key belongs to.")],
    name: Annotated[str, typer.Option(help="A name for people and the audit log.")],
    scope: Annotated[list[str], typer.Option(help="infer, read, write or admin (repeat).")],
    models: Annotated[
        list[str] | None, typer.Option(help="Model-name glob the key may use (repeat; default '*').")
    ] = None,
    expires_in: Annotated[str | None, typer.Option(help="Lifetime, e.g. 12h or 30d (default: never).")] = None,
) -> None:
    """Create an API key and print it (shown only this once).

    A tenant's admin key creates keys of its own tenant only, with no scope or model pattern it lacks.
    """
    expires_at_ms = _expires_at_ms(expires_in)
    with _client() as client:
        record, key = client.create_api_key(tenant, name, scope, models=models or (), expires_at_ms=expires_at_ms)
    scopes, patterns = ", ".join(record.scopes), ", ".join(record.models)
    err.print(
        f"created key '{record.name}' (id {record.id}) of tenant '{record.tenant}': scopes {scopes}; models "
        f"{patterns}; expires {_when(record.expires_at_ms)}. Store it now: it is not shown again.",
        soft_wrap=True,
    )
    typer.echo(key)


@keys_app.command("ls")
def keys_ls(
    tenant: Annotated[str, typer.Option(help="Only this tenant's keys.")] = "", as_json: JsonFlag = False
) -> None:
    """List API keys (never their secrets); a tenant's admin key lists its own tenant's."""
    with _client() as client:
        records = client.list_api_keys(tenant)
    if as_json:
        _print_json([{k: v for k, v in asdict(r).items() if k != "secret_hmac"} for r in records])
        return
    table = Table("tenant", "name", "scopes", "models", "expires", "state")
    table.add_column("id", no_wrap=True, min_width=16)  # the whole id: `maas keys revoke ID` needs it
    for r in records:
        state = "revoked" if r.revoked else "expired" if r.is_expired(int(time.time() * 1000)) else "active"
        table.add_row(r.tenant, r.name, ",".join(r.scopes), ",".join(r.models), _when(r.expires_at_ms), state, r.id)
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (see `maas keys ls`).")],
) -> None:
    """Revoke an API key: every gateway and registry refuses it within about a second.

    A tenant's admin key revokes its own tenant's keys only (another tenant's id is 'not found').
    """
    with _client() as client:
        record = client.revoke_api_key(key_id)
    out.print(f"revoked key '{record.name}' (id {record.id}) of tenant '{record.tenant}'")


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant name.")],
    description: Annotated[str, typer.Option(help="Free text.")] = "",
) -> None:
    """Create a tenant (the 'system' tenant's admin key only)."""
    with _client() as client:
        tenant = client.create_tenant(name, description)
    out.print(f"created tenant '{tenant.name}'")


@tenants_app.command("ls")
def tenants_ls() -> None:
    """List the tenants with their quotas and usage (a tenant's admin key: its own tenant)."""
    with _client() as client:
        report = client.tenant_report()
    out.print(_tenant_table(report, with_description=True))


def _quota_text(quota: TenantQuota) -> str:
    if not quota.is_limited:
        return "none"
    rate = f"{quota.rps:g}/s burst {quota.burst}" if quota.rps else ""
    cap = f"{quota.max_in_flight} in flight" if quota.max_in_flight else ""
    return ", ".join(part for part in (rate, cap) if part)


def _tenant_table(report: list[tuple[TenantRecord, TenantUsage]], *, with_description: bool) -> Table:
    """Tenants with their quota and cluster-wide usage (calls, errors, compute seconds)."""
    described = ("created", "description") if with_description else ()
    table = Table("tenant", "quota", "calls", "errors", "compute s", *described)
    for tenant, used in report:
        extra = (_when(tenant.created_at_ms), tenant.description) if with_description else ()
        usage_cells = (str(used.calls), str(used.errors), f"{used.compute_ns / 1e9:.3f}")
        table.add_row(tenant.name, _quota_text(tenant.quota), *usage_cells, *extra)
    return table


@tenants_app.command("set-quota")
def tenants_set_quota(
    name: Annotated[str, typer.Argument(help="Tenant name.")],
    rps: Annotated[float, typer.Option(help="Calls admitted per second (0: no rate limit).")] = 0.0,
    burst: Annotated[int | None, typer.Option(help="Calls admitted at once (default: rps rounded up).")] = None,
    max_in_flight: Annotated[int, typer.Option(help="Calls in flight at once, all gateways (0: no cap).")] = 0,
) -> None:
    """Set a tenant's quota at every gateway; calls over it get RESOURCE_EXHAUSTED.

    Needs the 'system' tenant's admin key: a tenant's admin key cannot raise its own quota.
    """
    with _client() as client:
        burst = burst if burst is not None else math.ceil(rps)
        tenant = client.set_tenant_quota(name, rps=rps, burst=burst, max_in_flight=max_in_flight)
    out.print(f"tenant '{tenant.name}' quota: {_quota_text(tenant.quota)}")


# `maas models versions` and `maas events`: version lifecycle and the registry's events
# (services/registry/lifecycle.py, services/registry/events_watch.py).
versions_app = typer.Typer(help="Change or delete versions of a model.", no_args_is_help=True)
models_app.add_typer(versions_app, name="versions")


@versions_app.command("update")
def versions_update(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version.")],
    description: Annotated[str | None, typer.Option(help="New description ('' clears it).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Set label K=V (repeat).")] = None,
    remove_label: Annotated[list[str] | None, typer.Option("--remove-label", help="Remove label K (repeat).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Change a version's description and labels (the artifact never changes)."""
    labels = _label_map(label, "--label")
    with _client() as client:
        record = client.update_version(
            name, version, description=description, labels=labels, remove_labels=remove_label or ()
        )
    if as_json:
        _print_json(asdict(record))
        return
    out.print(f"updated '{name}' version {record.version}: {_version_notes(record)}", markup=False, highlight=False)


@versions_app.command("rm")
def versions_rm(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version.")],
) -> None:
    """Delete a version and its artifact (refused while it serves traffic or an alias points to it)."""
    with _client() as client:
        client.delete_version(name, version)
    out.print(f"deleted '{name}' version {version}")


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")] = False,
    from_id: Annotated[
        str, typer.Option("--from", help="Print the events after this id ('0': the oldest kept; '': from now).")
    ] = "0",
    model: Annotated[str, typer.Option(help="Only this model's events.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Print the registry's events (models, versions, aliases, deployments), oldest first."""
    with _client() as client:
        for event in client.watch_events(from_id, follow=follow, model=model):
            if as_json:
                _print_json(asdict(event) | {"time_ms": event.time_ms})
            else:
                version = f" v{event.version}" if event.version else ""
                typer.echo(f"{event.id}  {_when_ms(event.time_ms)}  {event.kind}  {event.model}{version}")


def _when_ms(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at_ms / 1000)) + f".{at_ms % 1000:03d} UTC"


# `maas models convert` and `maas tune` (issue 9): services/cli/conversion.py, services/cli/tune.py;
# `maas generate` (issue 11): services/cli/generate.py.
conversion_cli.register(models_app, _client, out, err)
tune_cli.register(app, _client, out, err)
generate_cli.register(app, _client, out, err)


def main() -> None:
    """Entry point of the ``maas`` console script."""
    app(prog_name="maas")
    sys.exit(0)
