from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


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


def current_backend() -> str:
    """The async library running this task ("asyncio" or "trio")."""
    try:
        import sniffio  # trio depends on it; without it, only asyncio can be running
    except ImportError:
        return "asyncio"
    try:
        return str(sniffio.current_async_library())
    except sniffio.AsyncLibraryNotFoundError:
        return "asyncio"


#: Event loops a process of ours can run on: "uvloop" is asyncio on uvloop
#: (the ``fast`` extra), a faster loop for the same asyncio code.
BACKENDS = ("asyncio", "uvloop", "trio")


def run(func: Callable[..., Awaitable[T]], *args: Any, backend: str = "asyncio") -> T:
    """``anyio.run`` that also knows the "uvloop" backend.

    :raises ConfigError: for "uvloop" when uvloop is not installed.
    """
    if backend == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError as exc:
            from ._errors import ConfigError

            raise ConfigError("the uvloop backend needs uvloop: "
                              "pip install 'slim-agents[fast]'") from exc
        return anyio.run(func, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(func, *args, backend=backend)


class Wakeup:
    """Tasks wait on it until the next :meth:`fire` (after which it is armed again).

    The anyio Event behind it is made only when someone waits, so a fire
    nobody waits for costs nothing.
    """

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        #: The event tasks wait on; set (true) exactly while a task waits for the
        #: next fire. An attribute, not a property: it is read per message.
        self.waiting: anyio.Event | None = None

    async def wait(self) -> None:
        if self.waiting is None:
            self.waiting = anyio.Event()
        await self.waiting.wait()

    def fire(self) -> None:
        event, self.waiting = self.waiting, None
        if event is not None:
            event.set()
