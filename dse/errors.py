"""The one error base class of the project's user-facing mistakes (vocabulary layer: pure Python).

Every error whose message is meant for the user (a bad spec field, a plan the model cannot take,
an unreachable storage URL, an unknown device) derives from :class:`UserError`. The message is one
line naming the field and what is allowed; ``dse`` and ``dse hwcost`` print it as ``error: <message>``
and exit with status 2, with no traceback and no change to stored studies.
"""

from __future__ import annotations

import argparse
import sys

USER_ERROR = 2
"""Exit status of a user's mistake."""


class UserError(Exception):
    """A mistake of the user's: ``str(err)`` is the one line the command line prints (exit status 2)."""


def one_line(message: str, prog: str) -> str:
    """argparse's error ``message`` of the parser ``prog`` as the one line ``<field>: <problem>``."""
    prefix = "the following arguments are required: "
    if message.startswith(prefix):
        missing = message[len(prefix):]
        if missing.startswith("{"):  # a subcommand
            return f"{prog.split()[-1]}: a subcommand is required; allowed: {missing.split('}')[0].strip('{').replace(',', ', ')}"
        return f"{missing}: is required"
    prefix = "unrecognized arguments: "
    if message.startswith(prefix):
        return f"{message[len(prefix):].split()[0]}: unknown argument (see {prog} --help)"
    if message.startswith("argument "):
        return message[len("argument "):]
    return message


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (missing, unknown or malformed arguments) are one line on stderr,
    ``error: <field>: <problem>``, exit status 2 (argparse prints its usage and the error: two or more)."""

    def error(self, message: str):
        print(f"error: {one_line(message, self.prog)}", file=sys.stderr)
        sys.exit(USER_ERROR)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras
