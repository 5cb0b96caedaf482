"""How a caller receives a request's events: a blocking iterator over a queue, a callback,
or an asyncio queue fed with `call_soon_threadsafe` (the engine thread never blocks on a
consumer)."""

from __future__ import annotations

import asyncio
import queue
from typing import TYPE_CHECKING, Callable

from .requests import Completion, Event, Request

if TYPE_CHECKING:
    from .engine import Engine

EventCallback = Callable[[Event], None]


class RequestHandle:
    """A submitted request. Iterate it for its events (blocking), or call `result()`."""

    def __init__(self, engine: "Engine", request_id: int, on_event: EventCallback | None):
        self.id = request_id
        self._engine = engine
        self._queue: queue.Queue[Event] | None = None if on_event else queue.Queue()
        self._on_event = on_event

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)
        else:
            self._queue.put(event)

    def __iter__(self):
        if self._queue is None:
            raise TypeError("this request reports through its on_event callback")
        while True:
            event = self._queue.get()
            yield event
            if event.final:
                return

    def cancel(self) -> None:
        self._engine.cancel(self.id)

    def result(self) -> Completion:
        tokens, text, last = [], [], None
        for ev in self:
            if ev.token is not None:
                tokens.append(ev.token)
            text.append(ev.text)
            last = ev
        return Completion(self.id, "".join(text), tokens, last.finish_reason, last.usage, last.error)


class AsyncRequestHandle:
    """`async for event in handle` on the event loop that submitted it."""

    def __init__(self, engine: "Engine", request: Request, loop: asyncio.AbstractEventLoop):
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._handle = engine.submit(request, lambda ev: loop.call_soon_threadsafe(self._events.put_nowait, ev))
        self.id = self._handle.id

    def cancel(self) -> None:
        self._handle.cancel()

    async def __aiter__(self):
        while True:
            event = await self._events.get()
            yield event
            if event.final:
                return
