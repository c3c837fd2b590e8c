"""The gRPC experiments every MaaS process runs with (services/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from services import POLLER_EXPERIMENT, grpc_experiments


def test_the_event_engine_poller_is_turned_off_by_default() -> None:
    assert grpc_experiments({}) == f"-{POLLER_EXPERIMENT}"


def test_an_operators_other_experiments_are_kept() -> None:
    assert grpc_experiments({"GRPC_EXPERIMENTS": "a,-b"}) == f"a,-b,-{POLLER_EXPERIMENT}"


def test_an_operator_who_names_the_experiment_decides_it() -> None:
    assert grpc_experiments({"GRPC_EXPERIMENTS": POLLER_EXPERIMENT}) == POLLER_EXPERIMENT
    assert grpc_experiments({"GRPC_EXPERIMENTS": f"x,-{POLLER_EXPERIMENT}"}) == f"x,-{POLLER_EXPERIMENT}"


def test_importing_the_package_sets_it_before_grpc_is_imported() -> None:
    # gRPC reads GRPC_EXPERIMENTS once, at its import: the package must set it first.
    code = "import sys, os, services; print('grpc' in sys.modules, os.environ['GRPC_EXPERIMENTS'])"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", f"-{POLLER_EXPERIMENT}"]
