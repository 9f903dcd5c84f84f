"""Wiring and lifecycle: build backends, start listeners and background tasks, reload, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from broker.backends.base import BrokerError, ConfigurationError
from broker.backends.guard import Guard
from broker.backoff import Backoff
from broker.cache.leases import LeaseHolder
from broker.clock import Clock
from broker.config import BrokerConfig, load_config
from broker.server import EDGE, bind_unix_socket, build_api_app, build_metrics_app
from broker.server.listener import SEEN, Listener, tcp_socket
from broker.state import BrokerState

log = logging.getLogger("broker")

STARTUP_BACKOFF = (1.0, 30.0, 0.5)  # base, cap, floor (seconds) for start-up and prefetch retries


class Broker:
    """The daemon: listeners, background tasks, signals."""

    def __init__(self, config: BrokerConfig, config_path: Path | None, *, clock: Clock | None = None) -> None:
        self.config_path = config_path
        self.state = BrokerState(config, clock=clock)
        # A backend a reload retired while it held leases is closed when the last of them goes.
        self.state.cache.leases.on_free = self._lease_holder_free
        self._runners: list[web.AppRunner] = []
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._starting: dict[Guard, asyncio.Task[Any]] = {}  # each backend's start loop while it runs
        self._stop = asyncio.Event()
        self._socket_path: Path | None = None
        self._reload_lock = asyncio.Lock()
        self._started = False
        base, cap, floor = STARTUP_BACKOFF
        self.backoff = Backoff(base, cap, floor=floor)

    # ------------------------------------------------------------------------------------------ start

    async def start(self) -> None:
        """Bind every listener, then log in to backends and warm the prefetch list in the background."""
        cfg = self.state.config
        token = None
        if cfg.listen.tcp_address is not None:
            assert cfg.listen.token_file is not None
            token = read_token(cfg.listen.token_file)  # before binding anything: fail fast
        if self.state.audit is not None:
            self.state.audit.start()
        if cfg.listen.socket is not None:
            sock = bind_unix_socket(cfg.listen.socket, cfg.listen.socket_mode)
            self._socket_path = cfg.listen.socket
            await self._serve(build_api_app(self.state), sock, api=True)
        if cfg.listen.tcp_address is not None:
            await self._serve(
                build_api_app(self.state, tcp_token=token),
                tcp_socket(*cfg.listen.tcp_address, "API TCP listener (listen.tcp)"),
                api=True,
            )
        if cfg.metrics.address is not None:
            await self._serve(
                build_metrics_app(self.state), tcp_socket(*cfg.metrics.address, "metrics listener (metrics.listen)")
            )
        self._spawn(self.state.cache.maintain(), "cache-maintenance")
        if self.state.node is not None:
            self._spawn(self.state.node.maintain(), "node-maintenance")
        self._spawn(self._start_backends(self.state.guards), "backend-start")
        log.info(
            "broker listening",
            extra={
                "socket": str(cfg.listen.socket) if cfg.listen.socket else None,
                "tcp": cfg.listen.tcp,
                "metrics": cfg.metrics.listen,
                "backends": [f"{b.name}:{b.type}" for b in cfg.backends],
            },
        )
        self._started = True

    async def _serve(self, app: web.Application, sock: socket.socket, *, api: bool = False) -> None:
        listen = self.state.config.listen
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=self.state.config.shutdown.grace,
            keepalive_timeout=30.0,
        )
        await runner.setup()
        front = None
        if api and listen.fast_path and self.state.node is None:  # node mode verifies every request
            # Fresh cache hits answered straight from the protocol; everything else goes to aiohttp.
            from broker.server.fast import FastFront

            front = FastFront(self.state, policy=app[EDGE], seen=app[SEEN])
        listener = Listener(
            runner,
            sock,
            max_connections=listen.max_connections,
            header_timeout=listen.header_timeout,
            metrics=self.state.metrics,
            front=front,
        )
        await listener.start()
        self._runners.append(runner)
        self._listeners.append(listener)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_backends(self, guards: list[Guard]) -> None:
        # A start loop cancelled by a reload that retired its backend does not keep the others from prefetching.
        results = await asyncio.gather(*(self._start_one(g) for g in guards), return_exceptions=True)
        for guard, result in zip(guards, results, strict=True):
            if isinstance(result, Exception):
                log.error("backend start crashed", exc_info=result, extra={"backend": guard.name})
        await self._prefetch()
        # Start-up and reloads parse SDK data and configs once; what they freed goes back to the kernel.
        release_free_memory()

    async def _start_one(self, guard: Guard) -> None:
        """Log in, retrying with capped backoff until it works (readiness reports why meanwhile)."""
        task = asyncio.current_task()
        assert task is not None
        self._starting[guard] = task
        try:
            await self._start_loop(guard)
        finally:
            if self._starting.get(guard) is task:
                del self._starting[guard]

    async def _start_loop(self, guard: Guard) -> None:
        for attempt in itertools.count():
            try:
                await guard.start()
            except BrokerError as exc:
                delay = self.backoff.delay(attempt, exc.retry_after)
                log.warning(
                    "backend start failed; retrying",
                    extra={
                        "backend": guard.name,
                        "error": exc.code,
                        "detail": exc.message,
                        "retry_in": round(delay, 2),
                    },
                )
            else:
                log.info("backend ready", extra={"backend": guard.name})
                return
            await self.backoff.sleep(delay)

    async def _prefetch(self) -> None:
        keys = self.state.prefetch_keys()
        if not keys:
            self.state.prefetched = True
            return
        self.state.cache.pin(keys)
        pending = list(keys)
        attempt = 0
        while pending:
            failed = []
            for kind, name, team in pending:
                try:
                    await self.state.cache.get(kind, name, team)
                except BrokerError as exc:
                    if exc.code == "not_found":
                        log.warning(
                            "prefetch key not found in any backend",
                            extra={"kind": kind.value, "key": name, "team": team},
                        )
                    else:
                        failed.append((kind, name, team))
            pending = failed
            if pending:
                await self.backoff.wait(attempt)
                attempt += 1
        self.state.prefetched = True
        log.info("prefetch warm", extra={"keys": len(keys)})

    # ------------------------------------------------------------------------------------------ run

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, reloading on SIGHUP; returns the exit code."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload(), "reload"))
        try:
            await self.start()
            await self._stop.wait()
            log.info("stopping: draining in-flight requests")
        finally:
            await self.stop()
        return 0

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests within the grace period, revoke leases, close backends."""
        self.state.cache.leases.on_free = None  # from here every backend still open is closed below
        if self._socket_path is not None:
            # Unlink first so new clients fail fast (ENOENT), then keep accepting for a moment so the
            # connections already queued in the listen backlog are served instead of reset.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)
        if self._runners:
            await asyncio.sleep(self.state.config.shutdown.drain_delay)
        for listener in self._listeners:
            listener.close()
        for listener in self._listeners:
            if listener.front is not None:
                await listener.front.drain(self.state.config.shutdown.grace)
        self._listeners.clear()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        # Closes under way finish (cut short, they could leak a session); they are waited for below, since one
        # may be waiting for a call the cache is about to end.
        cancelled = [t for t in self._tasks if t.get_name() != "backend-close"]
        for task in cancelled:
            task.cancel()
        if cancelled:
            await asyncio.wait(cancelled, timeout=5)
        await self.state.cache.aclose(revoke_leases=self.state.config.leases.revoke_on_shutdown)
        if self.state.node is not None:
            await self.state.node.aclose(revoke_leases=self.state.config.leases.revoke_on_shutdown)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        # Every backend ever built that is still open: the chain, and retired ones that held leases.
        await asyncio.gather(*(close_backend(g) for g in [*self.state.guards, *self.state.retired]))
        self.state.retired.clear()
        self.state.executor.shutdown(wait=False, cancel_futures=True)
        if self.state.audit is not None:
            # Every lookup answered has been queued by now: write the rest before exiting.
            await self.state.audit.aclose()
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)
        if self._started:  # a start that failed to bind reports only its error
            log.info("stopped")

    # ------------------------------------------------------------------------------------------ reload

    async def reload(self) -> bool:
        """Re-read the config and apply it (``BrokerState.apply``). A bad config keeps the old one.
        Returns whether the new config was applied."""
        async with self._reload_lock:
            state = self.state
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, load_config, self.config_path)
            except ConfigurationError as exc:
                state.metrics.reloads.labels("invalid").inc()
                log.error(
                    "reload refused: invalid configuration; keeping the running one", extra={"errors": exc.errors}
                )
                return False
            if (new.node is None) != (state.node is None):
                state.metrics.reloads.labels("invalid").inc()
                log.error("reload refused: turning node mode on or off needs a restart; keeping the running config")
                return False
            if state.node is not None:
                closed = state.node.reset(new)
                state.metrics.reloads.labels("ok").inc()
                log.info("configuration reloaded (node mode)", extra={"identities_closed": closed})
                return True
            change = state.apply(new)
            for section in change.restart_needed:
                log.warning("reload: this section needs a restart to change", extra={"section": section})
            # A retired backend that granted a live lease stays open so the lease can still be revoked.
            close_now = state.retire(change.retired)
            starting = {g: self._cancel_start(g) for g in change.retired}
            self._spawn(self._start_backends(change.fresh), "backend-start")
            for guard in close_now:
                self._spawn(self._close(guard, starting[guard], change.reads), "backend-close")
            state.metrics.reloads.labels("ok").inc()
            log.info(
                "configuration reloaded",
                extra={
                    "backends_kept": change.kept,
                    "backends_new": [g.name for g in change.fresh],
                    "backends_retired": [g.name for g in change.retired],
                    "entries_dropped": change.dropped,
                },
            )
            return True

    def _cancel_start(self, guard: Guard) -> asyncio.Task[Any] | None:
        """Stop a retired backend's start loop (a login still retrying); returns it, to be waited for."""
        task = self._starting.pop(guard, None)
        if task is not None:
            task.cancel()
        return task

    async def _close(
        self, guard: Guard, start: asyncio.Task[Any] | None = None, reads: list[asyncio.Task[Any]] | None = None
    ) -> None:
        """Close a backend out of the chain, once its cancelled start loop has ended, the reads begun on the old
        chain (which may still reach it) are done, and so are the calls it was making; one of those that granted
        a lease keeps it open until that lease goes."""
        waits = [task for task in [start, *(reads or [])] if task is not None]
        if waits:
            await asyncio.wait(waits)
        await guard.idle()
        if guard in self.state.cache.leases.holders():
            self.state.retired.append(guard)
            return
        await close_backend(guard)

    def _lease_holder_free(self, holder: LeaseHolder) -> None:
        guard = self.state.released(holder)
        if guard is not None:
            self._spawn(self._close(guard), "backend-close")


async def close_backend(guard: Guard) -> None:
    """Close one backend's sessions and tasks; a failure is logged, never raised (shutdown goes on)."""
    try:
        await guard.aclose()
    except Exception:
        log.exception("backend close failed", extra={"backend": guard.name})
        return
    log.info("backend closed", extra={"backend": guard.name})


def read_token(path: Path) -> bytes:
    """The TCP listener's shared token. Raises ConfigurationError when unreadable or empty."""
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigurationError([f"listen.token_file: cannot read {path}: {exc.strerror}"]) from None
    if len(token) < 16:
        raise ConfigurationError([f"listen.token_file: token in {path} must be at least 16 characters"])
    return token


def release_free_memory() -> None:
    """Collect garbage, then give the C heap's free pages back to the kernel (glibc's ``malloc_trim``; a no-op
    on other C libraries). Worth about 0.5 MiB after start-up (benchmarks/footprint.py)."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return


def harden_process() -> None:
    """No core dumps: a dump would write cached secrets to disk."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def serve(config: BrokerConfig, config_path: Path | None) -> int:
    """Run the daemon until stopped; returns the process exit code."""
    harden_process()

    async def main() -> int:
        return await Broker(config, config_path).run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
