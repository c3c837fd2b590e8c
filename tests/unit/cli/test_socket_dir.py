"""Where ``maas up`` puts its Unix sockets (services/cli/supervisor.py)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from services.cli.supervisor import _socket_dir


def test_sockets_go_in_the_run_dir_when_their_paths_fit(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert _socket_dir(run_dir) == (run_dir.resolve(), False)


def test_a_run_dir_too_deep_for_a_socket_path_gets_a_private_temporary_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / ("d" * 120) / "run"  # a socket path holds 107 bytes at most
    where, is_temporary = _socket_dir(run_dir)
    try:
        assert is_temporary and where != run_dir
        assert len(os.fsencode(where / "gateway-replies.sock")) <= 100
        assert stat.S_IMODE(where.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(where)
