"""The agent's HTTP server: uvicorn with the limits a hostile network needs (docs/design.md §14).

uvicorn (0.54) closes a connection that stays idle between requests (`timeout_keep_alive`), but not one
that sends nothing, or half a header, and it accepts connections until the process runs out of file
descriptors (then every client, real ones included, is locked out and asyncio logs each failed accept).
`guarded_protocol` adds both limits to uvicorn's h11 protocol:
- a request's headers must arrive within `header_timeout_s` of its first byte (or of the connection);
- at most `max_connections` connections: a new one beyond the cap evicts the oldest connection that has
  no request in progress (a silent or half-sent one), so a real client, which sends its request at once,
  is served while the cap holds; with none idle, the new one is closed. The cap is kept below the
  descriptor limit, and the listen backlog small (asyncio accepts up to a backlog of connections per
  wake-up before any of them is seen), so accept() never fails for lack of descriptors: when it does,
  asyncio (3.11) logs a traceback per queued connection and retries for each, which filled a log with
  hundreds of megabytes while every client was locked out.
The body of a request is the handlers' concern (each read has a timeout, device/agent.py).
"""
from __future__ import annotations

import resource
import time

FD_RESERVE = 32  # descriptors kept for what is not a connection: children's pipes, uploads, the cache


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to what this process's descriptor limit leaves after FD_RESERVE (two per
    connection: its socket, and one more for those accepted in a burst, up to the backlog, before the cap
    closes any). Raises the soft limit to the hard one first, as servers do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        soft = min(hard, 1 << 16)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return max(1, min(wanted, (soft - FD_RESERVE) // 2))


def guarded_protocol(max_connections: int, header_timeout_s: float):
    """uvicorn's h11 protocol class with a header deadline and a connection cap (see above)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.opened = time.monotonic()
            self.header_timer = None
            live = [c for c in self.connections if not c.transport.is_closing()]  # closes are deferred
            if len(live) > max_connections:
                idle = [c for c in live if c is not self and c.idle()]
                if not idle:
                    transport.close()
                    return
                min(idle, key=lambda c: c.opened).transport.close()
            self.arm()

        def idle(self) -> bool:
            """No request in progress: before its headers are complete, or between requests."""
            return self.cycle is None or self.cycle.response_complete

        def arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout_s, self.headers_late)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_late(self) -> None:
            self.header_timer = None
            if self.idle() and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.idle():  # the first bytes of a request: its headers are due from now
                self.arm()
            super().data_received(data)
            if not self.idle():
                self.disarm()

        def on_response_complete(self) -> None:
            self.disarm()  # between requests uvicorn's keep-alive timeout applies
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

    return GuardedH11


def run(app, *, host: str, port: int, max_connections: int, header_timeout_s: float, keep_alive_s: float,
        ssl: dict | None = None) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                            ws="none", http=guarded_protocol(max_connections, header_timeout_s),
                            timeout_keep_alive=keep_alive_s, backlog=max(4, max_connections // 2), **(ssl or {}))
    uvicorn.Server(config).run()
