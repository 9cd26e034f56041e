"""A refusal the user gets as one line, not a traceback."""

from __future__ import annotations


class RunError(SystemExit):
    """A clear, user-facing refusal (``cwd_lightning.cli.main`` prints it and exits with code 2, as the
    parser does for a bad option)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")
