"""One error type for bad input, rendered as one line a user can act on."""
from __future__ import annotations


class MetastemError(Exception):
    """Bad input or an analysis that cannot be meaningful.

    Rendered as ``dataset '<id>': <file>: <problem>. Fix: <fix>`` so that a user sees, in one line,
    which dataset, which file and what to change.
    """

    def __init__(self, problem: str, *, dataset: str | None = None, file: str | None = None,
                 fix: str | None = None) -> None:
        self.problem = problem.rstrip(".")
        self.dataset = dataset
        self.file = file
        self.fix = fix
        super().__init__(str(self))

    def with_context(self, *, dataset: str | None = None, file: str | None = None) -> "MetastemError":
        """Fill in dataset/file where the raising code did not know them."""
        self.dataset = self.dataset or dataset
        self.file = self.file or file
        self.args = (str(self),)
        return self

    def __str__(self) -> str:
        parts = []
        if self.dataset:
            parts.append(f"dataset '{self.dataset}'")
        if self.file:
            parts.append(str(self.file))
        parts.append(self.problem)
        msg = ": ".join(parts) + "."
        if self.fix:
            msg += f" Fix: {self.fix.rstrip('.')}."
        return msg
