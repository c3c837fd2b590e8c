"""Wire-compatibility test of our inference protos against tritonclient's.

tritonclient ships generated descriptors for the KServe v2 / Triton gRPC
protocol. They define the same ``inference.*`` symbols as our protos, so both
cannot be registered in one descriptor pool. The reference descriptors are
therefore serialized in a subprocess and only parsed (never registered) here,
then compared with ours message by message, enum by enum and method by method.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pb2 import (
    DescriptorProto,
    EnumDescriptorProto,
    FieldDescriptorProto,
    FileDescriptorProto,
    MethodDescriptorProto,
)

from inference import grpc_service_pb2, model_config_pb2

_REFERENCE_SCRIPT = """
import base64, json, sys
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

encoded = []
for module in (model_config_pb2, service_pb2):
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    encoded.append(base64.b64encode(proto.SerializeToString()).decode("ascii"))
json.dump(encoded, sys.stdout)
"""


class _Field(NamedTuple):
    """Everything about a field that affects the wire format or the API."""

    number: int
    type: str
    label: str
    type_name: str
    oneof: str | None
    proto3_optional: bool


class _Method(NamedTuple):
    """Everything about an RPC that affects how a client calls it."""

    input_type: str
    output_type: str
    client_streaming: bool
    server_streaming: bool


@dataclass
class _Schema:
    """Descriptors of a set of proto files, keyed by fully qualified name."""

    messages: dict[str, dict[str, _Field]] = field(default_factory=dict)
    map_entries: set[str] = field(default_factory=set)
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    methods: dict[str, _Method] = field(default_factory=dict)


def _parse_file(encoded: str) -> FileDescriptorProto:
    """Decodes one base64-encoded serialized FileDescriptorProto.

    Args:
        encoded: Base64 text of a serialized FileDescriptorProto.

    Returns:
        The parsed descriptor, not registered in any pool.
    """
    proto = descriptor_pb2.FileDescriptorProto()
    proto.ParseFromString(base64.b64decode(encoded))
    return proto


def _load_reference_files() -> list[FileDescriptorProto]:
    """Serializes tritonclient's descriptors in a subprocess and parses them.

    Returns:
        tritonclient's model_config and service file descriptors.
    """
    result = subprocess.run(
        [sys.executable, "-c", _REFERENCE_SCRIPT],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"could not load tritonclient reference descriptors:\n{result.stderr}"
    return [_parse_file(encoded) for encoded in json.loads(result.stdout)]


def _load_our_files() -> list[FileDescriptorProto]:
    """Copies our generated module descriptors into FileDescriptorProtos.

    Returns:
        Our model_config and grpc_service file descriptors.
    """
    files = []
    for module in (model_config_pb2, grpc_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


def _strip_package(type_name: str, package: str) -> str:
    """Removes the leading dot and package from a fully qualified type name.

    Args:
        type_name: A type name such as ``.inference.ModelConfig`` (or empty).
        package: The proto package of the file the name appears in.

    Returns:
        The name relative to the package, e.g. ``ModelConfig``.
    """
    return type_name.lstrip(".").removeprefix(f"{package}.")


def _walk_messages(prefix: str, messages: Iterable[DescriptorProto]) -> Iterator[tuple[str, DescriptorProto]]:
    """Yields messages and, recursively, their nested messages.

    Args:
        prefix: Fully qualified name of the enclosing package or message.
        messages: The messages declared directly in that scope.

    Yields:
        Pairs of fully qualified message name and message descriptor.
    """
    for message in messages:
        full_name = f"{prefix}.{message.name}"
        yield full_name, message
        yield from _walk_messages(full_name, message.nested_type)


def _field_signature(proto: FieldDescriptorProto, message: DescriptorProto, package: str) -> _Field:
    """Builds the comparable signature of one field.

    Args:
        proto: The field descriptor.
        message: The message declaring the field (for its oneof names).
        package: The proto package of the declaring file.

    Returns:
        The field's signature.
    """
    oneof = None
    if proto.HasField("oneof_index"):
        oneof = message.oneof_decl[proto.oneof_index].name
    return _Field(
        number=proto.number,
        type=FieldDescriptorProto.Type.Name(proto.type),
        label=FieldDescriptorProto.Label.Name(proto.label),
        type_name=_strip_package(proto.type_name, package),
        oneof=oneof,
        proto3_optional=proto.proto3_optional,
    )


def _method_signature(proto: MethodDescriptorProto, package: str) -> _Method:
    """Builds the comparable signature of one RPC.

    Args:
        proto: The method descriptor.
        package: The proto package of the declaring file.

    Returns:
        The method's signature.
    """
    return _Method(
        input_type=_strip_package(proto.input_type, package),
        output_type=_strip_package(proto.output_type, package),
        client_streaming=proto.client_streaming,
        server_streaming=proto.server_streaming,
    )


def _enum_values(proto: EnumDescriptorProto) -> dict[str, int]:
    """Maps each value name of an enum to its number.

    Args:
        proto: The enum descriptor.

    Returns:
        Value names mapped to numbers.
    """
    return {value.name: value.number for value in proto.value}


def _add_message(schema: _Schema, full_name: str, message: DescriptorProto, package: str) -> None:
    """Records one message, its map-entry flag and its nested enums.

    Args:
        schema: The schema to extend.
        full_name: Fully qualified name of the message.
        message: The message descriptor.
        package: The proto package of the declaring file.
    """
    schema.messages[full_name] = {proto.name: _field_signature(proto, message, package) for proto in message.field}
    if message.options.map_entry:
        schema.map_entries.add(full_name)
    for enum in message.enum_type:
        schema.enums[f"{full_name}.{enum.name}"] = _enum_values(enum)


def _add_file(schema: _Schema, file: FileDescriptorProto) -> None:
    """Records every message, enum and RPC declared in one file.

    Args:
        schema: The schema to extend.
        file: The file descriptor.
    """
    package = file.package
    for full_name, message in _walk_messages(package, file.message_type):
        _add_message(schema, full_name, message, package)
    for enum in file.enum_type:
        schema.enums[f"{package}.{enum.name}"] = _enum_values(enum)
    for service in file.service:
        for method in service.method:
            key = f"{package}.{service.name}.{method.name}"
            schema.methods[key] = _method_signature(method, package)


def _build_schema(files: Iterable[FileDescriptorProto]) -> _Schema:
    """Indexes the descriptors of several files by fully qualified name.

    Args:
        files: The file descriptors.

    Returns:
        The combined schema.
    """
    schema = _Schema()
    for file in files:
        _add_file(schema, file)
    return schema


def _missing(reference: Iterable[str], ours: Iterable[str], kind: str) -> list[str]:
    """Lists names present in the reference but not in our protos.

    Args:
        reference: Names defined by the reference.
        ours: Names defined by our protos.
        kind: Word describing the names, used in the messages.

    Returns:
        One readable line per missing name.
    """
    return [f"missing {kind}: {name}" for name in sorted(set(reference) - set(ours))]


def _mapping_diffs(owner: str, expected: Mapping[str, object], actual: Mapping[str, object]) -> list[str]:
    """Lists the keys whose values differ between two mappings.

    Args:
        owner: Name of the message or enum the mappings describe.
        expected: The reference mapping.
        actual: Our mapping.

    Returns:
        One readable line per differing, missing or extra key.
    """
    return [
        f"{owner}.{key}: expected {expected.get(key, 'absent')}, got {actual.get(key, 'absent')}"
        for key in sorted(expected.keys() | actual.keys())
        if expected.get(key) != actual.get(key)
    ]


def _report(diffs: list[str]) -> str:
    """Formats differences as an assertion message.

    Args:
        diffs: Readable difference lines.

    Returns:
        A multi-line message listing every difference.
    """
    return f"{len(diffs)} incompatibilities with tritonclient:\n" + "\n".join(diffs)


@pytest.fixture(scope="module")
def reference() -> _Schema:
    """Schema of tritonclient's protos, loaded in a subprocess.

    Returns:
        The reference schema.
    """
    return _build_schema(_load_reference_files())


@pytest.fixture(scope="module")
def ours() -> _Schema:
    """Schema of our generated protos.

    Returns:
        Our schema.
    """
    return _build_schema(_load_our_files())


def test_reference_is_not_empty(reference: _Schema) -> None:
    """Guards against a vacuous pass if the reference failed to load."""
    assert reference.messages
    assert reference.enums
    assert reference.methods


def test_all_reference_messages_defined(reference: _Schema, ours: _Schema) -> None:
    """Every reference message (nested and map entries included) exists."""
    diffs = _missing(reference.messages, ours.messages, "message")
    assert not diffs, _report(diffs)


def test_message_fields_match(reference: _Schema, ours: _Schema) -> None:
    """Shared messages have identical fields and map-entry flags."""
    shared = sorted(reference.messages.keys() & ours.messages.keys())
    diffs = [line for name in shared for line in _mapping_diffs(name, reference.messages[name], ours.messages[name])]
    diffs += [
        f"{name}: map_entry differs" for name in shared if (name in reference.map_entries) != (name in ours.map_entries)
    ]
    assert not diffs, _report(diffs)


def test_enums_match(reference: _Schema, ours: _Schema) -> None:
    """Every reference enum exists with identical value names and numbers."""
    diffs = _missing(reference.enums, ours.enums, "enum")
    diffs += [
        line
        for name in sorted(reference.enums.keys() & ours.enums.keys())
        for line in _mapping_diffs(name, reference.enums[name], ours.enums[name])
    ]
    assert not diffs, _report(diffs)


def test_service_methods_match(reference: _Schema, ours: _Schema) -> None:
    """Every reference RPC exists with identical types and streaming flags."""
    diffs = _missing(reference.methods, ours.methods, "method")
    diffs += [
        f"{name}: expected {signature}, got {ours.methods[name]}"
        for name, signature in sorted(reference.methods.items())
        if name in ours.methods and ours.methods[name] != signature
    ]
    assert not diffs, _report(diffs)
