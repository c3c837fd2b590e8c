"""Rules of a version's description and labels, and label filters of the list RPCs.

A label key follows the name rule (``metadata.check_name``), a value is at most
``MAX_LABEL_VALUE_CHARS`` characters without control characters, a version carries at most
``MAX_LABELS`` labels, and a description is at most ``MAX_DESCRIPTION_CHARS`` characters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from services.common.errors import InvalidArgument
from services.common.metadata import check_name, shown

MAX_LABELS = 64
"""Most labels one version carries."""
MAX_LABEL_VALUE_CHARS = 256
"""Longest label value."""
MAX_DESCRIPTION_CHARS = 1024
"""Longest version description."""


def check_description(description: str) -> None:
    """Refuse a description longer than ``MAX_DESCRIPTION_CHARS``.

    Raises:
        InvalidArgument: It is too long.
    """
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(
            f"description has {len(description)} characters, at most {MAX_DESCRIPTION_CHARS} are allowed"
        )


def check_label_keys(label_keys: Iterable[str], field: str = "labels") -> None:
    """Refuse a label key that does not follow the name rule.

    Raises:
        InvalidArgument: One does not, naming ``field``.
    """
    for key in label_keys:
        check_name(key, f"{field} key")


def check_labels(labels: Mapping[str, str], field: str = "labels") -> None:
    """Refuse labels that break the rules of the module docstring (``field`` names them in messages).

    Raises:
        InvalidArgument: A key, a value or their number breaks a rule.
    """
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{field} has {len(labels)} labels, at most {MAX_LABELS} are allowed")
    check_label_keys(labels, field)
    for key, value in labels.items():
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgument(
                f"{field} '{key}' has a value of {len(value)} characters, at most {MAX_LABEL_VALUE_CHARS} are allowed"
            )
        if not value.isprintable():
            raise InvalidArgument(f"{field} '{key}' value '{shown(value)}' has control characters")


def updated_labels(labels: Mapping[str, str], put: Mapping[str, str], remove: Iterable[str]) -> dict[str, str]:
    """Return ``labels`` with ``put`` set and the keys in ``remove`` taken out, checked.

    Raises:
        InvalidArgument: A key is both put and removed, or the result breaks a rule.
    """
    removed = set(remove)
    check_label_keys(removed, "remove_labels")
    both = sorted(removed & set(put))
    if both:
        raise InvalidArgument(f"label '{both[0]}' is both in labels and in remove_labels")
    check_labels(put)
    result = {key: value for key, value in labels.items() if key not in removed} | dict(put)
    check_labels(result)
    return result


def has_labels(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """Whether ``labels`` carries every key of ``wanted`` with the same value."""
    return all(labels.get(key) == value for key, value in wanted.items())
