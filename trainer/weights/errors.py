class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""
