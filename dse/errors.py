"""The one error base class of the project's user-facing mistakes (vocabulary layer: pure Python).

Every error whose message is meant for the user (a bad spec field, a plan the model cannot take,
an unreachable storage URL, an unknown device) derives from :class:`UserError`. The message is one
line naming the field and what is allowed; ``dse`` and ``dse hwcost`` print it as ``error: <message>``
and exit with status 2, with no traceback and no change to stored studies.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake of the user's: ``str(err)`` is the one line the command line prints (exit status 2)."""
