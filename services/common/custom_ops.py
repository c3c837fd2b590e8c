"""Custom-operator libraries a version may declare, and their registration in ONNX Runtime.

A model may use operators outside ONNX's own domains only when ONNX Runtime is given the native
library that implements them. MaaS loads exactly one such library, ``onnxruntime-extensions``
(tokenizers, string and audio operators), and only for versions that declare it at upload:
uploads never bring native code, and a version that declares nothing gets a plain session.

A model whose nodes use the extensions' domains without the declaration is refused at upload
(``undeclared_extension_op``) rather than flagged silently: what a worker loads is then always
what the version's record says.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from services.common.errors import InvalidArgument
from services.common.metadata import shown

if TYPE_CHECKING:
    import onnxruntime as ort

EXTENSIONS = "onnxruntime-extensions"
"""The one custom-operator library a version may declare (the ``onnxruntime-extensions`` package)."""
SUPPORTED = (EXTENSIONS,)
EXTENSION_DOMAINS = ("ai.onnx.contrib", "com.microsoft.extensions")
"""Operator domains that ``onnxruntime-extensions`` implements."""


def check_custom_ops(names: Iterable[str]) -> tuple[str, ...]:
    """Return the declared libraries without duplicates, in a stable order.

    Raises:
        InvalidArgument: A name is not a supported library (the message names it and the one allowed).
    """
    declared = []
    for name in names:
        if name not in SUPPORTED:
            raise InvalidArgument(
                f"custom_ops: '{shown(name)}' is not supported; the only custom-operator library is "
                f"'{EXTENSIONS}' (no other native code is loaded for uploaded models)"
            )
        if name not in declared:
            declared.append(name)
    return tuple(declared)


def undeclared_extension_op(nodes: Iterable[tuple[str, str, str]], custom_ops: Sequence[str]) -> str | None:
    """Return why a model cannot load without a declaration it lacks, or None if it needs none.

    Args:
        nodes: ``(node name, op type, domain)`` of every node of the model (subgraphs and functions included).
        custom_ops: The libraries the version declares.
    """
    if EXTENSIONS in custom_ops:
        return None
    for node, op_type, domain in nodes:
        if domain in EXTENSION_DOMAINS:
            return (
                f"node '{shown(node)}' uses operator '{shown(op_type)}' of domain '{domain}', which only "
                f"{EXTENSIONS} provides: declare it with custom_ops=['{EXTENSIONS}'] "
                f"(maas models push --custom-ops {EXTENSIONS})"
            )
    return None


def register_custom_ops(options: ort.SessionOptions, custom_ops: Sequence[str]) -> None:
    """Register the native library of each declared custom-operator library in ``options``.

    Args:
        options: The session options of the model's session.
        custom_ops: Libraries checked by ``check_custom_ops`` (the version's record).

    Raises:
        InvalidArgument: A name is not a supported library (a record older than this check).
    """
    for name in check_custom_ops(custom_ops):
        if name == EXTENSIONS:
            # NOTE: imported only here: a process that never serves such a model never maps the library.
            import onnxruntime_extensions

            options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
