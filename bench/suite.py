"""The servers the benchmark starts as real processes, and what it reads back from them.

- ``Floor``: ``python -m bench.floor`` for one model (the Python floor).
- ``MaasUp``: ``maas up`` with its default log level, models pushed with ``maas models push``; the
  workers' direct gRPC ports come from their heartbeat keys in Redis, executed batch sizes from
  their Prometheus histograms.

Both are context managers: leaving them (normally, on an error or on Ctrl-C) stops the processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc
import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from services.common import keys

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
_POLL_S = 0.2
BATCH_HISTOGRAM = "maas_inference_batch_size_requests"


_Result = TypeVar("_Result")


def run_main(
    run: Callable[[], _Result],
    render: Callable[[_Result], str],
    to_json: Callable[[_Result], Any],
    json_path: Path | None,
    empty: Callable[[_Result], list[str]],
) -> int:
    """A benchmark's ``main``: run, print the table and the time, write the JSON, refuse empty rows.

    Returns:
        0; 1 when ``empty`` names measurements without one success; 2 when the run failed; 130
        on Ctrl-C.
    """
    started = time.monotonic()
    try:
        result = run()
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130
    print(render(result))
    print(f"(took {time.monotonic() - started:.0f} s)")
    if json_path is not None:
        json_path.write_text(json.dumps(to_json(result), indent=2))
    if missing := empty(result):
        print(f"no success in: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def clean_env() -> dict[str, str]:
    """This environment without ``MAAS_*`` variables, so a user's settings do not leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}


def _with_parent_death_signal(command: list[str]) -> list[str]:
    """Prefix ``command`` with ``setpriv --pdeathsig TERM`` when util-linux has it (as ``maas up`` does)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


def spawn(
    command: list[str],
    stdout: int | IO[bytes],
    stderr: int | IO[bytes],
    env: Mapping[str, str] | None = None,
    repo: Path = REPO,
) -> subprocess.Popen[bytes]:
    """Start a server process in its own session, with ``env`` on top of ``clean_env()``.

    A terminal's Ctrl-C then reaches only the benchmark, which stops its servers in order; a server
    gets SIGTERM if the benchmark dies without doing so. ``repo``: the source tree it runs from.
    """
    return subprocess.Popen(
        _with_parent_death_signal(command), cwd=repo, env=clean_env() | tree_env(repo) | dict(env or {}),
        stdout=stdout, stderr=stderr, start_new_session=True,
    )  # fmt: skip


def tree_env(repo: Path) -> dict[str, str]:
    """What makes a process import MaaS from ``repo`` (another checkout: ``bench.ab``), not this one."""
    return {} if repo == REPO else {"PYTHONPATH": f"{repo}{os.pathsep}{repo / 'protos'}"}


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_json(path: Path, process: subprocess.Popen[bytes], what: str, log: Path) -> dict[str, object]:
    """Wait for ``process`` to write the JSON file ``path``.

    Raises:
        RuntimeError: The process exited or did not write it within START_TIMEOUT_S.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S:g} s:\n{log_tail(log)}")
        time.sleep(_POLL_S)
    loaded: dict[str, object] = json.loads(path.read_text())
    return loaded


def stop_process(process: subprocess.Popen[bytes] | None, sig: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Send ``sig`` and wait; kill the process if it is still there after ``timeout_s``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"warning: pid {process.pid} did not stop within {timeout_s:g} s; killing it", file=sys.stderr)
        process.kill()
        process.wait()


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU time (user + system, every thread) each process has used so far, from ``/proc``.

    Processes that cannot be read (gone, or not Linux) are left out.
    """
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    used: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        used[name] = (int(fields[11]) + int(fields[12])) / ticks
    return used


def probe(url: str, model: str, width: int, timeout_s: float = START_TIMEOUT_S) -> None:
    """Call ModelInfer until one call succeeds (the server serves the model).

    Raises:
        RuntimeError: No call succeeded within ``timeout_s``.
    """
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.ones((1, width), np.float32).tobytes())
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(url) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                stub.ModelInfer(request, timeout=10)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} does not serve '{model}': {exc}") from None
                time.sleep(_POLL_S)


class Floor:
    """``python -m bench.floor`` serving one model file."""

    def __init__(self, model_path: Path, name: str, work_dir: Path) -> None:
        self.model_path = model_path
        self.name = name
        self.ready_file = work_dir / f"floor-{name}.json"
        self.log = work_dir / f"floor-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Floor:
        self.ready_file.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = spawn(
                [sys.executable, "-m", "bench.floor", "--model", str(self.model_path), "--name", self.name,
                 "--port", "0", "--ready-file", str(self.ready_file)],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        try:
            info = wait_json(self.ready_file, self.process, f"floor server for '{self.name}'", self.log)
        except BaseException:
            stop_process(self.process, signal.SIGTERM)
            raise
        self.url = f"127.0.0.1:{info['port']}"
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.process, signal.SIGTERM, 10.0)

    @property
    def pids(self) -> dict[str, int]:
        """The server process, for ``cpu_seconds``."""
        return {"server": self.process.pid} if self.process is not None else {}


class MaasUp:
    """``maas up`` with real processes on a fresh data dir; output goes to ``<work_dir>/maas-up.log``."""

    def __init__(
        self,
        work_dir: Path,
        workers: int,
        access_log_sample: float = 1.0,
        env: Mapping[str, str] | None = None,
        repo: Path = REPO,
    ) -> None:
        self.repo = repo
        """The source tree it runs from (this one, or another checkout: ``bench.ab``)."""
        self.data_dir = work_dir / "maas-data"
        self.env = dict(env or {})
        """``MAAS_*`` settings for its services (``maas up`` passes its environment on)."""
        self.log = work_dir / "maas-up.log"
        self.workers = workers
        self.access_log_sample = access_log_sample
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, object] = {}
        self._redis: redis.Redis | None = None

    def __enter__(self) -> MaasUp:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        with self.log.open("ab") as log:
            self.process = spawn(
                [sys.executable, "-m", "services.cli", "up", "--workers", str(self.workers), "--gateway-port", "0",
                 "--registry-port", "0", "--data-dir", str(self.data_dir),
                 "--access-log-sample", str(self.access_log_sample),
                 "--no-auth"],  # the load generators send no API key (an HMAC per key per 5 s: noise)
                stdout=log, stderr=subprocess.STDOUT, env=self.env, repo=self.repo,
            )  # fmt: skip
        self.endpoints = wait_json(self.data_dir / "run" / "endpoints.json", self.process, "maas up", self.log)
        self._redis = redis.Redis.from_url(str(self.endpoints["redis_url"]), socket_timeout=10)

    def __exit__(self, *exc: object) -> None:
        if self._redis is not None:
            self._redis.close()
        stop_process(self.process, signal.SIGINT)

    @property
    def gateway(self) -> str:
        """host:port of the gateway."""
        return str(self.endpoints["gateway"])

    def pids(self, *, direct: bool = False) -> dict[str, int]:
        """The processes on the request path, for ``cpu_seconds``.

        The workers, and unless ``direct`` the gateway and Redis (the registry is not on it).
        """
        pids = self.endpoints.get("pids", {})
        assert isinstance(pids, dict)
        wanted = ("worker",) if direct else ("gateway", "worker", "redis")
        return {str(name): int(pid) for name, pid in pids.items() if str(name).startswith(wanted)}

    def push(self, path: Path, name: str) -> None:
        """``maas models push FILE --name NAME --max-batch-size 32`` (deployment default wait).

        Raises:
            RuntimeError: The push failed.
        """
        env = clean_env() | {"MAAS_REGISTRY": str(self.endpoints["registry"]), "MAAS_GATEWAY": self.gateway}
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "models", "push", str(path), "--name", name,
             "--max-batch-size", "32"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"maas models push {name} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def check_alive(self) -> None:
        """Raise RuntimeError if ``maas up`` has exited."""
        if self.process is None or self.process.poll() is not None:
            code = self.process.returncode if self.process else None
            raise RuntimeError(f"maas up exited (code {code}):\n{log_tail(self.log)}")

    def _heartbeats(self) -> list[dict[str, object]]:
        assert self._redis is not None
        beats = []
        try:
            for key in sorted(self._redis.scan_iter(match=f"{keys.WORKER_PREFIX}*")):
                raw = self._redis.get(key)
                if raw:
                    beats.append(json.loads(raw))
        except redis.RedisError as exc:
            self.check_alive()
            raise RuntimeError(f"cannot read worker heartbeats from {self.endpoints['redis_url']}: {exc}") from None
        return beats

    def direct_url(self, name: str) -> str:
        """host:port of the direct gRPC service of the first worker (by id) that serves ``name``.

        Raises:
            RuntimeError: No worker's heartbeat lists the model within START_TIMEOUT_S.
        """
        host = self.gateway.rsplit(":", 1)[0]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for beat in self._heartbeats():
                served = [str(m).split(":", 1)[0] for m in beat.get("models", [])]
                if name in served and beat.get("port"):
                    return f"{host}:{beat['port']}"
            time.sleep(_POLL_S)
        raise RuntimeError(f"no worker heartbeat lists '{name}' with a port: {self._heartbeats()}")

    def max_wait_ms(self, name: str) -> int | None:
        """The deployment's ``max_wait_ms`` as stored by the registry (None if unreadable)."""
        assert self._redis is not None
        try:
            raw = self._redis.hget(keys.DEPLOYMENTS, name)
            return int(json.loads(raw)["max_wait_ms"]) if raw else None
        except (redis.RedisError, ValueError, KeyError, TypeError):
            return None

    def batch_totals(self, name: str) -> tuple[float, float] | None:
        """(sum, count) of the batch-size histogram for ``name`` over every worker (None if unreadable)."""
        total, count = 0.0, 0.0
        metrics = self.endpoints.get("metrics", {})
        assert isinstance(metrics, dict)
        for child, url in metrics.items():
            if not str(child).startswith("worker"):
                continue
            try:
                with urllib.request.urlopen(str(url), timeout=10) as response:
                    text = response.read().decode()
            except OSError as exc:
                print(f"warning: cannot scrape {child}'s metrics at {url}: {exc}", file=sys.stderr)
                return None
            s, c = _histogram_totals(text, BATCH_HISTOGRAM, name)
            total, count = total + s, count + c
        return total, count


def _histogram_totals(text: str, histogram: str, model: str) -> tuple[float, float]:
    total, count = 0.0, 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == f"{histogram}_sum":
                total += sample.value
            elif sample.name == f"{histogram}_count":
                count += sample.value
    return total, count
