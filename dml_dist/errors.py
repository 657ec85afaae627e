"""The one exception type the trainer turns into a one-line error and a non-zero exit."""


class DMLError(Exception):
    """A user-facing error: the message names the problem and the fix.

    ``all_ranks`` is True when every rank detects the same problem (config, data, checkpoint checks), so
    only rank 0 prints it; a rank-specific failure (a model that cannot be built on one rank, an injected
    fault) sets it False and the failing rank prints its own message.
    """

    def __init__(self, message: str, all_ranks: bool = True):
        super().__init__(message)
        self.all_ranks = all_ranks
