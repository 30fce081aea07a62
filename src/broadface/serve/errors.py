"""Errors the service answers with a 4xx status and a one-line message (never a traceback, never a 500)."""
from __future__ import annotations


class ServeError(Exception):
    """A client error: ``status`` is the HTTP status, the message says what was wrong and what is expected."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadInput(ServeError):
    """Well-formed request, unusable content: not an image, no face, bad metadata."""

    status = 422


class TooLarge(ServeError):
    """An upload or image over the configured limits."""

    status = 413


class NotFound(ServeError):
    """Unknown identity or image."""

    status = 404


class Conflict(ServeError):
    """The gallery's state forbids the request (e.g. searching an empty gallery)."""

    status = 409


class Unauthorized(ServeError):
    """A write without the right API key."""

    status = 401


class Forbidden(ServeError):
    """A write from a web page of another origin (cross-site request forgery)."""

    status = 403
