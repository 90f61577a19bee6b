"""Framework-free training helpers shared by the three stages (Eq. 17): deterministic per-step data order,
EMA weights, learning-rate schedules and atomic, exactly resumable training state. No Ray imports: the Ray Train
glue in ``ray_jobs/common.py`` calls these."""

from dudocrop.train.rows import SliceRows, batch_indices, load_split
from dudocrop.train.state import EMA, cosine_lr, load_state, save_state, step_generator, unwrap

__all__ = ["EMA", "SliceRows", "batch_indices", "cosine_lr", "load_split", "load_state", "save_state",
           "step_generator", "unwrap"]
