"""The processes a command starts, on real processes (issue 14, item 5): ``dse dashboard`` stops its Streamlit server
when it is itself stopped by SIGTERM or SIGINT; ``dse start`` stopped by SIGTERM re-queues its interrupted trial and
leaves no Ray process behind; the local Ray it starts listens on the loopback interface only and keeps its messages
off stdout; ``dse status | head`` ends quietly."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import psutil
import pytest
import yaml

from helpers import free_port, small_spec, start_dashboard, stop

DSE = [sys.executable, "-m", "dse.cli"]
TERMINATED = "terminated; the study keeps every completed trial"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listening(procs) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and bound UDP socket of ``procs``."""
    found = []
    for proc in procs:
        try:
            name, sockets = proc.name(), proc.net_connections(kind="inet")
        except psutil.Error:  # exited meanwhile
            continue
        found += [(name, s.laddr.ip, s.laddr.port) for s in sockets
                  if s.status == psutil.CONN_LISTEN or (s.status == psutil.CONN_NONE and s.laddr)]
    return found


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def port_listened(port: int) -> bool:
    return any(s.laddr and s.laddr.port == port and s.status == psutil.CONN_LISTEN
               for s in psutil.net_connections(kind="tcp"))


def wait_for(condition, timeout_s: float, what: str, proc=None, log=None):
    """Poll ``condition`` until it returns something true; fail naming ``what`` (with the log's tail) after
    ``timeout_s`` seconds or when ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        assert proc is None or proc.poll() is None, f"exited {proc.returncode} before {what}:\n{tail}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s:\n{tail}"
        time.sleep(0.3)


# ---------------------------------------------------------------------------------------------- dashboard
@pytest.fixture
def storage_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(study_name="empty", storage=url)
    return url


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_dashboard_stops_its_streamlit_server(storage_url, tmp_path, signum, status):
    """The signal goes to the ``dse dashboard`` process only (as ``docker stop``, systemd or ``kill`` send it): it
    exits within seconds with 128 + the signal's number, its Streamlit child is gone and nothing listens on the
    port any more."""
    port = free_port()
    server = start_dashboard(storage_url, port, tmp_path / "dashboard.log")
    try:
        children = psutil.Process(server.pid).children(recursive=True)
        assert children and port_listened(port), "the Streamlit server runs as a child process"
        os.kill(server.pid, signum)
        assert server.wait(timeout=15) == status, (tmp_path / "dashboard.log").read_text()[-2000:]
        assert not [c.pid for c in children if alive(c.pid)], "the Streamlit server outlived dse dashboard"
        assert not port_listened(port)
    finally:
        stop(server)


# ---------------------------------------------------------------------------------------------- dse status | head
def test_status_into_a_closed_pipe_ends_quietly(tmp_path):
    """``dse status | head -1`` (the reader gone before the table is written): exit 141, as a command killed by
    SIGPIPE reports it, and nothing on stderr (no BrokenPipeError traceback)."""
    from dse.cli import main

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    data = small_spec(url, "piped", trials=3)
    data.update(objectives=[{"name": "decode_tokens_per_s"}, {"name": "j_per_token"}], constraints=[],
                promotion={"every": 0, "final": False})
    spec = tmp_path / "piped.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["start", str(spec), "--no-progress"]) == 0  # hardware-only: the cost model alone, no Ray
    read, write = os.pipe()
    proc = subprocess.Popen([*DSE, "status", "piped", "--storage", url], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    os.close(read)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.decode()) == (141, "")


# ---------------------------------------------------------------------------------------------- dse start
def ray_session(procs) -> str | None:
    """The Ray session directory name (``session_<date>_<pid>``) in the command lines of ``procs``."""
    for proc in procs:
        try:
            match = re.search(r"session_\d{4}-\d\d-\d\d_[\d_-]+", " ".join(proc.cmdline()))
        except psutil.Error:
            continue
        if match:
            return match.group(0)
    return None


def actor_process(driver: psutil.Process):
    return next((p for p in driver.children(recursive=True) if p.name().startswith("ray::Evaluator")), None)


@pytest.fixture(scope="module")
def stopped_driver(tmp_path_factory):
    """A real ``dse start`` (local Ray, one evaluator actor, the default model, SQLite) observed and stopped:
    once a trial is RUNNING on the actor, the listening sockets of its process tree are recorded, the actor's
    process is SIGKILLed (Ray restarts it and pushes ``(raylet) A worker died ...`` to the driver, the message
    that used to land on stdout), and once the actor is back the driver gets SIGTERM (its process only)."""
    root = tmp_path_factory.mktemp("sigterm")
    url = f"sqlite:///{root / 'studies.db'}"
    data = small_spec(url, "sigterm", trials=20)
    data.update(workers=1, heartbeat_s=1, constraints=[], proxy={"windows": 1, "seq_len": 32},
                promotion={"every": 0, "final": False}, warm_start={"baselines": False})
    spec = root / "sigterm.yaml"
    spec.write_text(yaml.safe_dump(data))
    out, err = root / "stdout.txt", root / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([*DSE, "start", str(spec), "--no-progress"], stdout=stdout, stderr=stderr,
                                start_new_session=True, cwd=root,
                                env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        driver = psutil.Process(proc.pid)

        def running():
            try:
                trials = optuna.load_study(study_name="sigterm", storage=url).get_trials(deepcopy=False)
            except Exception:  # the study or its tables do not exist yet
                return None
            return [t for t in trials if t.state.name == "RUNNING"] if actor_process(driver) else None

        wait_for(running, 300, "trial RUNNING on an actor", proc, err)
        tree = [driver, *driver.children(recursive=True)]
        sockets = listening(tree)
        first = actor_process(driver)
        first.kill()
        wait_for(lambda: (actor_process(driver) or first).pid != first.pid, 120, "restarted actor", proc, err)
        time.sleep(3)  # the raylet's message reaches the driver
        interrupted = running()
        tree = [driver, *driver.children(recursive=True)]
        session = ray_session(tree)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            status = None
        elapsed = time.monotonic() - started
        time.sleep(2)  # what the driver stopped has a moment to go
        left = [p for p in tree[1:] if alive(p.pid)]
        left += [p for p in psutil.process_iter() if p not in left and session and session in " ".join(
            _cmdline(p))]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    yield {"status": status, "elapsed": elapsed, "sockets": sockets, "left": left, "session": session,
           "interrupted": interrupted, "trials": optuna.load_study(study_name="sigterm", storage=url).get_trials(),
           "stdout": out.read_text(), "stderr": err.read_text()}
    for p in left:  # a failing test leaves nothing running either
        try:
            p.kill()
        except psutil.Error:
            pass


def _cmdline(proc) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


@pytest.mark.slow
def test_local_ray_listens_on_the_loopback_interface_only(stopped_driver):
    """Every socket the driver's process tree listens on (its own, GCS, raylet and object manager, dashboard and
    runtime-env agents, metrics, the evaluator actor) is bound to 127.0.0.1 (or its IPv4-mapped IPv6 form)."""
    sockets = stopped_driver["sockets"]
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::Evaluator") for n in names), sockets
    assert [s for s in sockets if not loopback(s[1])] == []


@pytest.mark.slow
def test_sigterm_stops_the_driver_and_its_local_ray(stopped_driver):
    """``dse start`` stopped by SIGTERM exits within seconds with 143 and the one line saying so, and no process
    of its local Ray (GCS, raylet, workers, agents: its children, or any process naming its session) is left."""
    assert stopped_driver["session"], "the Ray session was not found in the driver's process tree"
    assert stopped_driver["status"] == 143 and stopped_driver["elapsed"] < 30, stopped_driver["stderr"][-3000:]
    assert stopped_driver["stderr"].strip().splitlines()[-1] == TERMINATED
    assert "Traceback" not in stopped_driver["stderr"]
    assert [f"{p.pid} {_cmdline(p)[:2]}" for p in stopped_driver["left"]] == []


@pytest.mark.slow
def test_sigterm_requeues_the_interrupted_trial(stopped_driver):
    """The trial running when SIGTERM came is FAIL ("driver stopped") and its parameters are enqueued again (a
    WAITING trial whose ``failed_trial`` names it); nothing is left RUNNING."""
    trials = stopped_driver["trials"]
    assert "RUNNING" not in [t.state.name for t in trials]
    stopped = [t for t in trials if t.state.name == "FAIL" and t.user_attrs.get("error") == "driver stopped"]
    assert stopped, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    for old in stopped:
        retry = [t for t in trials if t.system_attrs.get("failed_trial") == old.number]
        assert [t.state.name for t in retry] == ["WAITING"] and retry[0].params == old.params
    running_then = {t.number for t in stopped_driver["interrupted"]}  # RUNNING just before the signal
    assert running_then <= {t.number for t in stopped} | {t.number for t in trials if t.state.name == "COMPLETE"}


@pytest.mark.slow
def test_ray_messages_stay_off_stdout(stopped_driver):
    """Even with an actor killed (Ray's ``(raylet) A worker died ...`` message to the driver), ``dse start`` writes
    no Ray line on stdout: the message is in the session's log files."""
    stdout = stopped_driver["stdout"]
    assert not re.search(r"raylet|\(pid=|ray::|worker\.py|gcs_server", stdout), stdout[-3000:]
    assert not stdout.strip(), "an interrupted run prints no result table"
