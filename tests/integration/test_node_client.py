"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader on protos/) calls a real gateway.

Needs ``node`` on PATH (CI installs it); without it the tests fail, unless MAAS_SKIP_NODE=1 says
to skip them. ``npm ci`` installs tests/node/node_modules when it is missing (``make test`` does
it first).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
CLIENT = NODE_DIR / "client.js"


@pytest.fixture(scope="module")
def node() -> str:
    """The ``node`` binary, with the client's packages installed."""
    binary = shutil.which("node")
    if binary is None:
        if os.environ.get("MAAS_SKIP_NODE") == "1":
            pytest.skip("node is not on PATH and MAAS_SKIP_NODE=1")
        pytest.fail("node is not on PATH: install Node.js >= 18 (CI does), or set MAAS_SKIP_NODE=1 to skip")
    if not (NODE_DIR / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(f"npm is not on PATH: it is needed to install {NODE_DIR}/node_modules (npm ci)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    return binary


async def _run_client(node: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        node, str(CLIENT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_node_client_calls_model_infer(suite: Suite, node: str) -> None:
    version = await suite.push("affine", affine_model(), max_batch_size=8)
    rows = [[1.0, 2.0, 3.0, 4.0], [-0.5, 0.0, 0.25, 100.0]]
    code, out, err = await _run_client(node, suite.gateway_address, "affine", json.dumps(rows))
    assert code == 0, err
    result = json.loads(out)
    assert result["live"] is True
    assert result["metadata"] == {
        "name": "affine",
        "versions": [str(version)],
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert (result["model_name"], result["model_version"]) == ("affine", str(version))
    assert result["outputs"] == {
        "y": {"datatype": "FP32", "shape": [2, 4], "data": [2 * x + 1 for row in rows for x in row]}
    }


async def test_node_client_sees_the_gateway_status(suite: Suite, node: str) -> None:
    code, out, err = await _run_client(node, suite.gateway_address, "absent", "[[1, 2, 3, 4]]")
    assert (code, out) == (1, "")
    assert err.strip() == "NOT_FOUND: model 'absent' not found"
