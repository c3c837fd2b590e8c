"""`python -m bench.throughput --short` and `python -m bench.generation --short` run end to end, cleanly.

Timings depend on the machine, so nothing here asserts on throughput or latency.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_short(module: str, out: Path, *, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``python -m <module> --short --json <out>`` without the caller's MAAS_* settings; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--short", "--json", str(out)],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAAS_")},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    return done


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_short_benchmark_measures_every_system_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    _run_short("bench.throughput", out, timeout_s=230)
    rows = json.loads(out.read_text())["rows"]
    assert {row["system"] for row in rows} == {"floor", "direct", "maas"}
    assert {row["model"] for row in rows} == {"tiny", "heavy"}
    for row in rows:
        assert row["requests"] > 0, row
        assert row["errors"] == 0, row
    for row in (r for r in rows if r["system"] == "maas"):
        assert row["mean_batch"] is not None, row
        assert row["mean_batch"] >= 1, row
    # The CPU per call of each server process on the request path (no value is asserted).
    processes = {"floor": {"server"}, "direct": {"worker-0"}, "maas": {"gateway", "worker-0", "redis"}}
    for row in rows:
        assert set(row["cpu_us"]) == processes[row["system"]], row
        assert all(us > 0 for us in row["cpu_us"].values()), row


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_short_generation_benchmark_has_a_row_per_system_and_level(tmp_path: Path) -> None:
    out = tmp_path / "generation.json"
    done = _run_short("bench.generation", out, timeout_s=110)
    rows = json.loads(out.read_text())["rows"]
    assert sorted((row["system"], row["streams"]) for row in rows) == [
        ("direct", 1), ("direct", 4), ("maas", 1), ("maas", 4)
    ]  # fmt: skip
    for row in rows:
        assert (row["errors"], row["generations"]) == (0, row["streams"]), row  # --short: 1 generation per stream
        assert row["ttft_p50_ms"] is not None and row["ttft_p99_ms"] >= row["ttft_p50_ms"], row
        assert row["total_tokens_per_s"] > 0 and row["stream_tokens_per_s"] > 0, row
        assert (row["x_direct_total"] is None) == (row["system"] == "direct"), row
    header = done.stdout.splitlines()[1].split()
    assert header[:3] == ["streams", "system", "gens"] and "x direct tok/s" in done.stdout.splitlines()[1]
