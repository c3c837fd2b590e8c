"""`maas up` as a user runs it: real processes, real signals, a restart on the same data dir."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.models import affine_model
from tests.triton import triton_calls

pytestmark = pytest.mark.integration

MAAS = [sys.executable, "-m", "services.cli"]


class Up:
    """A running `maas up` process and the endpoints it wrote."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [*MAAS, "up", "--workers", "1", "--gateway-port", "0", "--registry-port", "0", "--data-dir", str(data_dir)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("MAAS_")},
        )
        self.endpoints = self._wait_endpoints(log)
        self.api_key = self._printed_key(log)

    def _wait_endpoints(self, log: Path) -> dict[str, object]:
        path = self.data_dir / "run" / "endpoints.json"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if path.exists():
                endpoints: dict[str, object] = json.loads(path.read_text())
                return endpoints
            assert self.process.poll() is None, f"maas up exited: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"maas up not ready: {log.read_text()[-3000:]}")

    def _printed_key(self, log: Path) -> str:
        """The administrator key `maas up` printed (API keys are on by default)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.search(r"^\s+(maas_[0-9a-f]{16}_\S+)$", log.read_text(), re.MULTILINE)
            if found:
                return found.group(1)
            time.sleep(0.2)
        raise AssertionError(f"maas up printed no key: {log.read_text()[-3000:]}")

    @property
    def env(self) -> dict[str, str]:
        return os.environ | {
            "MAAS_GATEWAY": str(self.endpoints["gateway"]),
            "MAAS_REGISTRY": str(self.endpoints["registry"]),
            "MAAS_API_KEY": self.api_key,
        }

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(60)
        finally:
            self._log.close()


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _current_pids(up: Up) -> dict[str, int]:
    pids: dict[str, int] = json.loads((up.data_dir / "run" / "endpoints.json").read_text())["pids"]
    return pids


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "affine.onnx"
    path.write_bytes(affine_model())
    return path


def _infer_affine(up: Up) -> list[list[float]]:
    [result] = triton_calls(
        str(up.endpoints["gateway"]),
        [{"op": "infer", "model": "affine", "inputs": {"x": {"data": [[1, 2, 3, 4]], "dtype": "float32"}},
          "timeout_s": 60}],
        api_key=up.api_key,
    )  # fmt: skip
    assert "ok" in result, result
    outputs: list[list[float]] = result["ok"]["outputs"]["y"]
    return outputs


def _socket_users(up: Up) -> set[str]:
    """The Redis users connected over the embedded Redis's Unix socket (CLIENT LIST's flag U, as the admin)."""
    path = str(up.endpoints["unix_sockets"]["redis"])  # type: ignore[index]
    passwords = dict(line.split("=", 1) for line in (up.data_dir / "redis" / "passwords.env").read_text().split())
    with redis.Redis(unix_socket_path=path, password=passwords["default"], decode_responses=True) as admin:
        return {entry["user"] for entry in admin.client_list() if "U" in entry["flags"]} - {"default"}


@pytest.fixture
def up_process(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path / "data", tmp_path / "up.log")
    yield up
    if up.process.poll() is None:
        up.process.kill()


@pytest.mark.timeout(300)
def test_up_push_infer_restart(up_process: Up, model_file: Path, tmp_path: Path) -> None:
    up = up_process
    pushed = subprocess.run(
        [*MAAS, "models", "push", str(model_file), "--name", "affine"], env=up.env, capture_output=True, text=True
    )
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed model 'affine' version 1" in pushed.stdout
    assert "deployed 'affine' version 1" in pushed.stdout

    assert _infer_affine(up) == [[3.0, 5.0, 7.0, 9.0]]
    # the local links go over Unix sockets: every service to Redis, the worker to the gateway
    assert _socket_users(up) == {"registry", "gateway", "worker"}
    assert Path(str(up.endpoints["unix_sockets"]["gateway_replies"])).is_socket()  # type: ignore[index]
    log = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "up.log").read_text())  # the console log's colours
    assert re.search(r"direct_replies_connected .*via=unix", log)
    [refused] = triton_calls(str(up.endpoints["gateway"]), [{"op": "metadata", "model": "affine"}])
    assert refused["error"]["status"] == "StatusCode.UNAUTHENTICATED", refused
    assert (up.data_dir / "auth" / "admin.key").stat().st_mode & 0o777 == 0o600
    cli = subprocess.run(
        [*MAAS, "infer", "affine", "--input", "x=[[0, 0.5, 1, 2]]"], env=up.env, capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["outputs"]["y"]["data"] == [[1.0, 2.0, 3.0, 5.0]]

    metrics = up.endpoints["metrics"]
    assert set(metrics) == {"gateway", "worker-0", "registry"}  # type: ignore[arg-type]
    with urllib.request.urlopen(metrics["gateway"], timeout=10) as page:  # type: ignore[index]
        assert 'maas_gateway_requests_total{code="OK",model="affine",version="1"} 2.0' in page.read().decode()
    killed = up.endpoints["pids"]["worker-0"]  # type: ignore[index]
    os.kill(killed, signal.SIGKILL)  # the supervisor restarts it; calls in between wait in the queue
    assert _infer_affine(up) == [[3.0, 5.0, 7.0, 9.0]]
    pids = _current_pids(up)
    assert set(pids) == {"gateway", "worker-0", "registry", "redis"}
    assert pids["worker-0"] != killed
    assert up.stop(signal.SIGINT) == 0
    assert [name for name, pid in pids.items() if _is_alive(pid)] == []

    again = Up(up.data_dir, tmp_path / "up2.log")
    try:
        assert again.api_key == up.api_key  # made on first start, reused
        assert _infer_affine(again) == [[3.0, 5.0, 7.0, 9.0]]
        listed = subprocess.run([*MAAS, "models", "ls"], env=again.env, capture_output=True, text=True)
        assert "affine" in listed.stdout and "v1 on pool default" in listed.stdout
    finally:
        assert again.stop(signal.SIGTERM) == 0
