"""The one exception type for a user's mistake: scripts turn it into one line and exit 2."""


class UserError(ValueError):
    """A bad config, CLI argument, data path or checkpoint: reported as one line, exit status 2."""


class Diverged(RuntimeError):
    """The loss, the parameters or the optimizer state became NaN or Inf (exit status 1, not a user error)."""
