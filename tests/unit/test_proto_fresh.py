"""The generated protobuf modules are exactly what `make proto` produces from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"


def _generate(out: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out}",
         f"--grpc_python_out={out}", f"--pyi_out={out}", *sources],
        check=True, capture_output=True,
    )  # fmt: skip


def _generated(root: Path) -> dict[str, bytes]:
    patterns = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
    return {str(p.relative_to(root)): p.read_bytes() for pattern in patterns for p in root.rglob(pattern)}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    _generate(tmp_path)
    expected = _generated(tmp_path)
    actual = _generated(PROTOS)
    assert expected, "protoc generated nothing"
    stale = sorted(name for name in expected if actual.get(name) != expected[name])
    extra = sorted(set(actual) - set(expected))
    assert not stale and not extra, f"run `make proto`: stale {stale}, without a .proto {extra}"
