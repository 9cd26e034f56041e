"""The command line: ``python -m cwd_lightning fit|validate --config experiments/<EXP>.yaml``."""

from cwd_lightning.cli.command import DistillCLI, main
from cwd_lightning.runs.errors import RunError

__all__ = ["DistillCLI", "RunError", "main"]
