"""One server process: start it, wait for ``GET /health``, account its CPU time, stop it.

Used by ``skingpt4 demo``, the benchmark harness (``benchmarks/targets.py``) and the tests, so
every server this project starts is started and stopped by the same rules.

Start: the command runs in a session of its own (``start_new_session=True``: its process group id
is the leader's pid), with stdout and stderr in a log file. Until ``/health`` answers 200 the
process is polled; if it exits or the time runs out, everything it started is stopped and
:class:`ServerStartError` is raised with the tail of its log.

Stop, one policy:

1. SIGTERM to the leader only. vLLM's API server then drains in-flight requests and shuts its
   engine processes down itself; a SIGTERM to the whole group would stop the engine under the
   requests still being drained.
2. Wait for the leader, at most ``stop_timeout_s``.
3. SIGKILL to the whole process group: whatever the leader left behind.
4. SIGKILL to every descendant that left the group (Ray starts its processes in sessions of their
   own). They are found with psutil among the process tree recorded while the server ran (and
   their own children), because once their parent is gone nothing else links them to the server.

CPU time (:meth:`ServerProcess.cpu_seconds`) is the user + system time of that whole recorded
tree; a process that has exited keeps counting with its last reading, so the total only grows.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

import psutil

LOG_TAIL_CHARS = 3000
_POLL_S = 0.5
_REAP_TIMEOUT_S = 5.0
# Health probes go straight to the server, never through a proxy named in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """A server that exited, or did not answer ``/health`` in time, while starting.

    ``log_tail`` is the end of what it wrote; ``returncode`` is None when it was still running.
    """

    def __init__(self, message: str, log_tail: str = "", returncode: int | None = None) -> None:
        super().__init__(f"{message}\n--- end of the server log ---\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail
        self.returncode = returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def probe_health(root_url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET {root_url}/health`` answers 200 (``/health`` never needs the API key)."""
    try:
        with _DIRECT.open(f"{root_url}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, not HTTP, 4xx/5xx
        return False


class ServerProcess:
    """A server command in its own session; a context manager that starts, waits and stops.

    ``root_url`` is where ``/health`` is probed (``http://127.0.0.1:PORT``). ``append`` keeps what
    the log file already holds; the log tail of an error is only this start's output either way.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        root_url: str,
        log_path: Path,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "server",
        startup_timeout_s: float = 300.0,
        stop_timeout_s: float = 60.0,
        probe_timeout_s: float = 2.0,
        append: bool = False,
    ) -> None:
        self.argv = tuple(argv)
        self.root_url = root_url.rstrip("/")
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.append = append
        self.popen: subprocess.Popen | None = None
        self._log_start = 0
        self._seen: dict[int, psutil.Process] = {}  # pid -> process, every descendant recorded
        self._cpu: dict[int, float] = {}  # pid -> its last CPU seconds reading
        self._labels: dict[int, str] = {}  # pid -> process_label

    # --- start --------------------------------------------------------------------------------

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> ServerProcess:
        """Launch, then wait until healthy; on any failure stop what was started, then raise."""
        self.launch()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        if self.popen is not None:
            raise RuntimeError(f"{self.name} was already started (pid {self.popen.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab" if self.append else "wb") as log:
            self._log_start = log.tell()
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._seen = {self.popen.pid: psutil.Process(self.popen.pid)}
        self._cpu.clear()
        self._labels.clear()

    def wait_healthy(self) -> None:
        """Until ``/health`` answers 200; :class:`ServerStartError` if the process exits first or
        the start-up time runs out."""
        proc = self._require_popen()
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            self._record_tree()
            if proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {proc.returncode} while starting "
                    f"(log: {self.log_path})", self.log_tail(), proc.returncode)
            if probe_health(self.root_url, self.probe_timeout_s):
                self._record_tree()  # what it started before it became ready
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} did not answer {self.root_url}/health within "
                    f"{self.startup_timeout_s:.0f} s (log: {self.log_path})", self.log_tail())
            time.sleep(_POLL_S)

    # --- while running ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._require_popen().pid

    def poll(self) -> int | None:
        return self._require_popen().poll()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters this start wrote to the log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the whole process tree since it started (exited
        processes count with their last reading)."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[str, float]:
        """:meth:`cpu_seconds` by kind of process (:func:`process_label`: the API server, the
        engine core, a photo worker, Ray's daemons and actors...), summed over processes of a
        kind."""
        for pid, p in self._record_tree().items():
            try:
                t = p.cpu_times()
                if pid not in self._labels:
                    self._labels[pid] = "server" if pid == self.popen.pid else process_label(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self._cpu[pid] = t.user + t.system
        totals: dict[str, float] = {}
        for pid, seconds in self._cpu.items():
            label = self._labels.get(pid, "other")
            totals[label] = totals.get(label, 0.0) + seconds
        return totals

    def _record_tree(self) -> dict[int, psutil.Process]:
        """Add the live descendants of every recorded process (the leader first; then also the
        children of processes that left the group) to the record; return the live ones."""
        if self.popen is None:
            return {}
        children: dict[int, list[psutil.Process]] = {}
        for p in psutil.process_iter(["ppid"]):  # one scan of the process table per call
            children.setdefault(p.info["ppid"], []).append(p)
        live: dict[int, psutil.Process] = {}
        stack = [p for p in self._seen.values() if _running(p)]
        while stack:
            p = stack.pop()
            if p.pid in live:
                continue
            live[p.pid] = p
            stack.extend(children.get(p.pid, ()))
        self._seen.update(live)
        return live

    # --- stop ---------------------------------------------------------------------------------

    def stop(self) -> int | None:
        """The stop policy of the module docstring; returns the leader's exit code (None if it
        was never started). Safe to call more than once."""
        proc = self.popen
        if proc is None:
            return None
        self._record_tree()
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)  # the leader only: it drains, then ends its children
            except ProcessLookupError:
                pass
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._record_tree()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # pgid == leader pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        self._reap_escaped()
        return proc.returncode

    def _reap_escaped(self) -> None:
        """SIGKILL recorded descendants still alive (and their children), then wait for them."""
        leftover = [p for pid, p in self._record_tree().items()
                    if pid != self.popen.pid and not _zombie(p)]  # a zombie is dead already
        for p in leftover:
            try:
                p.kill()  # psutil checks that the pid still belongs to the recorded process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        psutil.wait_procs(leftover, timeout=_REAP_TIMEOUT_S)

    def _require_popen(self) -> subprocess.Popen:
        if self.popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self.popen


def process_label(p: psutil.Process) -> str:
    """What a process of a server's tree is: its process title where it set one (Ray's
    ``ray::ServeReplica:APP:DEPLOYMENT``, ``ray::ProxyActor``, vLLM's ``VLLM::EngineCore``), the
    module a Python process runs (``-m serving.api.workers photo``), else its program name."""
    try:
        cmd = p.cmdline()
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "other"
    first = cmd[0] if cmd else name
    if first.startswith(("ray::", "VLLM::")):
        return first.split()[0]
    if "-m" in cmd[:-1]:
        return " ".join(["-m", *cmd[cmd.index("-m") + 1:cmd.index("-m") + 3]])
    return name or Path(first).name


def _running(p: psutil.Process) -> bool:
    """Alive, and its pid not reused by another process since it was recorded."""
    try:
        return p.is_running()
    except psutil.Error:
        return False


def _zombie(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True  # gone
