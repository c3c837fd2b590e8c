"""What the client returns for inference calls (registry calls return services.common.metadata records)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from services.common.metadata import TensorSpec


class InferResult(dict[str, npt.NDArray[Any]]):
    """A model's outputs by name, with the name and version of the model that answered.

    BYTES outputs are object arrays of ``bytes``; the arrays are read-only views of the reply.
    """

    def __init__(self, outputs: Mapping[str, npt.NDArray[Any]], *, model_name: str, model_version: str) -> None:
        super().__init__(outputs)
        self.model_name = model_name
        self.model_version = model_version


@dataclass(frozen=True)
class ModelMetadata:
    """A model's signature as the gateway serves it (-1 marks a variable dimension)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class TextPiece:
    """One piece of a generative model's answer (``generate``): the text of a token or a few.

    The last piece has ``is_final`` and says why the generation ended.
    """

    text: str
    is_final: bool = False
    finish_reason: str = ""
    """On the final piece: ``length`` (max_new_tokens or the context reached), ``stop`` (the model's
    end of sequence) or ``cancelled``."""
    model_version: str = ""
    """The version that generated it."""
