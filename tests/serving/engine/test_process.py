"""serving/engine/process.py on a stand-in server: a Python ``http.server`` on 127.0.0.1 with a child in
its process group and a child in a session of its own that leaves an orphaned grandchild, as vLLM
(engine processes) and Ray (own-session processes) do. Every process writes what happens to it
(its pid, a SIGTERM received) into a folder the test reads."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from serving.engine.process import ServerProcess, ServerStartError, free_port, probe_health

# argv: PORT FOLDER MODE; MODE "exit-on-term" (exits 0 on SIGTERM) or "ignore-term".
DUMMY_SERVER = textwrap.dedent('''
    import http.server, os, signal, subprocess, sys, time
    from pathlib import Path

    port, out, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def on_term(signum, frame):
        (out / "leader.term").write_text("")
        if mode == "exit-on-term":
            os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    subprocess.Popen([sys.executable, "-c", sys.argv[4], str(out)])  # same group, like vLLM's engine
    subprocess.Popen([sys.executable, "-c", sys.argv[5], str(out), str(os.getpid())],
                     start_new_session=True)  # own session, like Ray's processes
    while not ((out / "grandchild.pid").exists() and (out / "child.pid").exists()):
        time.sleep(0.02)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    print("dummy server listening", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
''')

# In the leader's group: records a SIGTERM (the policy sends none to it) and keeps running; burns
# 0.5 s of CPU when "burn" appears, says "burnt", and exits when "exit" appears.
GROUP_CHILD = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda *a: (out / "child.term").write_text(""))
    (out / "child.pid").write_text(str(os.getpid()))
    while not (out / "burn").exists():
        time.sleep(0.02)
    start = time.process_time()
    while time.process_time() - start < 0.5:
        pass
    (out / "burnt").write_text("")
    while not (out / "exit").exists():
        time.sleep(0.02)
''')

# In a session of its own: starts a grandchild, then exits as soon as the leader is gone, so the
# grandchild is left with no parent of the server's (only the recorded tree still names it).
ESCAPED_CHILD = textwrap.dedent('''
    import os, subprocess, sys, time
    from pathlib import Path

    out, leader = Path(sys.argv[1]), int(sys.argv[2])
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (out / "escaped.pid").write_text(str(os.getpid()))
    (out / "grandchild.pid").write_text(str(grandchild.pid))
    while os.getppid() == leader:
        time.sleep(0.02)
''')


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


@pytest.fixture
def dummy(tmp_path):
    """make(mode, **kw) -> (ServerProcess, folder); whatever a failed test left running is killed."""
    made: list[tuple[ServerProcess, Path]] = []

    def make(mode: str = "exit-on-term", **kw) -> tuple[ServerProcess, Path]:
        out = tmp_path / f"run{len(made)}"
        out.mkdir()
        port = free_port()
        argv = [sys.executable, "-c", DUMMY_SERVER, str(port), str(out), mode, GROUP_CHILD, ESCAPED_CHILD]
        server = ServerProcess(argv, root_url=f"http://127.0.0.1:{port}", log_path=out / "server.log",
                               name="the dummy server", startup_timeout_s=60, **kw)
        made.append((server, out))
        return server, out

    yield make
    for server, out in made:
        server.stop()
        for name in ("child.pid", "escaped.pid", "grandchild.pid"):
            if (out / name).exists() and _alive(pid := int((out / name).read_text())):
                os.kill(pid, signal.SIGKILL)


def _pids(out: Path) -> dict[str, int]:
    return {name: int((out / f"{name}.pid").read_text()) for name in ("child", "escaped", "grandchild")}


def test_stop_sends_sigterm_to_the_leader_only_then_clears_group_and_escaped(dummy):
    server, out = dummy("exit-on-term")
    server.start()
    assert probe_health(server.root_url)
    leader, pids = server.pid, _pids(out)
    assert all(_alive(p) for p in (leader, *pids.values()))
    assert os.getpgid(pids["child"]) == leader  # the group is the leader's (start_new_session)
    assert os.getsid(pids["escaped"]) != os.getsid(leader)  # this one left it

    assert server.stop() == 0  # the leader exited on its own SIGTERM
    assert (out / "leader.term").exists()
    assert not (out / "child.term").exists(), "the engine-like child got SIGTERM: no drain"
    assert not _alive(leader)
    assert not _alive(pids["child"])  # SIGKILL to the group
    assert not _alive(pids["escaped"]) and not _alive(pids["grandchild"])  # found by the record
    assert server.stop() == 0  # a second stop changes nothing


def test_a_leader_that_ignores_sigterm_is_killed_after_the_timeout(dummy):
    server, out = dummy("ignore-term", stop_timeout_s=1.0)
    server.start()
    leader, pids = server.pid, _pids(out)
    started = time.monotonic()
    assert server.stop() == -signal.SIGKILL
    assert time.monotonic() - started >= 1.0  # it was given its time to drain
    assert (out / "leader.term").exists() and not (out / "child.term").exists()
    assert not any(_alive(p) for p in (leader, *pids.values()))


def test_cpu_time_counts_the_whole_tree_and_never_shrinks(dummy):
    server, out = dummy()
    with server:
        before = server.cpu_seconds()
        (out / "burn").write_text("")  # the group child, not the leader, does the work
        _wait_for(out / "burnt")
        after = server.cpu_seconds()
        assert after - before >= 0.4, (before, after)
        (out / "exit").write_text("")
        child, deadline = _pids(out)["child"], time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:  # a zombie: the leader never reaps it
            time.sleep(0.02)
        assert not _alive(child)
        assert server.cpu_seconds() >= after  # an exited process keeps its last reading


def test_a_server_that_exits_raises_with_its_log_tail(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("output of an earlier run\n")
    script = "import sys\nfor i in range(500): print('starting', i)\nprint('no config.json in /m')\nsys.exit(3)"
    server = ServerProcess([sys.executable, "-c", script], root_url=f"http://127.0.0.1:{free_port()}",
                           log_path=log, name="broken", append=True)
    with pytest.raises(ServerStartError, match="broken exited with code 3") as info:
        server.start()
    assert info.value.returncode == 3
    assert info.value.log_tail.rstrip().endswith("no config.json in /m")
    assert "no config.json in /m" in str(info.value)
    assert len(info.value.log_tail) <= 3000 and "earlier run" not in info.value.log_tail
    assert log.read_text().startswith("output of an earlier run")  # append kept it


def test_a_server_that_never_answers_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("loading a very large model", flush=True)
        time.sleep(600)
    """)
    server = ServerProcess([sys.executable, "-c", script], root_url=f"http://127.0.0.1:{free_port()}",
                           log_path=tmp_path / "server.log", name="slow", startup_timeout_s=10)
    try:
        with pytest.raises(ServerStartError, match="did not answer .*/health within 10 s") as info:
            server.start()
        assert info.value.returncode is None
        assert "loading a very large model" in info.value.log_tail
        assert not _alive(server.pid) and not _alive(child := int(pid_file.read_text()))
    finally:
        if pid_file.exists() and _alive(child := int(pid_file.read_text())):
            os.kill(child, signal.SIGKILL)


def test_free_port_is_bindable_on_loopback():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert not probe_health(f"http://127.0.0.1:{port}", timeout_s=0.5)
