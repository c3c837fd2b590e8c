"""`maas models convert` and `convert_and_push`: scikit-learn estimators to ONNX on the client, checked, pushed, served.

The estimators are trained here on a fixed seed and saved with skops or joblib; the CLI runs in a
child process (run_cli), the Python API in this one. Served outputs are compared with the
estimator's own predictions through the gateway.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import skops.io as sio
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from services.client import AsyncMaasClient, FailedPrecondition, NotFound, conversion
from tests.integration.suite import Suite, run_cli

pytestmark = pytest.mark.integration

ROWS = np.random.default_rng(7).standard_normal((120, 4)).astype(np.float32)
TREE_TYPE = "sklearn.tree._tree.Tree"
"""The type a skops file of a random forest holds that skops does not trust by default."""


def _classifier() -> Pipeline:
    """A scaler + logistic regression pipeline with text classes (the ONNX label output is BYTES)."""
    classes = np.where(ROWS[:, 0] + 0.5 * ROWS[:, 1] > 0, "pos", "neg")
    return make_pipeline(StandardScaler(), LogisticRegression(random_state=0)).fit(ROWS, classes)


def _regressor() -> RandomForestRegressor:
    target = 3 * ROWS[:, 0] - ROWS[:, 2] ** 2
    return RandomForestRegressor(n_estimators=8, max_depth=4, random_state=0).fit(ROWS, target)


async def _served(suite: Suite, name: str, rows: np.ndarray) -> dict[str, Any]:
    assert suite.worker is not None
    await suite.worker.reconcile()
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        return dict(await client.infer(name, {conversion.INPUT_NAME: rows}))


def _flat(text: str) -> str:
    """The CLI's message with rich's line wrapping undone."""
    return " ".join(text.split())


async def _has_model(suite: Suite, name: str) -> bool:
    try:
        await suite.registry.get_model(name)
    except NotFound:
        return False
    return True


async def test_cli_converts_a_skops_pipeline_that_serves_the_estimators_outputs(suite: Suite, tmp_path: Path) -> None:
    estimator = _classifier()
    sio.dump(estimator, tmp_path / "clf.skops")
    np.save(tmp_path / "rows.npy", ROWS[:40])
    code, stdout, stderr = await run_cli(
        suite, "models", "convert", str(tmp_path / "clf.skops"), "--name", "clf",
        "--sample", str(tmp_path / "rows.npy"), "--deploy",
    )  # fmt: skip
    assert code == 0, stderr
    assert "pushed model 'clf' version 1" in stdout and "2 class labels" in stdout
    assert "probabilities" in stdout and "predict_proba()" in stdout
    assert (await suite.registry.get_version("clf", 1)).class_labels == ("neg", "pos")

    outputs = await _served(suite, "clf", ROWS[:8])
    assert [label.decode() for label in outputs["label"]] == estimator.predict(ROWS[:8]).tolist()
    np.testing.assert_allclose(outputs["probabilities"], estimator.predict_proba(ROWS[:8]), atol=1e-5)


async def test_untrusted_skops_types_are_refused_until_trusted(suite: Suite, tmp_path: Path) -> None:
    estimator = _regressor()
    sio.dump(estimator, tmp_path / "forest.skops")
    code, _, stderr = await run_cli(suite, "models", "convert", str(tmp_path / "forest.skops"), "--name", "forest")
    assert code == 1
    assert "FAILED_PRECONDITION" in stderr and TREE_TYPE in _flat(stderr) and "--trust" in stderr
    assert not await _has_model(suite, "forest")

    loaded = conversion.load_estimator(tmp_path / "forest.skops", trusted=[TREE_TYPE])
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        version, converted = await client.convert_and_push("forest", loaded)  # random rows: n_features_in_
        await client.deploy("forest", version.version)
    assert converted.is_random_sample and converted.rows_checked == conversion.RANDOM_ROWS
    assert version.class_labels == ()
    outputs = await _served(suite, "forest", ROWS[8:16])
    np.testing.assert_allclose(outputs["variable"].ravel(), estimator.predict(ROWS[8:16]), rtol=1e-5, atol=1e-5)


async def test_a_pickle_is_loaded_only_with_allow_pickle(suite: Suite, tmp_path: Path) -> None:
    estimator = _regressor()
    joblib.dump(estimator, tmp_path / "forest.joblib")
    with pytest.raises(FailedPrecondition, match="--allow-pickle"):
        conversion.load_estimator(tmp_path / "forest.joblib")

    code, stdout, stderr = await run_cli(
        suite, "models", "convert", str(tmp_path / "forest.joblib"), "--name", "pickled", "--allow-pickle",
        "--n-features", "4", "--deploy",
    )  # fmt: skip
    assert code == 0, stderr
    assert "pushed model 'pickled' version 1" in stdout
    outputs = await _served(suite, "pickled", ROWS[:8])
    np.testing.assert_allclose(outputs["variable"].ravel(), estimator.predict(ROWS[:8]), rtol=1e-5, atol=1e-5)


async def test_python_api_converts_an_estimator_object(suite: Suite) -> None:
    estimator = _classifier()
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        version, converted = await client.convert_and_push("notebook", estimator, sample=ROWS[:50])
        assert version.version == 1 and version.class_labels == ("neg", "pos")
        assert converted.rows_checked == 50 and not converted.is_random_sample
        assert [check.name for check in converted.checks] == ["label", "probabilities"]
        assert all(check.is_ok for check in converted.checks)
        await client.deploy("notebook")

        # float32 ONNX against the float64 estimator: a tolerance of 0 cannot hold, and nothing is pushed.
        with pytest.raises(FailedPrecondition, match="output 'probabilities' differs from predict_proba") as refused:
            await client.convert_and_push("notebook", estimator, sample=ROWS, tolerance=0.0)
        assert "Nothing was pushed" in refused.value.message
        assert [v.version for v in await client.list_versions("notebook")] == [1]
        with pytest.raises(FailedPrecondition):
            await client.convert_and_push("strict", estimator, sample=ROWS, tolerance=0.0)
        assert not await _has_model(suite, "strict")
    outputs = await _served(suite, "notebook", ROWS[60:68])
    assert [label.decode() for label in outputs["label"]] == estimator.predict(ROWS[60:68]).tolist()


def test_a_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skl2onnx", None)  # what an environment without the extra imports
    with pytest.raises(FailedPrecondition, match=r"pip install 'maas\[convert\]'"):
        conversion.convert_estimator(_regressor(), ROWS[:5])
