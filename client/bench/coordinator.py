"""Runs the generator (in this process, or in several) and samples the brokers (a shell).

The coordinator picks one start time for every worker, reads the brokers' CPU time at the
start and the end of the measured window (and, for Redis, its CPU and its command counts),
and once more when the workers are done (what a ``--detached`` run's resumes cost), shows a
progress line, and merges the workers' results into a :class:`~client.bench.results.Report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import msgspec
import redis

from client.bench.connection import ConnectionLost, close_all
from client.bench.load import Counters, LoadConfig, Worker, connect_registered
from client.bench.plan import Placement, place_idle, place_pairs, split
from client.bench.procfs import process_cpu_seconds, process_rss_bytes
from client.bench.results import (
    BrokerCpu,
    Report,
    WorkerResult,
    build_report,
    command_calls,
    command_delta,
    merge_results,
)

__all__ = [
    "IdleReport",
    "ThroughputConfig",
    "install_uvloop",
    "run_idle",
    "run_throughput",
]

#: Time between the last worker being ready and the common start.
START_DELAY = 0.2


class ThroughputConfig(msgspec.Struct, frozen=True, kw_only=True):
    urls: list[str]
    placement: Placement = "same-node"
    pairs: int = 10
    window: int = 64
    payload_size: int = 100
    duration: float = 10.0
    warmup: float = 2.0
    rate: float = 0.0
    processes: int = 1
    idle: int = 0
    broker_pids: list[int] = []
    #: A Redis whose own CPU (INFO cpu) is measured over the window, beside the brokers'.
    redis_url: str | None = None
    tick: float = 0.001
    drain_timeout: float = 5.0
    request_timeout: float = 10.0
    connect_concurrency: int = 100
    #: Resumable sessions, as the SDK's (issue 14); ``detached``: receivers away in the window.
    resume: bool = False
    detached: bool = False


def install_uvloop() -> str:
    """Run the generator on uvloop when it is installed; returns the loop's name."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def plan_workers(config: ThroughputConfig) -> list[LoadConfig]:
    """The load of each generator process: pairs and idle connections dealt evenly."""
    if config.pairs < 1:
        raise ValueError("at least one pair is needed")
    processes = max(1, min(config.processes, config.pairs))
    pair_parts = split(place_pairs(config.urls, config.pairs, config.placement), processes)
    idle_parts = split(place_idle(config.urls, config.idle), processes)
    return [
        LoadConfig(
            pairs=pairs,
            idle=idle,
            window=config.window,
            payload_size=config.payload_size,
            rate=config.rate * len(pairs) / config.pairs,
            tick=config.tick,
            request_timeout=config.request_timeout,
            drain_timeout=config.drain_timeout,
            connect_concurrency=config.connect_concurrency,
            resume=config.resume or config.detached,
            detached=config.detached,
        )
        for pairs, idle in zip(pair_parts, idle_parts, strict=True)
    ]


class Progress:
    """The progress line on stderr (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last_line = 0.0
        self._last: tuple[float, int] | None = None

    def note(self, text: str) -> None:
        if self.enabled:
            self._write(text, final=True)

    def counts(self, phase: str, sent: int, confirmed: int, delivered: int, errors: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (delivered - self._last[1]) / (now - self._last[0])
        self._last = (now, delivered)
        if not self.tty and now - self._last_line < 2.0:
            return
        self._last_line = now
        self._write(
            f"{phase:<8} sent {sent:>10,}  confirmed {confirmed:>10,}  delivered {delivered:>10,}"
            f"  {rate:>9,.0f} msg/s  errors {errors}",
            final=False,
        )

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _write(self, text: str, *, final: bool) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{text}" + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _phase(start_at: float, warmup: float, duration: float) -> str:
    now = time.monotonic()
    if now < start_at + warmup:
        return "warm-up"
    if now < start_at + warmup + duration:
        return "measure"
    return "drain"


class RedisSample(NamedTuple):
    """A Redis server's own CPU seconds (INFO cpu) and calls per command (INFO commandstats)."""

    cpu_seconds: float
    calls: dict[str, int]


def redis_sample(client: redis.Redis) -> RedisSample:
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    return RedisSample(
        float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), command_calls(stats)
    )


class BrokerSampler:
    """CPU seconds of the broker processes (and of Redis) between two instants, and of the
    brokers from the second to a third (``finish``: when the workers are done)."""

    def __init__(self, pids: list[int], redis_url: str | None = None) -> None:
        self.pids = pids
        self.redis_url = redis_url
        self._start: list[float] = []
        self._end: list[float] = []
        self._finish: list[float] = []
        self._redis: list[RedisSample] = []
        # One connection for both samples: a second one's handshake (HELLO, CLIENT SETINFO)
        # would count among the commands of the window.
        self._client = (
            redis.Redis.from_url(redis_url, socket_timeout=2.0) if redis_url is not None else None
        )

    def start(self) -> None:
        self._start = [process_cpu_seconds(pid) for pid in self.pids]
        if self._client is not None:
            self._redis = [redis_sample(self._client)]

    def stop(self) -> None:
        self._end = [process_cpu_seconds(pid) for pid in self.pids]
        if self._client is not None and self._redis:
            self._redis.append(redis_sample(self._client))
            self._client.close()

    def finish(self) -> None:
        if self._end:
            self._finish = [process_cpu_seconds(pid) for pid in self.pids]

    def redis_result(self) -> float | None:
        if len(self._redis) != 2:
            return None
        return round(self._redis[1].cpu_seconds - self._redis[0].cpu_seconds, 4)

    def redis_commands(self) -> dict[str, int] | None:
        """Calls of each command during the window (our own INFO calls left out)."""
        if len(self._redis) != 2:
            return None
        # Our own INFO calls: the start's commandstats and the stop's cpu (a command is
        # counted once it has run, so the stop's commandstats is not in its own answer).
        return command_delta(self._redis[0].calls, self._redis[1].calls, ours={"info": 2})

    def after_result(self) -> float | None:
        """The brokers' CPU seconds from the end of the window to ``finish``."""
        if not self._finish or len(self._finish) != len(self._end):
            return None
        return round(sum(self._finish) - sum(self._end), 4)

    def result(self) -> list[BrokerCpu]:
        if len(self._end) != len(self.pids) or len(self._start) != len(self.pids):
            return []
        return [
            BrokerCpu(pid=pid, cpu_seconds=round(end - start, 4))
            for pid, start, end in zip(self.pids, self._start, self._end, strict=True)
        ]


def run_throughput(config: ThroughputConfig, *, progress: bool = True) -> Report:
    """Run a throughput measurement and return its report."""
    loads = plan_workers(config)
    display = Progress(progress)
    sampler = BrokerSampler(config.broker_pids, config.redis_url)
    if len(loads) == 1:
        install_uvloop()
        results = [asyncio.run(_run_local(loads[0], config, sampler, display))]
    else:
        results = _run_processes(loads, config, sampler, display)
    display.done()
    return build_report(
        merge_results(results),
        placement=config.placement,
        urls=config.urls,
        window=config.window,
        payload_size=config.payload_size,
        target_rate=config.rate,
        processes=len(loads),
        broker_cpu=sampler.result(),
        redis_cpu_seconds=sampler.redis_result(),
        redis_commands=sampler.redis_commands(),
        resume=config.resume or config.detached,
        detached=config.detached,
        broker_cpu_resume_seconds=sampler.after_result() if config.detached else None,
    )


async def _run_local(
    load: LoadConfig, config: ThroughputConfig, sampler: BrokerSampler, display: Progress
) -> WorkerResult:
    worker = Worker(load)
    try:
        display.note(f"connecting {len(load.pairs)} pairs and {len(load.idle)} idle connections")
        await worker.setup(display.note)
        start_at = time.monotonic() + START_DELAY

        async def sample() -> None:
            await asyncio.sleep(start_at + config.warmup - time.monotonic())
            sampler.start()
            await asyncio.sleep(start_at + config.warmup + config.duration - time.monotonic())
            sampler.stop()

        async def show() -> None:
            while True:
                c = worker.counters
                phase = _phase(start_at, config.warmup, config.duration)
                display.counts(phase, c.sent, c.confirmed, c.delivered, c.failed + c.corrupt)
                await asyncio.sleep(0.5)

        sampling = asyncio.create_task(sample())
        showing = asyncio.create_task(show())
        try:
            result = await worker.run(start_at, config.warmup, config.duration)
            sampler.finish()
            await sampling
        finally:
            showing.cancel()
        return result
    finally:
        await worker.close()


# --- several generator processes ---------------------------------------------------------


def _worker_process(load_json: bytes, warmup: float, duration: float, pipe: Connection) -> None:
    """Entry point of a generator process (spawned)."""
    install_uvloop()
    try:
        asyncio.run(
            _worker_async(msgspec.json.decode(load_json, type=LoadConfig), warmup, duration, pipe)
        )
    except BaseException as exc:  # report anything to the parent, which fails the run
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


async def _worker_async(load: LoadConfig, warmup: float, duration: float, pipe: Connection) -> None:
    worker = Worker(load)
    try:
        await worker.setup()
        pipe.send(("ready", None))
        loop = asyncio.get_running_loop()
        start_at: float = await loop.run_in_executor(None, pipe.recv)

        async def report_progress() -> None:
            while True:
                c = worker.counters
                pipe.send(("progress", (c.sent, c.confirmed, c.delivered, c.failed + c.corrupt)))
                await asyncio.sleep(0.5)

        reporting = asyncio.create_task(report_progress())
        try:
            result = await worker.run(start_at, warmup, duration)
        finally:
            reporting.cancel()
        pipe.send(("result", msgspec.json.encode(result)))
    finally:
        await worker.close()


def _run_processes(
    loads: list[LoadConfig], config: ThroughputConfig, sampler: BrokerSampler, display: Progress
) -> list[WorkerResult]:
    context = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    processes = []
    for load in loads:
        parent, child = context.Pipe()
        process = context.Process(
            target=_worker_process,
            args=(msgspec.json.encode(load), config.warmup, config.duration, child),
            daemon=True,
        )
        process.start()
        child.close()
        pipes.append(parent)
        processes.append(process)
    try:
        display.note(f"connecting {config.pairs} pairs in {len(loads)} generator processes")
        _await_all(pipes, "ready", timeout=config.request_timeout * 3 + config.idle / 50)
        start_at = time.monotonic() + START_DELAY
        for pipe in pipes:
            pipe.send(start_at)
        window_start = start_at + config.warmup
        window_end = window_start + config.duration
        progress: dict[int, tuple[int, int, int, int]] = {}
        results: dict[int, WorkerResult] = {}
        started = stopped = False
        deadline = window_end + config.drain_timeout + 30.0
        while len(results) < len(pipes):
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError("generator processes did not report their results in time")
            if not started and now >= window_start:
                sampler.start()
                started = True
            if not stopped and now >= window_end:
                sampler.stop()
                stopped = True
            next_event = window_start if not started else window_end if not stopped else now + 0.5
            timeout = min(0.5, max(0.0, next_event - now))
            for ready in wait(pipes, timeout=timeout):
                assert isinstance(ready, Connection)
                index = pipes.index(ready)
                kind, value = _receive(ready)
                if kind == "progress":
                    progress[index] = value
                elif kind == "result":
                    results[index] = msgspec.json.decode(value, type=WorkerResult)
            if progress:
                sums = [sum(p[k] for p in progress.values()) for k in range(4)]
                display.counts(_phase(start_at, config.warmup, config.duration), *sums)
        if not stopped:  # pragma: no cover - results come after the window by construction
            sampler.stop()
        sampler.finish()
        return [results[i] for i in range(len(pipes))]
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


def _receive(pipe: Connection) -> tuple[str, Any]:
    try:
        kind, value = pipe.recv()
    except EOFError:
        raise RuntimeError("a generator process died") from None
    if kind == "error":
        raise RuntimeError(f"a generator process failed: {value}")
    return str(kind), value


def _await_all(pipes: list[Connection], expected: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(range(len(pipes)))
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"generator processes not {expected} after {timeout:.0f} s")
        for ready in wait([pipes[i] for i in waiting], timeout=remaining):
            assert isinstance(ready, Connection)
            kind, _ = _receive(ready)
            if kind == expected:
                waiting.discard(pipes.index(ready))


# --- idle connections --------------------------------------------------------------------


class IdleReport(msgspec.Struct, frozen=True, kw_only=True):
    """The figures of an idle run (what ``--json`` prints)."""

    mode: str
    urls: list[str]
    connections: int
    registered: int
    errors: int
    connect_seconds: float
    connects_per_second: float
    broker_rss_before: list[int]
    broker_rss_after: list[int]
    bytes_per_connection: float | None
    broker_pids: list[int]
    error_samples: list[str]


async def _run_idle(
    urls: list[str],
    count: int,
    *,
    pids: list[int],
    concurrency: int,
    settle: float,
    hold: float,
    request_timeout: float,
    display: Progress,
) -> IdleReport:
    counters = Counters()
    before = [process_rss_bytes(pid) for pid in pids]
    limit = asyncio.Semaphore(concurrency)
    endpoints = []
    failures = 0

    async def one(url: str) -> None:
        nonlocal failures
        async with limit:
            try:
                async with asyncio.timeout(request_timeout):
                    endpoints.append(await connect_registered(url, "bench-idle", counters))
            except (ConnectionLost, TimeoutError) as exc:  # counted and sampled, the run goes on
                failures += 1
                counters.error(f"{type(exc).__name__}: {exc}")
            if len(endpoints) % 500 == 0:
                display.note(f"registered {len(endpoints):,}/{count:,}")

    started = time.monotonic()
    await asyncio.gather(*(one(url) for url in place_idle(urls, count)))
    elapsed = time.monotonic() - started
    await asyncio.sleep(settle)
    after = [process_rss_bytes(pid) for pid in pids]
    if hold > 0:
        display.note(f"holding {len(endpoints):,} connections for {hold:g} s")
        await asyncio.sleep(hold)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5.0):
            await close_all([e.connection for e in endpoints])
    grown = sum(after) - sum(before)
    return IdleReport(
        mode="idle",
        urls=urls,
        connections=count,
        registered=len(endpoints),
        errors=failures + counters.failed + counters.corrupt,
        connect_seconds=round(elapsed, 3),
        connects_per_second=round(len(endpoints) / elapsed, 1) if elapsed > 0 else 0.0,
        broker_rss_before=before,
        broker_rss_after=after,
        bytes_per_connection=round(grown / len(endpoints), 1) if pids and endpoints else None,
        broker_pids=pids,
        error_samples=counters.errors,
    )


def run_idle(
    urls: list[str],
    count: int,
    *,
    pids: list[int],
    concurrency: int = 100,
    settle: float = 1.0,
    hold: float = 0.0,
    timeout: float = 10.0,
    progress: bool = True,
) -> IdleReport:
    """Open ``count`` registered connections; connect rate and the brokers' memory growth."""
    install_uvloop()
    display = Progress(progress)
    return asyncio.run(
        _run_idle(
            urls,
            count,
            pids=pids,
            concurrency=concurrency,
            settle=settle,
            hold=hold,
            request_timeout=timeout,
            display=display,
        )
    )
