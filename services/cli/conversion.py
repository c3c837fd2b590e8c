"""``maas models convert FILE``: a scikit-learn estimator file to ONNX on this machine, checked, then pushed.

The conversion itself is ``services.client.conversion``; this module reads the options and prints
the checks. Nothing is pushed when a check fails.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.client import MaasClient, conversion

ClientFactory = Callable[[], AbstractContextManager[MaasClient]]


def _checks_table(converted: conversion.Conversion) -> Table:
    table = Table("output", "compared with", "max |diff|", "values over tolerance", "result")
    for check in converted.checks:
        table.add_row(
            check.name, f"{check.reference}()", f"{check.max_abs_diff:.3g}", str(check.differing),
            "ok" if check.is_ok else "MISMATCH",
        )  # fmt: skip
    return table


def convert_command(
    client: ClientFactory,
    out: Console,
    err: Console,
    file: Path,
    name: str,
    *,
    sample: Path | None,
    n_features: int | None,
    trust: list[str],
    trust_all: bool,
    allow_pickle: bool,
    tolerance: float,
    deploy: bool,
) -> None:
    """Run ``maas models convert`` (typer parses the options in ``register``)."""
    with client() as maas:
        estimator = conversion.load_estimator(file, trusted=trust, trust_all=trust_all, allow_pickle=allow_pickle)
        rows = None if sample is None else conversion.load_sample(sample)
        if rows is None:
            err.print(
                f"warning: no --sample: checking on {conversion.RANDOM_ROWS} random rows; rows like the real "
                "inputs check the conversion better",
                highlight=False,
            )
        version, converted = maas.convert_and_push(
            name, estimator, sample=rows, n_features=n_features, tolerance=tolerance,
            description=f"converted from {file.name} ({type(estimator).__name__}) with skl2onnx",
        )  # fmt: skip
        out.print(_checks_table(converted))
        labels = f", {len(version.class_labels)} class labels" if version.class_labels else ""
        out.print(
            f"pushed model '{name}' version {version.version} ({converted.estimator_type}, "
            f"checked on {converted.rows_checked} rows{labels})"
        )
        if deploy:
            dep = maas.deploy(name, version.version, keep_settings=True)
            out.print(f"deployed '{name}' version {dep.version} on pool {dep.pool}")


def register(models_app: typer.Typer, client: ClientFactory, out: Console, err: Console) -> None:
    """Add ``maas models convert`` to ``models_app``; ``client`` yields the CLI's configured client."""

    @models_app.command("convert")
    def models_convert(
        file: Annotated[
            Path, typer.Argument(exists=True, dir_okay=False, help="A fitted estimator: .skops, .joblib or .pkl.")
        ],
        name: Annotated[str, typer.Option("--name", "-n", help="Model name.")],
        sample: Annotated[
            Path | None,
            typer.Option(help="Rows to type the input and check the outputs on: .npy, .npz (array X) or .csv."),
        ] = None,
        n_features: Annotated[
            int | None, typer.Option(min=1, help="Input width, when there is no --sample and the estimator lacks it.")
        ] = None,
        trust: Annotated[
            list[str] | None, typer.Option(help="A type of the .skops file you trust (repeat; the error lists them).")
        ] = None,
        trust_all: Annotated[bool, typer.Option("--trust-all", help="Trust every type of the .skops file.")] = False,
        allow_pickle: Annotated[
            bool, typer.Option("--allow-pickle", help="Load a .joblib/.pkl: unpickling runs the file's code here.")
        ] = False,
        tolerance: Annotated[
            float, typer.Option(min=0.0, help="Allowed |onnx - estimator|: tol + tol x |value| (labels: equal).")
        ] = conversion.DEFAULT_TOLERANCE,
        deploy: Annotated[bool, typer.Option("--deploy", help="Deploy the new version.")] = False,
    ) -> None:
        """Convert a scikit-learn estimator to ONNX here (skl2onnx), check it against the estimator, push it.

        Needs `pip install 'maas[convert]'`. Nothing is pushed when an output differs over the
        tolerance. A classifier's classes become the version's class labels.
        """
        convert_command(
            client, out, err, file, name, sample=sample, n_features=n_features, trust=trust or [],
            trust_all=trust_all, allow_pickle=allow_pickle, tolerance=tolerance, deploy=deploy,
        )  # fmt: skip
