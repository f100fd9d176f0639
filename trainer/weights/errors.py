from trainer.errors import CheckpointError

__all__ = ["CheckpointError"]
