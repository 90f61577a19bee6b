"""Ray entrypoints (orchestration only: every algorithm lives in ``dudocrop``)."""
