"""Bounded jobs in worker processes: a job that runs past its time is stopped with its worker.

Decoding a photo and compiling a JSON schema are CPU-bound C code that a thread cannot
interrupt: a crafted file (a JPEG with 100,000 scans) or schema (nested pattern repetition)
holds a core for minutes. Here each such job runs in a worker process of a :class:`WorkerPool`;
past ``timeout_s`` the worker is killed (its CPU and memory come back at once), the job's caller
gets :class:`JobTimeout`, and a fresh worker takes its place. A worker that dies during a job
for a reason of the server's (killed from outside, by the OOM killer, or it could not start)
gives :class:`WorkerLost`, a 503 the caller may retry; one that crashes on the job's input
(a fault signal in a decoder) gives :class:`JobFailed`. Workers whose modules take
seconds to load (:data:`FORK_PER_JOB`) instead fork a child per job and kill the child. A job
can also run under a memory bound (``RLIMIT_AS`` above what the process holds) and at a lower
CPU priority.

The parent talks to each worker over its stdin/stdout with length-prefixed frames (a JSON
header and raw bytes), through asyncio's subprocess streams: no thread of the server waits on
a worker, and the default thread pool is not used. Jobs are the functions in :data:`JOBS`
(``python -m serving.api.workers KIND`` runs one worker). Nothing a job receives is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable

from serving.api.errors import ServerBusy
from serving.api.metrics import metrics

FRAME = struct.Struct(">IQ")  # header length, data length
READY = b"ready\n"  # a worker's first output, once its modules are loaded
START_TIMEOUT_S = 120.0


class JobTimeout(Exception):
    """The job ran past its time; its worker was stopped."""


class JobFailed(Exception):
    """The job crashed its worker (a fault signal: the input broke the decoder); a fresh worker
    replaces it. The job's fault: the same job would crash the next worker too."""


class WorkerLost(ServerBusy):
    """The worker stopped during the job for a reason of the server's, not the job's: killed by
    a signal from outside (an operator, the OOM killer), gone without a word, or it could not
    start. A 503: the same job may well succeed on the fresh worker that replaces it, so a
    live client retries and the Batch API runs the line again on a later pass."""


# How a worker that crashed on its input ends: the signals of a fault in native code. Any
# other end during a job (SIGKILL, SIGTERM, an exit) is the server's.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                           signal.SIGABRT})
EXIT_WAIT_S = 1.0  # how long to wait for a worker whose pipe closed to report how it ended


class JobError(Exception):
    """The job itself raised: ``kind`` names its exception class, ``message`` its text."""

    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param


class _Worker:
    """One worker process and asyncio streams over its pipes. The process is started with
    ``subprocess.Popen`` (a fork and exec, milliseconds) rather than asyncio's subprocess API,
    whose creation cannot be cancelled safely on Python 3.11: a stop must never wait."""

    def __init__(self, proc: subprocess.Popen, reader: asyncio.StreamReader,
                 read_transport: asyncio.ReadTransport, writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.reader = reader
        self.read_transport = read_transport
        self.writer = writer

    @classmethod
    async def start(cls, args: list[str]) -> _Worker:
        loop = asyncio.get_running_loop()
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=_worker_env(), close_fds=True)
        try:
            reader = asyncio.StreamReader(limit=2**16, loop=loop)
            read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), proc.stdout)
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                                proc.stdin)
            writer = asyncio.StreamWriter(transport, protocol, None, loop)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return cls(proc, reader, read_transport, writer)

    async def call(self, header: dict, data: bytes) -> tuple[dict, bytes]:
        head = json.dumps(header).encode()
        self.writer.write(FRAME.pack(len(head), len(data)))
        self.writer.write(head)
        self.writer.write(data)
        await self.writer.drain()
        size = await self.reader.readexactly(FRAME.size)
        head_len, data_len = FRAME.unpack(size)
        reply = json.loads(await self.reader.readexactly(head_len))
        return reply, await self.reader.readexactly(data_len)

    def stop(self) -> None:
        """Kill the process now and reap it (a killed process exits at once)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        # Through the transports, never the files: the event loop must forget the descriptors
        # before their numbers are reused by the next worker's pipes.
        with contextlib.suppress(Exception):
            self.writer.transport.abort()
        with contextlib.suppress(Exception):
            self.read_transport.close()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)


# A job's outcome in the metrics, by what it raised (anything else: its worker died).
OUTCOMES = {JobError: "refused", JobTimeout: "timeout"}


class WorkerPool:
    """Worker processes of one ``kind`` (a key of :data:`JOBS`), started on first use and kept;
    the caller bounds how many jobs run at once (at most ``size`` workers are kept idle)."""

    def __init__(self, kind: str, size: int, timeout_s: float, *, memory_mb: int | None = None,
                 nice: int = 0) -> None:
        if kind not in JOBS:
            raise ValueError(f"unknown worker kind {kind!r}")
        self.kind = kind
        self.size = size
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.nice = nice
        self._idle: list[_Worker] = []
        self._starting: set[asyncio.Task] = set()
        self._start_error: BaseException | None = None
        self.stopped = 0  # jobs stopped past their time, or workers dead: for tests and metrics

    async def run(self, header: dict, data: bytes = b"") -> tuple[dict, bytes]:
        """Run one job; its reply header and data. Raises :class:`JobTimeout`, :class:`JobFailed`,
        :class:`WorkerLost` or :class:`JobError`. Timed in the metrics, by outcome; a worker
        stopped past its time or found dead counts as a restart."""
        started, outcome, m = time.monotonic(), "cancelled", metrics()
        try:
            reply, outcome = await self._run(header, data), "ok"
            return reply
        except Exception as exc:
            outcome = OUTCOMES.get(type(exc), "died")
            if outcome != "refused":
                m.worker_restarts.inc((self.kind, outcome))
            raise
        finally:
            (m.decode_seconds if self.kind == "photo" else m.compile_seconds).observe(
                time.monotonic() - started, (outcome,))

    async def _run(self, header: dict, data: bytes) -> tuple[dict, bytes]:
        worker = await self._take()
        if self.kind in FORK_PER_JOB:
            header = dict(header, timeout_s=self.timeout_s, memory_mb=self.memory_mb or 0)
        try:
            # A forking worker bounds its job itself; this bound is then only a backstop.
            bound = self.timeout_s + (BACKSTOP_S if self.kind in FORK_PER_JOB else 0)
            async with asyncio.timeout(bound):
                reply, out = await worker.call(header, data)
        except TimeoutError:
            await self._replace(worker)
            raise JobTimeout(f"the job took longer than {self.timeout_s:g} s") from None
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
            code = await _exit_code(worker.proc)
            await self._replace(worker)
            if code is not None and code < 0 and -code in CRASH_SIGNALS:
                raise JobFailed(
                    f"the job crashed its worker ({signal.Signals(-code).name})") from None
            raise WorkerLost(self._lost(code)) from None
        except BaseException:  # cancelled mid-job: the pipe is mid-frame, so the worker goes
            await self._replace(worker)
            raise
        if len(self._idle) < self.size:
            self._idle.append(worker)
        else:
            worker.stop()
        if reply.get("error") == "JobTimeout":
            self.stopped += 1
            raise JobTimeout(f"the job took longer than {self.timeout_s:g} s")
        if "error" in reply:
            raise JobError(reply["error"], reply.get("message", ""), reply.get("param"))
        return reply, out

    async def _take(self) -> _Worker:
        """An idle worker; else one being started (a replacement, a prestart); else a new one."""
        while not self._idle:
            if not self._starting:
                self._start_error = None
                self._start_in_background()
            await asyncio.wait(set(self._starting), return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0)  # let the finished starts' callbacks run
            if not self._idle and self._start_error is not None:
                raise WorkerLost(f"the server's {self.kind} worker did not start; retry in "
                                 "1 s") from self._start_error
        worker = self._idle.pop()
        if worker.proc.poll() is not None:  # died while idle (e.g. killed from outside)
            worker.stop()
            return await self._take()
        return worker

    def _lost(self, code: int | None) -> str:
        how = ("its pipe closed" if code is None else
               f"killed by {signal.Signals(-code).name}" if code < 0 and -code in _SIGNALS else
               f"exit code {code}")
        return (f"the server's {self.kind} worker stopped during this request ({how}); that is "
                "the server's fault, not the request's: retry in 1 s")

    def prestart(self) -> None:
        """Start the workers now, in the background, so that the first jobs find them ready."""
        for _ in range(self.size - len(self._idle) - len(self._starting)):
            self._start_in_background()

    async def close(self) -> None:
        for task in list(self._starting):
            task.cancel()
        while self._idle:
            self._idle.pop().stop()

    async def _spawn(self) -> _Worker:
        args = [sys.executable, "-m", "serving.api.workers", self.kind,
                str(self.memory_mb or 0), str(self.nice)]
        worker = await _Worker.start(args)
        try:  # a job's time starts once the worker has loaded its modules
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = await worker.reader.readexactly(len(READY))
        except BaseException:
            worker.stop()
            raise
        if ready != READY:
            worker.stop()
            raise JobFailed(f"a {self.kind} worker did not start")
        return worker

    async def _replace(self, worker: _Worker) -> None:
        self.stopped += 1
        worker.stop()
        self._start_in_background()

    def _start_in_background(self) -> None:
        async def start():
            worker = await self._spawn()
            if len(self._idle) < self.size:
                self._idle.append(worker)
            else:
                worker.stop()

        task = asyncio.get_running_loop().create_task(start())
        self._starting.add(task)

        def finished(task: asyncio.Task) -> None:
            self._starting.discard(task)
            if not task.cancelled() and task.exception() is not None:
                self._start_error = task.exception()  # a waiter in _take reports it

        task.add_done_callback(finished)


_SIGNALS = {int(s) for s in signal.Signals}


async def _exit_code(proc: subprocess.Popen) -> int | None:
    """How a worker whose pipe closed ended (negative: the signal), once it has; None if it
    has not within :data:`EXIT_WAIT_S`."""
    deadline = time.monotonic() + EXIT_WAIT_S
    while (code := proc.poll()) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return code


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per worker: the pool's size is its parallelism.
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# --- the worker side ------------------------------------------------------------------------


def _photo_job(header: dict, data: bytes) -> tuple[dict, bytes]:
    """A photo (raw bytes, or a data URL's ASCII text) -> the data URL the engine gets."""
    # Loaded in the photo worker only (PIL and the preprocessing), not by the server's import.
    from serving.api.media import forward_photo, photo_from_data_url
    from serving.api.policy import PhotoLimits

    limits, where = PhotoLimits(**header["limits"]), header["where"]
    if header.get("data_url"):
        url = photo_from_data_url(data.decode("ascii", "replace"), limits, where)
    else:
        url = forward_photo(data, limits, where)
    return {}, url.encode("ascii")


def _schema_job(header: dict, data: bytes) -> tuple[dict, bytes]:
    """Compile a JSON schema's grammar as the server's vLLM does (both whitespace modes)."""
    import xgrammar as xgr

    text = data.decode("utf-8")
    try:
        # The API server builds the grammar with xgrammar's defaults (any whitespace), the
        # engine without extra whitespace and compiles it against its vocabulary.
        xgr.Grammar.from_json_schema(text)
        grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False)
        info = xgr.TokenizerInfo(['"', "{", "}", "[", "]", ":", ",", " ", "a", "0"])
        xgr.GrammarCompiler(info, max_threads=1).compile_grammar(grammar)
    except MemoryError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with C++ detail
        return {"reason": str(exc).splitlines()[0][-160:] or type(exc).__name__}, b""
    return {"reason": None}, b""


JOBS: dict[str, Callable[[dict, bytes], tuple[dict, bytes]]] = {
    "photo": _photo_job,
    "schema": _schema_job,
}
# Imported before the memory bound is set, so that the bound counts only a job's own use.
PRELOAD = {"photo": ("serving.api.media", "serving.api.policy"), "schema": ("xgrammar",)}
# Kinds whose worker forks a child per job and stops the child past its time and memory,
# keeping itself: their modules take seconds to load (xgrammar loads torch), a fork takes
# milliseconds. Photo workers load in a fraction of a second and are replaced instead.
FORK_PER_JOB = {"schema"}
BACKSTOP_S = 5.0


def _read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _limit_memory(extra_mb: int) -> None:
    import resource

    with open("/proc/self/statm") as f:
        vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vsize + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _run_forked(job, header: dict, data: bytes) -> tuple[dict, bytes]:
    """Run ``job`` in a forked child under the header's time and memory bounds."""
    import select
    import signal

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one job, its reply on the pipe, then gone
        os.close(read_fd)
        code = 0
        try:
            if header.get("memory_mb"):
                _limit_memory(header["memory_mb"])
            reply, out = _run_job(job, header, data)
            payload = json.dumps(reply).encode()
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(FRAME.pack(len(payload), len(out)) + payload + out)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + header["timeout_s"]
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return {"error": "JobTimeout"}, b""
            chunk = os.read(read_fd, 2**16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    raw = b"".join(chunks)
    if len(raw) < FRAME.size:  # the child died: over its memory bound, or worse
        return {"error": "MemoryError", "message": "the job needs too much memory"}, b""
    head_len, _ = FRAME.unpack(raw[:FRAME.size])
    return json.loads(raw[FRAME.size:FRAME.size + head_len]), raw[FRAME.size + head_len:]


def _run_job(job, header: dict, data: bytes) -> tuple[dict, bytes]:
    try:
        return job(header, data)
    except MemoryError:
        return {"error": "MemoryError", "message": "the job needs too much memory"}, b""
    except Exception as exc:
        return {"error": type(exc).__name__, "message": getattr(exc, "message", None)
                or type(exc).__name__, "param": getattr(exc, "param", None)}, b""


def worker_main(kind: str, memory_mb: int, nice: int) -> None:
    import importlib

    job = JOBS[kind]
    for module in PRELOAD.get(kind, ()):
        importlib.import_module(module)
    if nice:
        os.nice(nice)
    forking = kind in FORK_PER_JOB
    if memory_mb and not forking:
        _limit_memory(memory_mb)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing a job prints may corrupt the frames
    stdout.write(READY)
    stdout.flush()
    while True:
        try:
            head_len, data_len = FRAME.unpack(_read_exactly(stdin, FRAME.size))
            header = json.loads(_read_exactly(stdin, head_len))
            data = _read_exactly(stdin, data_len)
        except EOFError:
            return
        reply, out = _run_forked(job, header, data) if forking else _run_job(job, header, data)
        del data
        head = json.dumps(reply).encode()
        stdout.write(FRAME.pack(len(head), len(out)))
        stdout.write(head)
        stdout.write(out)
        stdout.flush()


if __name__ == "__main__":
    worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
