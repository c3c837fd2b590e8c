"""Domain records of the registry (models, versions, deployments), shared by every service.

They are stored in Redis as JSON by the registry and travel as ``maas.registry.v1`` messages;
conversion to and from protobuf lives in the registry's convert.py and in registry_client.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from services.common.errors import InvalidArgument
from services.common.optimization import Lineage, OptimizationReport

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Valid model names: 1-64 of letters, digits, '.', '_', '-', starting with a letter or digit.

Match the whole name with ``fullmatch``: a ``$`` anchor would let a trailing newline in."""
NAME_RULE = "expected 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
"""What ``MODEL_NAME_RE`` allows, in words: every name (model, pool, tenant, key) follows it."""
_SHOWN_CHARS = 80


def shown(value: str) -> str:
    """Return ``value`` cut short and with control characters escaped, to echo it in a message."""
    cut = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)


def check_name(name: str, what: str = "model name") -> None:
    """Refuse a name (of a model, pool, tenant or key) that does not follow ``NAME_RULE``.

    Raises:
        InvalidArgument: It does not, naming ``what`` and the rule.
    """
    if not MODEL_NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{what} '{shown(name)}' is invalid: {NAME_RULE}")


PLATFORM = "onnxruntime_onnx"

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_WAIT_MS = 0
DEFAULT_POOL = "default"
DEFAULT_MAX_QUEUE_LENGTH = 1000
DEFAULT_ALIAS = "default"
"""The alias that serves calls naming no version, when a model has it (``services.registry.rollout``)."""

MAX_CLASS_LABELS = 100_000
"""Most class labels a version may carry."""
MAX_CLASS_LABEL_BYTES = 1024 * 1024
"""Most UTF-8 bytes the class labels of a version may hold in all."""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a model's signature; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def is_batchable(self) -> bool:
        """Whether the first dimension is variable (requests can be stacked along it)."""
        return len(self.shape) > 0 and self.shape[0] == -1


SINGLE_FILE_ENTRY = "model.onnx"
"""The one file a single-file (non-bundle) version presents as a bundle."""


@dataclass(frozen=True)
class BundleFile:
    """One file of a version: its relative path in the bundle, size and sha256."""

    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class VersionRecord:
    """One immutable uploaded artifact of a model."""

    model: str
    version: int
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created_at_ms: int
    platform: str = PLATFORM
    class_labels: tuple[str, ...] = ()
    """Labels of the classification extension: ``class_labels[i]`` names class index i."""
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Free key/value labels (``services.registry.labels`` has their rules)."""
    pushed_by: str = ""
    """The API key that uploaded it (``tenant/key name``), or ``anonymous`` (auth off)."""
    files: tuple[BundleFile, ...] = ()
    """A bundle's files (``services.common.bundles``); empty: one .onnx file (``bundle_files``)."""
    entry_point: str = ""
    """The bundle's .onnx file that ONNX Runtime loads; empty for a single-file version."""
    custom_ops: tuple[str, ...] = ()
    """Custom-operator libraries its sessions register (``services.common.custom_ops``)."""
    lineage: Lineage | None = None
    """Where a version derived by OptimizeVersion came from (``services.common.optimization``)."""
    report: OptimizationReport | None = None
    """Accuracy and speed of a derived version against its source, measured when it was derived."""

    @property
    def is_bundle(self) -> bool:
        """Whether the version is a bundle (stored as a directory of files and a manifest)."""
        return bool(self.files)

    @property
    def bundle_files(self) -> tuple[BundleFile, ...]:
        """The version's files; a single-file version is one file, ``model.onnx``."""
        return self.files or (BundleFile(SINGLE_FILE_ENTRY, self.size_bytes, self.sha256),)

    @property
    def entry_file(self) -> str:
        """Path of the .onnx file to load, inside the version's directory."""
        return self.entry_point or SINGLE_FILE_ENTRY

    @property
    def is_batchable(self) -> bool:
        """Whether every input and output has a variable first dimension."""
        return all(t.is_batchable for t in (*self.inputs, *self.outputs))

    def to_json(self) -> str:
        """Serialize for storage."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> VersionRecord:
        """Deserialize what ``to_json`` wrote."""
        data: dict[str, Any] = json.loads(raw)
        data["inputs"] = tuple(_spec(t) for t in data["inputs"])
        data["outputs"] = tuple(_spec(t) for t in data["outputs"])
        data["class_labels"] = tuple(data.get("class_labels", ()))
        data["labels"] = dict(data.get("labels", {}))
        data["files"] = tuple(BundleFile(**f) for f in data.get("files", ()))
        data["custom_ops"] = tuple(data.get("custom_ops", ()))
        data["lineage"] = Lineage.from_dict(data["lineage"]) if data.get("lineage") else None
        data["report"] = OptimizationReport.from_dict(data["report"]) if data.get("report") else None
        return cls(**data)


def parse_class_labels(text: str) -> tuple[str, ...]:
    """Split a labels file into class labels: line i (from 0) is the label of class index i.

    Lines end with a line feed (a carriage return before it is dropped); a final line feed adds
    no label, and an empty line is a class without a label.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return tuple(line.removesuffix("\r") for line in lines)


def _spec(data: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=data["name"], datatype=data["datatype"], shape=tuple(data["shape"]))


Split = tuple[tuple[int, int], ...]
"""A traffic split: (version, weight) pairs by version; the weights sum to 100."""


@dataclass(frozen=True)
class DeploymentRecord:
    """The desired serving state of one model: which versions, how to batch, which pool."""

    model: str
    version: int
    """The version with the largest weight (the only one, unless ``traffic`` splits calls)."""
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_ms: int = DEFAULT_MAX_WAIT_MS
    pool: str = DEFAULT_POOL
    max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH
    updated_at_ms: int = 0
    traffic: Split = ()
    """Versions served and their weights; empty in records older than splits: ``version`` alone."""
    previous_traffic: Split = ()
    """The split before the last change, what a rollback restores (empty: none)."""
    aliased_versions: tuple[int, ...] = ()
    """Versions aliases point to: filled in when read, never stored (``services.registry.rollout``)."""

    @property
    def split(self) -> Split:
        """The traffic split: ``traffic``, or all of it on ``version``."""
        return self.traffic or ((self.version, 100),)

    @property
    def served_versions(self) -> tuple[int, ...]:
        """Versions workers load: every version with weight, and every aliased one, ascending."""
        return tuple(sorted({version for version, _ in self.split} | set(self.aliased_versions)))

    def to_json(self) -> str:
        """Serialize for storage (without ``aliased_versions``, which is read from the aliases)."""
        data = asdict(self)
        del data["aliased_versions"]
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: str | bytes) -> DeploymentRecord:
        """Deserialize what ``to_json`` wrote."""
        data: dict[str, Any] = json.loads(raw)
        for name in ("traffic", "previous_traffic"):
            data[name] = tuple((int(version), int(weight)) for version, weight in data.get(name) or ())
        return cls(**data)


@dataclass(frozen=True)
class ModelRecord:
    """A named series of versions, with its current deployment if any."""

    name: str
    description: str = ""
    latest_version: int = 0
    created_at_ms: int = 0
    deployment: DeploymentRecord | None = field(default=None)
    aliases: tuple[tuple[str, int], ...] = ()
    """(alias, version) pairs by alias name (``services.registry.rollout``)."""
    owner: str = ""
    """The tenant that owns it; empty: nobody, every tenant sees it (``auth.check_owner``)."""
    shared_with: tuple[str, ...] = ()
    """Tenants that may read and infer it besides the owner, by name."""

    def alias_version(self, alias: str) -> int | None:
        """Return the version ``alias`` points to (None: no such alias)."""
        return dict(self.aliases).get(alias)
