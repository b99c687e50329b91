"""Experiments: validated configs and ``run(config) -> RunResult``."""

from fedsqueeze.experiment.config import RunConfig, config_from_dict, load_config
from fedsqueeze.experiment.run import RunDiverged, RunResult, run

__all__ = ["RunConfig", "RunDiverged", "RunResult", "config_from_dict", "load_config", "run"]
