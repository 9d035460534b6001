"""User-facing errors: one line that names the problem and the fix.

Library code raises `IterabreError(problem, fix)`; the CLI prints it as a single line
and exits non-zero, so users never see a traceback for a bad input.
"""


class IterabreError(Exception):
    """A bad input or environment problem that the user can fix."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)
