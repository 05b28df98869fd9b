"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], *, within: float = 20.0, what: str = ""
) -> None:
    """Poll `check` (a coroutine function, or a plain one for state in this process)
    until it is true; fail with `what` after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {within}s: {what}")
