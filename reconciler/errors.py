"""Errors of the environment rather than of the program: the database cannot be reached or is not migrated, a
port is taken, another daemon holds the database. The command line reports them in one line and exits 2
(`reconciler.cli.main`); a traceback would only hide the one sentence the operator needs."""

from __future__ import annotations


class SetupError(Exception):
    """Something the operator must fix before the command can run; its message says what, in one line."""

    exit_code = 2


class RefusedError(SetupError):
    """The command refused what it was asked; nothing was changed or sent ("refused: ...", exit 2)."""


class BusyError(SetupError):
    """Another run holds what the command needs: try again (exit 1)."""

    exit_code = 1


def one_line(text: object) -> str:
    """A driver's message (psycopg's spans lines, with a hint) as one line."""
    return " ".join(str(text).split())
