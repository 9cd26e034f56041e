"""The run record: the run folder and its rules, the checks before a command writes anything, atomic
checkpoints, the run id and RNG states, the loggers, provenance and what makes two runs the same."""

from cwd_lightning.runs.checkpoints import AtomicCheckpointIO, LastCheckpoint, RunFolderCheckpoint
from cwd_lightning.runs.errors import RunError
from cwd_lightning.runs.folder import RunFolder
from cwd_lightning.runs.identity import identity_digest, recipe, run_identity
from cwd_lightning.runs.loggers import AppendingCSVLogger, StepLearningRateMonitor
from cwd_lightning.runs.record import RUN_ID_FILE, RunRecord

__all__ = [
    "RUN_ID_FILE",
    "AppendingCSVLogger",
    "AtomicCheckpointIO",
    "LastCheckpoint",
    "RunError",
    "RunFolder",
    "RunFolderCheckpoint",
    "RunRecord",
    "StepLearningRateMonitor",
    "identity_digest",
    "recipe",
    "run_identity",
]
