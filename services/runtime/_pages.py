"""List pagination every service shares: page sizes and opaque page tokens."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TypeVar

from services.runtime._errors import FieldViolation, invalid

T = TypeVar("T")


def page_size(requested: int, *, what: str, default: int = 100, maximum: int = 1000) -> int:
    """The page size to use: `default` for 0.

    Raises:
        InvalidArgument: below 0 or above `maximum`.
    """
    if not 0 <= requested <= maximum:
        raise invalid([FieldViolation("page_size", f"must be 0..{maximum}")], what=what)
    return requested or default


def page_token(*parts: str) -> str:
    """An opaque token holding where the next page starts."""
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode()


def read_page_token(token: str, parse: Callable[[list[str]], T], *, what: str) -> T | None:
    """What `page_token` held, through `parse` (which raises ValueError or IndexError for
    a token no response gave out: a part that does not parse, too few parts); None for
    an empty token.

    Raises:
        InvalidArgument: a token that is not one of ours.
    """
    if not token:
        return None
    try:
        return parse(base64.urlsafe_b64decode(token.encode()).decode().split("\x1f"))
    except (ValueError, IndexError, binascii.Error, UnicodeDecodeError):
        raise invalid(
            [FieldViolation("page_token", "not a token from a previous response")], what=what
        ) from None
