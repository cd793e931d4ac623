from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collapse_excgroups() -> Iterator[None]:
    """Re-raise the lone exception of an exception group as itself.

    Context managers that own a task group use this so that callers see the
    typed error (say, an AuthenticationError) rather than a group of one.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from exc.__cause__
