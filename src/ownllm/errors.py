"""Errors a user can act on.

Everything the package raises because of bad input (a missing file, a corrupt checkpoint, an unknown preset)
is an `OwnLLMError`. The CLI prints its message as one line and exits with code 2; Python callers can catch it.
"""

from __future__ import annotations


class OwnLLMError(Exception):
    """A problem with the user's input or files, described in one actionable line."""
