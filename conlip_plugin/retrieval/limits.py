"""The bounds that keep slow, departing and too many clients from holding ``conlip-retrieval serve`` up.

uvicorn bounds the size of a request's headers (h11's 16 KiB, a 400 beyond), the idle time of a kept-alive
connection (``timeout_keep_alive``) and the connections open at once (``limit_concurrency``, a plain 503
beyond). It bounds neither how long a client may take to send its headers or its body, nor the requests
at work at once apart from idle connections; those are here:

- ``header_deadline_protocol``: uvicorn's h11 protocol, closing a connection whose request headers have not
  all arrived within ``read_timeout_s`` of its opening or of the previous response (before the headers are
  complete no ASGI app has been called, so this cannot be middleware);
- ``BodyDeadline``: a 408 for a body still incomplete ``read_timeout_s`` after its headers;
- ``RequestBound``: a JSON 503 for a request beyond ``max_requests`` at work at once;
- ``client_left``: a client that goes away mid-body ends its request quietly, with no traceback logged.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Type

if TYPE_CHECKING:  # the command line reads ServingLimits' defaults without the server's packages installed
    from fastapi import FastAPI, Request, Response
    from starlette.requests import ClientDisconnect
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ServingLimits:
    """``conlip-retrieval serve``'s bounds, as its flags set them."""

    read_timeout_s: float = 30.0  # --read-timeout: headers, and then the body, each within this
    max_requests: int = 64  # --max-requests: requests at work at once; a 503 beyond
    max_connections: int = 1024  # --max-connections: uvicorn's limit_concurrency
    keep_alive_s: int = 5  # uvicorn's timeout_keep_alive


def _json(status: int, detail: str, extra: Optional[dict] = None) -> tuple:
    """An ASGI response start and body for ``{"detail": ...}``, closing the connection."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *((k.encode(), v.encode()) for k, v in (extra or {}).items())]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class RequestBound:
    """Answers 503 (with Retry-After) to a request that arrives while ``most`` are at work, instead of
    queueing it behind them; the bound counts requests, not idle kept-alive connections."""

    def __init__(self, app: ASGIApp, most: int):
        self.app, self.most, self.at_work = app, most, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.at_work >= self.most:
            for message in _json(503, f"the server is answering {self.most} requests, its bound; retry in a "
                                      f"moment, or restart conlip-retrieval serve with a larger --max-requests.",
                                 {"retry-after": "1"}):
                await send(message)
            return
        self.at_work += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.at_work -= 1


class BodyDeadline:
    """Gives a request's body ``seconds`` from the start of the request to arrive whole. Past that the
    client gets a 408 (unless a response has begun) and the app an ``http.disconnect``, as if the client
    had left; once the body is whole, waiting for a disconnect (as streamed responses do) is not bounded."""

    def __init__(self, app: ASGIApp, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.seconds
        body_done, responded, timed_out = False, False, False

        async def timed_receive() -> Message:
            nonlocal body_done, responded, timed_out
            if body_done or timed_out:
                return await receive() if body_done else {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                timed_out = True
                if not responded:
                    responded = True
                    for reply in _json(408, f"the request body did not arrive within {self.seconds:g} s; send "
                                            f"it faster, or restart conlip-retrieval serve with a larger "
                                            f"--read-timeout."):
                        await send(reply)
                return {"type": "http.disconnect"}
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal responded
            if timed_out and message["type"].startswith("http.response"):
                return  # the 408 (or the response begun before the deadline) is what the client gets
            responded = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)


def header_deadline_protocol(seconds: float) -> Type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not all in within
    ``seconds`` of the connection opening or of the previous response ending. Trickling bytes does not
    extend it (uvicorn's keep-alive timer, by contrast, restarts on any byte)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        deadline: Optional[asyncio.TimerHandle] = None
        waiting_since_cycle: object = None

        def arm(self) -> None:
            self.disarm()
            self.waiting_since_cycle = self.cycle
            self.deadline = self.loop.call_later(seconds, self.headers_too_slow)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def headers_too_slow(self) -> None:
            self.deadline = None
            if self.cycle is self.waiting_since_cycle and not self.transport.is_closing():
                self.transport.close()

        def headers_in(self) -> None:
            if self.cycle is not self.waiting_since_cycle:  # a new request began: its headers are whole
                self.disarm()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.headers_in()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self.arm()
            super().on_response_complete()  # may start a pipelined request at once
            self.headers_in()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self.disarm()
            super().connection_lost(exc)

    return HeaderDeadline


async def client_left(request: Request, exc: ClientDisconnect) -> Response:
    """A client that went away before its body was in: nobody is there to read an answer, and it is
    not the server's error, so no traceback is logged; the status is for whatever wraps the app."""
    from fastapi import Response

    return Response(status_code=499)


def add_limits(app: FastAPI, limits: ServingLimits) -> None:
    """The request bound and the body deadline around ``app``, and the quiet end of a departed client."""
    from starlette.requests import ClientDisconnect

    app.add_exception_handler(ClientDisconnect, client_left)
    app.add_middleware(BodyDeadline, seconds=limits.read_timeout_s)
    app.add_middleware(RequestBound, most=limits.max_requests)  # added last: outermost, so a refusal is cheap
