"""The one exception type users see: what went wrong and how to fix it."""


class DistillError(Exception):
    """A problem the user can fix (bad config, bad data, missing teacher, unreachable store).

    The message names the problem and the fix; the CLI prints it without a traceback.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")
