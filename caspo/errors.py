"""The domain errors every service raises, and the checks that raise them.

A service (gRPC servicer, Serve replica, the pair store) raises these; its front maps them to
statuses: ``BadRequest`` → INVALID_ARGUMENT / HTTP 422, ``NotFound`` → NOT_FOUND, ``Unavailable`` →
UNAVAILABLE. Messages name the field and the limit, so a caller can fix the request.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input on the command line (an argument, a setting): the CLI prints it as one line, exit code 2."""


class BadRequest(ValueError):
    """INVALID_ARGUMENT: the message names the field and the limit."""


class NotFound(LookupError):
    """NOT_FOUND: e.g. a policy version that is not loaded."""


class Unavailable(RuntimeError):
    """UNAVAILABLE: a dependency (Redis, a replica) cannot be reached; the client may retry."""


def check_text(field: str, value: str, max_chars: int, allow_empty: bool = False) -> str:
    """A required text field within its limit, else BadRequest naming both."""
    if not value and not allow_empty:
        raise BadRequest(f"{field} is empty")
    if len(value) > max_chars:
        raise BadRequest(f"{field} is {len(value)} characters; the limit is {max_chars}")
    return value


def check_range(field: str, value, lo, hi):
    """``value`` within ``[lo, hi]``, else BadRequest naming the field and the bounds."""
    if not lo <= value <= hi:
        raise BadRequest(f"{field} must be in [{lo}, {hi}], got {value}")
    return value
