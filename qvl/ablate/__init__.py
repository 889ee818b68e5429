"""Ablations: run one model through many backend mixes and architecture variants, measure, compare.

    qvl ablate ablations/backend_mix.toml     # or no argument: a default that fits this machine
    qvl report results/backend_mix/<timestamp> [more runs ...]

`config` holds the config schema (dataclasses; `schema` derives the parser, the docs tables and the TOML
``--check`` prints from them), `workload` builds the inputs (and a training batch's labels), `runner` measures
generation, or with ``[run] mode = "train"`` training steps (`train`: step time, gradients against the
reference, a loss curve), `report` renders tables, report.md and the plot.
"""

from .config import AblationConfig, ConfigError, Variant, load_config, parse_config
from .defaults import default_config
from .report import compare_runs, format_table, load_results, render_run
from .runner import AblationRun, run_ablation

__all__ = ["AblationConfig", "AblationRun", "ConfigError", "Variant", "compare_runs", "default_config",
           "format_table", "load_config", "load_results", "parse_config", "render_run", "run_ablation"]
