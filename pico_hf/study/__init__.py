"""Studies: variants of one training config x seeds, trained, evaluated, analysed and compared."""

from .config import RunSpec, StudyConfig, load_study_config
from .report import write_study_report
from .runner import StudyError, run_state, run_study

__all__ = [
    "RunSpec",
    "StudyConfig",
    "StudyError",
    "load_study_config",
    "run_state",
    "run_study",
    "write_study_report",
]
