"""`maas tune`: a short closed-loop load at each setting through the gateway, a table, a recommendation.

The CLI runs in a child process (run_cli) against the suite's gateway, registry and worker; the
worker applies each deployment the CLI makes through the registry's events.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest

from services.cli.examples import affine_model
from services.client.tuning import TuneResult, TuneSetting, recommend
from tests.integration.suite import Suite, run_cli

pytestmark = pytest.mark.integration

ORIGINAL = {"max_batch_size": 4, "max_wait_ms": 1}
TUNE = ("tune", "affine", "--max-batch-size", "1,8", "--seconds", "1", "--concurrency", "4", "--warmup", "0.2")


async def _deployment(suite: Suite) -> tuple[int, int, str]:
    dep = (await suite.registry.get_model("affine")).deployment
    assert dep is not None
    return dep.max_batch_size, dep.max_wait_ms, dep.pool


async def test_tune_measures_each_setting_recommends_within_budget_and_restores(suite: Suite) -> None:
    await suite.push("affine", affine_model(), **ORIGINAL)
    code, stdout, stderr = await run_cli(suite, *TUNE, "--p99-ms", "60000", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    rows = report["results"]
    assert [(r["max_batch_size"], r["max_wait_ms"], r["pool"]) for r in rows] == [(1, 1, "default"), (8, 1, "default")]
    assert all(r["rps"] > 0 and r["calls"] > 0 and r["errors"] == 0 and r["workers"] == 1 for r in rows)
    best = report["recommended"]
    assert best is not None and best["p99_ms"] <= 60000
    assert best["rps"] == max(r["rps"] for r in rows)
    assert report["pool_workers"] == {"default": 1}
    assert report["applied"] is False
    assert await _deployment(suite) == (4, 1, "default")  # the original deployment is back


async def test_tune_says_when_no_setting_fits_the_budget(suite: Suite) -> None:
    await suite.push("affine", affine_model(), **ORIGINAL)
    code, stdout, stderr = await run_cli(suite, *TUNE, "--p99-ms", "0.001")
    assert code == 0, stderr
    text = " ".join(stdout.split())
    assert "no setting had p99 <= 0.001 ms" in text and "restored the original deployment" in text
    assert text.count(" default ") >= 2  # a table row per setting
    assert await _deployment(suite) == (4, 1, "default")


async def test_tune_apply_deploys_the_recommendation(suite: Suite) -> None:
    await suite.push("affine", affine_model(), **ORIGINAL)
    code, stdout, stderr = await run_cli(suite, *TUNE, "--p99-ms", "60000", "--apply", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["applied"] is True
    best = report["recommended"]
    assert await _deployment(suite) == (best["max_batch_size"], best["max_wait_ms"], "default")


async def test_ctrl_c_stops_the_tuning_and_puts_the_original_deployment_back(suite: Suite) -> None:
    await suite.push("affine", affine_model(), **ORIGINAL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    env |= {"MAAS_GATEWAY": suite.gateway_address, "MAAS_REGISTRY": suite.registry_address}
    env["MAAS_API_KEY_FILE"] = str(suite.data_dir / "no-such.key")  # as run_cli: no key
    args = ("tune", "affine", "--max-batch-size", "2,8", "--seconds", "60", "--p99-ms", "60000")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        while await _deployment(suite) != (2, 1, "default"):  # the first setting is being measured
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = await process.communicate()
    assert process.returncode == 130, stderr.decode()
    assert "stopped" in stderr.decode() and "restored the original deployment" in " ".join(stdout.decode().split())
    assert await _deployment(suite) == (4, 1, "default")


def test_recommend_takes_the_fastest_setting_within_budget_without_errors() -> None:
    def result(batch: int, calls: int, p99_ms: float, errors: int = 0) -> TuneResult:
        return TuneResult(TuneSetting(batch, 0, "default"), calls=calls, errors=errors, seconds=1.0, p99_ms=p99_ms)

    fast_but_slow_tail, fitting, faster_with_errors = result(32, 900, 80.0), result(8, 500, 20.0), result(4, 800, 5, 1)
    assert recommend([fast_but_slow_tail, fitting, faster_with_errors], 50.0) == fitting
    assert recommend([fast_but_slow_tail], 50.0) is None
