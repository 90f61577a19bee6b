"""Evaluation: metal-sweep sets for the perceptual indicators (Eq. 18-19) and the report tables / panels."""

from dudocrop.eval.report import comparison_panel, score_rows, summarize, write_tables
from dudocrop.eval.sweeps import (
    SWEEP_PRESETS,
    MetalSweep,
    SweepConfig,
    SweepMember,
    count_sweep_set,
    get_sweep_config,
    make_sweeps,
    size_sweep_set,
    sweep_lp,
    sweeps_pi,
)

__all__ = [
    "SWEEP_PRESETS",
    "MetalSweep",
    "SweepConfig",
    "SweepMember",
    "comparison_panel",
    "count_sweep_set",
    "get_sweep_config",
    "make_sweeps",
    "score_rows",
    "size_sweep_set",
    "summarize",
    "sweep_lp",
    "sweeps_pi",
    "write_tables",
]
