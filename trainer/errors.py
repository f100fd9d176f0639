"""The errors a user can cause, in one module that imports nothing heavy: train.py reports a bad config
in a fraction of a second, before torch is even imported."""


class UserError(ValueError):
    """A mistake in what the user gave us: reported as one `error:` line with exit code 2."""


class ConfigError(UserError):
    """A user mistake in the config file or the command line."""


class DataError(UserError):
    """Training data that is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stayed non-finite for training.max_bad_steps steps in a row."""


def describe(e: BaseException, limit: int = 300) -> str:
    """One line for an exception from a library: the innermost cause, and of a message that embeds a
    whole traceback (DCP wraps each rank's failure in one) its last `SomethingError: ...` line."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))
              and line.split(":")[0].replace(".", "").replace("_", "").isalnum()]
    return (errors[-1] if errors else " ".join(lines) or type(e).__name__)[:limit]
