"""Pagination of the list RPCs: page sizes, opaque page tokens, and filters.

A page token is URL-safe base64 of JSON: the key of the last item returned (a model name, a
version number) and a digest of the request's filters, so a token is refused when the filters
change between pages (the pages would not fit together). Tokens carry no secret and are not
signed: a forged one only moves where a listing starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.common.errors import InvalidArgument
from services.registry.labels import check_labels

_T = TypeVar("_T")

DEFAULT_PAGE_SIZE = 100
"""Items in a page when the request leaves ``page_size`` at 0."""
MAX_PAGE_SIZE = 1000
"""Most items in one page."""
_BAD_TOKEN = "page_token is invalid: pass the next_page_token of the previous page, with the same filters"


@dataclass(frozen=True)
class PageQuery:
    """Which page of a listing to return, and its filters."""

    page_size: int = 0
    """0: ``DEFAULT_PAGE_SIZE``."""
    page_token: str = ""
    """Empty: the first page."""
    name_prefix: str = ""
    """Only models whose name starts with it (ListModels)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Only items whose (some version's) labels include all of these."""

    def size(self) -> int:
        """Return the page size to use.

        Raises:
            InvalidArgument: ``page_size`` is out of 0..MAX_PAGE_SIZE.
        """
        if not 0 <= self.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be 0..{MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE}), got {self.page_size}"
            )
        return self.page_size or DEFAULT_PAGE_SIZE

    def check(self) -> None:
        """Validate the size and the label filter.

        Raises:
            InvalidArgument: One of them is invalid.
        """
        self.size()
        check_labels(self.labels)

    def _digest(self, listing: str) -> str:
        filters = json.dumps([listing, self.name_prefix, sorted(self.labels.items())])
        return hashlib.sha256(filters.encode()).hexdigest()[:16]

    def after(self, listing: str) -> str | None:
        """Return the key the page starts after (None: the first page).

        Args:
            listing: What is listed (e.g. ``models``, ``versions:<model>``): a token of another
                listing is refused.

        Raises:
            InvalidArgument: The token is malformed, or was made for other filters.
        """
        if not self.page_token:
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(self.page_token.encode("ascii")))
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise InvalidArgument(_BAD_TOKEN) from None
        if not isinstance(data, dict) or data.get("f") != self._digest(listing) or not isinstance(data.get("a"), str):
            raise InvalidArgument(_BAD_TOKEN)
        after: str = data["a"]
        return after

    def token(self, listing: str, last_key: str) -> str:
        """Return the token of the page after the one ending with ``last_key``."""
        data = json.dumps({"a": last_key, "f": self._digest(listing)})
        return base64.urlsafe_b64encode(data.encode()).decode("ascii")


@dataclass(frozen=True)
class Page(Generic[_T]):
    """One page of a listing."""

    items: list[_T]
    next_page_token: str = ""
    """Empty on the last page."""


def take_page(query: PageQuery, listing: str, matches: Iterable[_T], key: Callable[[_T], str]) -> Page[_T]:
    """Return the first ``query.size()`` of ``matches`` (in listing order, after the token's key).

    Args:
        query: The request; its token must have been applied by the caller (``matches`` start after it).
        listing: What is listed (see ``PageQuery.after``).
        matches: The matching items in order; read one past the page to know whether another follows.
        key: The key a token resumes after.
    """
    size = query.size()
    items: list[_T] = []
    for item in matches:
        if len(items) == size:
            return Page(items, query.token(listing, key(items[-1])))
        items.append(item)
    return Page(items)
