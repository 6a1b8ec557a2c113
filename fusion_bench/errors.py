"""The one exception type users see.

Every problem a user can fix (a missing checkpoint, a typo in a task name, a corrupted file, an
output path that exists ...) is raised as :class:`FusionBenchError` with a message that names the
problem *and* the fix. The CLI prints that message without a traceback; anything else is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FusionBenchError(Exception):
    """A problem with the user's input, reported as ``what is wrong`` + ``how to fix it``."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A short ' Did you mean ...?' hint, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
