"""Multi-file model versions (bundles): path rules, the manifest and its digest, the entry point.

A bundle is a directory tree of files: the .onnx file ONNX Runtime loads (the entry point), its
external-data files, and any tokenizer, config or label files. Its manifest lists every file
with its size and sha256; the version's sha256 is the sha256 of the manifest's canonical JSON
(``manifest_json``), so it pins every byte of every file. The registry, the client and the
workers all apply the same path rule (``check_path``): a path from an upload, a tar member or a
registry reply never leaves the version's directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence

from services.common.errors import InvalidArgument
from services.common.metadata import BundleFile, shown

MAX_PATH_SEGMENTS = 8
MAX_PATH_CHARS = 255
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
PATH_RULE = (
    f"expected a relative path of 1-{MAX_PATH_SEGMENTS} segments joined by '/', each 1-128 letters, digits, "
    f"'.', '_', '+' or '-' starting with a letter, digit or '_', {MAX_PATH_CHARS} characters at most"
)
"""What ``check_path`` allows, in words."""
ONNX_SUFFIX = ".onnx"


PART_SUFFIX = ".part"
"""Suffix of a file being downloaded (``bundle_files``): no bundle may hold both ``p`` and ``p.part``."""


def check_path(path: str, what: str = "file") -> None:
    """Refuse a bundle path that is not a normalised relative path following ``PATH_RULE``.

    Raises:
        InvalidArgument: It does not (absolute, '..', empty segment, odd character...), naming it.
    """
    segments = path.split("/")
    if (
        len(path) > MAX_PATH_CHARS
        or len(segments) > MAX_PATH_SEGMENTS
        or not all(_SEGMENT_RE.fullmatch(segment) for segment in segments)
    ):
        raise InvalidArgument(f"{what} path '{shown(path)}' is invalid: {PATH_RULE}")


def check_files(files: Sequence[BundleFile], what: str = "file") -> None:
    """Check every path of ``files``, and that no path repeats or is the directory of another.

    Raises:
        InvalidArgument: A path is invalid or a duplicate (the message names it).
    """
    seen: set[str] = set()
    directories: set[str] = set()
    for file in files:
        check_path(file.path, what)
        if file.path in seen or file.path in directories:
            raise InvalidArgument(f"{what} path '{file.path}' appears twice in the bundle")
        parents = {"/".join(file.path.split("/")[:i]) for i in range(1, file.path.count("/") + 1)}
        if parents & seen:
            raise InvalidArgument(f"{what} path '{file.path}' is inside another file's path")
        seen.add(file.path)
        directories |= parents
    for path in seen:
        if path.endswith(PART_SUFFIX) and path.removesuffix(PART_SUFFIX) in seen:
            raise InvalidArgument(
                f"{what} path '{path}' is where a download keeps '{path.removesuffix(PART_SUFFIX)}' until it "
                f"is whole: rename one of them"
            )


def manifest_json(entry_point: str, files: Iterable[BundleFile]) -> str:
    """Return the bundle's manifest: canonical JSON (files sorted by path, keys sorted, no spaces)."""
    listed = [
        {"path": f.path, "sha256": f.sha256, "size_bytes": f.size_bytes} for f in sorted(files, key=lambda f: f.path)
    ]
    return json.dumps({"entry_point": entry_point, "files": listed}, sort_keys=True, separators=(",", ":"))


def manifest_sha256(entry_point: str, files: Iterable[BundleFile]) -> str:
    """Return the sha256 of ``manifest_json``: a bundle version's ``sha256``."""
    return hashlib.sha256(manifest_json(entry_point, files).encode()).hexdigest()


def entry_point_of(files: Sequence[BundleFile], wanted: str = "") -> str:
    """Return the bundle's entry point: ``wanted`` (one of its .onnx files), else its only top-level .onnx.

    Raises:
        InvalidArgument: ``wanted`` is not an .onnx file of the bundle, or it is empty and the top
            level holds no .onnx file or several.
    """
    paths = {f.path for f in files}
    if wanted:
        if wanted not in paths or not wanted.endswith(ONNX_SUFFIX):
            raise InvalidArgument(f"entry_point '{shown(wanted)}' is not an .onnx file of the bundle")
        return wanted
    top = sorted(p for p in paths if "/" not in p and p.endswith(ONNX_SUFFIX))
    if len(top) != 1:
        found = ", ".join(f"'{p}'" for p in top) or "none"
        raise InvalidArgument(
            f"entry_point is empty and the bundle's top level must then hold exactly one .onnx file (found {found})"
        )
    return top[0]
