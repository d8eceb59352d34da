"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn, the ``serve`` extra).

    from falcon_mamba.server import ServerSettings, create_app, run
    run(engine, tokenizer, ServerSettings(model_id="falcon-mamba"), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

from falcon_mamba.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app", "make_server", "run"]


def header_timeout_protocol(timeout_s: float):
    """uvicorn's HTTP protocol class (h11 or httptools, whichever it picked) with a header timeout:
    a connection that has not sent a complete request head within timeout_s of opening (or of its
    last response) is closed. uvicorn has none, so a client sending half a request head would
    hold its connection forever. (An idle keep-alive connection is closed sooner, by uvicorn.)"""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeout(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self):
            self.loop.call_later(timeout_s, self._header_deadline, self.cycle)

        def _header_deadline(self, armed):
            cycle = self.cycle
            waiting = cycle is None or cycle.response_complete  # no request in progress
            if cycle is armed and waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout


def make_server(engine, tokenizer, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
                grace_s: float = 10.0, log_level: str = "warning", drain: bool = True):
    """A uvicorn Server whose shutdown drains the engine: new requests get 503, running ones have
    grace_s seconds to finish, then are cancelled (streams end with an error event and [DONE]).
    drain=False leaves the engine running (a second front end on a shared engine)."""
    import asyncio
    import contextlib
    import signal
    import threading

    import uvicorn

    app = create_app(engine, tokenizer, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=grace_s + 5, access_log=False,
                            http=header_timeout_protocol(settings.header_timeout_s))

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after a graceful shutdown, so Ctrl-C would still end
            # the process as "interrupted"; here a signal only starts the shutdown (a second
            # Ctrl-C forces it, as in uvicorn), and the command exits normally.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        async def shutdown(self, sockets=None):
            if not drain:
                return await super().shutdown(sockets)
            # Drain the engine while uvicorn stops listening and waits for the handlers; the
            # handlers finish as soon as their requests end or are cancelled.
            draining = asyncio.ensure_future(asyncio.to_thread(engine.shutdown, grace_s))
            await super().shutdown(sockets)
            await draining

    return _Server(config)


def run(engine, tokenizer, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
        grace_s: float = 10.0, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM, then shut down cleanly."""
    make_server(engine, tokenizer, settings, host, port, grace_s, log_level).run()
