"""Errors of a run that was under way: ``kalm-fast`` reports them in one line with exit code 1.

Bad input is a ``ValueError`` (exit code 2, before any work); see ``kalm_fast.cli``.
"""


class RunError(RuntimeError):
    """The work failed on the way, e.g. a non-finite training loss; what was finished before stays valid."""
