"""The one exception type users see: what went wrong and how to fix it; and the JSON files the project reads
(configs of model folders, edge.json, scope.json) turned into it when damaged. Standard library only: the lean edge
runtime imports this module."""

from __future__ import annotations

import json
from pathlib import Path


class DistillError(Exception):
    """A problem the user can fix (bad config, bad data, missing teacher, unreachable store).

    The message names the problem and the fix; the CLI prints it without a traceback.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object from `path`, or a DistillError naming the file and `fix` (a damaged file is never a traceback)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, ValueError) as err:
        raise DistillError(f"{path} is not valid JSON ({err})", fix) from None
    if not isinstance(data, dict):
        raise DistillError(f"{path} must hold a JSON object, got {type(data).__name__}", fix)
    return data
