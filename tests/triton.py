"""Run tritonclient calls in a child process (see triton_probe.py for why)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PROBE = Path(__file__).with_name("triton_probe.py")


def triton_calls(
    url: str, calls: list[dict[str, Any]], timeout_s: float = 90, *, api_key: str | None = None
) -> list[dict[str, Any]]:
    """Run ``calls`` with an unmodified tritonclient against ``url`` and return its results.

    With ``api_key``, every call sends it as ``headers={"authorization": "Bearer <key>"}``.

    Each result is ``{"ok": value}`` or ``{"error": {"status": "StatusCode.X", "message": ...}}``.
    """
    done = subprocess.run(
        [sys.executable, str(PROBE), url, *(["--api-key", api_key] if api_key else [])],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, f"triton probe failed: {done.stderr[-3000:]}"
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results
