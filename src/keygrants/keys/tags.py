"""Tags: free labels on keys and principals that policies match on."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from keygrants.errors import InvalidRequest

__all__ = ["MAX_TAGS", "TAG_PATTERN", "check_tags"]

TAG_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$"
MAX_TAGS: Final = 32
_TAG_RE: Final = re.compile(TAG_PATTERN)


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Validate tags and return them sorted without duplicates.

    Raises:
        InvalidRequest: for more than 32 tags or a tag that is not 1-64 characters of letters,
            digits and ``._:=-`` starting with a letter or digit.
    """
    out = sorted(set(tags))
    if len(out) > MAX_TAGS:
        raise InvalidRequest(f"at most {MAX_TAGS} tags")
    for tag in out:
        if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
            raise InvalidRequest("a tag is 1-64 characters of letters, digits and '._:=-', "
                                 "starting with a letter or digit")
    return tuple(out)
