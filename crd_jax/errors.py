"""The project's own exception for bad input: one line naming the file (or value) and the problem."""

from __future__ import annotations

import os
from typing import Union


class InputError(ValueError):
    """Input the user must fix: a missing or unreadable file, a wrong rank or shape, NaN voxels, ...

    ``str(error)`` is ``"<source>: <problem>"``; command-line tools print it without a traceback and exit 2.
    """

    def __init__(self, source: Union[str, os.PathLike], problem: str):
        self.source = os.fspath(source)
        self.problem = " ".join(str(problem).split())  # one line, whatever a library's message held
        super().__init__(f"{self.source}: {self.problem}")
