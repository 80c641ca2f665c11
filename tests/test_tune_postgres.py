"""tune.py on a real PostgreSQL server, as the README runs it on several machines.

The test starts a throwaway cluster of its own (initdb into a temp dir, as an unprivileged user when run as
root; listening only on 127.0.0.1 on a free port, its unix socket in the temp dir; password authentication,
so the URL carries a password that must never be printed) and stops it at the end, even on failure. Two
tune.py processes start at the same moment on the fresh database; one is killed with SIGKILL in the middle
of a trial (the test orders the events: the other is paused meanwhile, so neither machine's speed decides who
runs what); the other's Optuna heartbeat finds the dead trial and runs it again; the killed one is started
again (in the test's own process, which saves an interpreter start). It skips only where no PostgreSQL
server binary is installed (.ci/run installs Debian's postgresql).
"""
import contextlib
import glob
import io
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest

from tests.helpers import ROOT, free_port, tiny_study_inputs

pytestmark = pytest.mark.faults


def server_bin() -> Path | None:
    """The folder of PostgreSQL's initdb / pg_ctl (Debian: /usr/lib/postgresql/<version>/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def as_server_user(command: list) -> list:
    """PostgreSQL refuses to run as root: run as the `postgres` system user (or nobody) then."""
    if os.geteuid() != 0:
        return command
    user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
    assert user, "running as root, and no postgres or nobody user to run the server as"
    return ["runuser", "-u", user, "--", *command] if shutil.which("runuser") else \
        ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups", *command]


def _user_exists(name) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def postgres():
    """A fresh PostgreSQL cluster on 127.0.0.1 with a password user; yields a URL maker for new databases."""
    bindir = server_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binary (initdb) found: apt-get install postgresql, as .ci/run does")
    home = Path(tempfile.mkdtemp(prefix="mtl-pg-"))  # NOTE: not under pytest's tmp (mode 700, root's)
    password = "pw-" + secrets.token_hex(8)
    (home / "pw").write_text(password + "\n")
    if os.geteuid() == 0:
        user = "postgres" if _user_exists("postgres") else "nobody"
        shutil.chown(home, user)
        shutil.chown(home / "pw", user)
    data, port = home / "data", free_port()
    subprocess.run(as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", "tuner", "--pwfile", str(home / "pw"),
                                   "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"]),
                   check=True, capture_output=True, cwd=home)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off -c synchronous_commit=off"
    started = subprocess.run(as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w",
                                             "-o", options, "start"]), capture_output=True, text=True, cwd=home,
                             check=False)
    try:
        log = (home / "log").read_text() if (home / "log").exists() else ""
        assert started.returncode == 0, f"pg_ctl start failed: {started.stderr}\n{log[-2000:]}"
        import psycopg

        def database(name):
            with psycopg.connect(host="127.0.0.1", port=port, user="tuner", password=password, dbname="postgres",
                                 autocommit=True) as connection:
                connection.execute(f'CREATE DATABASE "{name}"')
            return f"postgresql://tuner:{password}@127.0.0.1:{port}/{name}"
        database.password = password
        yield database
    finally:
        subprocess.run(as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, cwd=home, check=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory, cache_dir):
    """20 synthetic people at 40x52 and a 1-epoch test_efficientnet config (the default search space)."""
    data, base = tiny_study_inputs(tmp_path_factory.mktemp("pg_tune"), seed=2, epochs=1)
    return {"data": data, "config": base, "cache": cache_dir}


def argv(files, storage, out):
    """One machine's tune.py arguments: --trials 6, heartbeats every second, dead after 3 s without one."""
    return ["--config", str(files["config"]), "--data", str(files["data"]), "--cache-dir", str(files["cache"]),
            "--out", str(out), "--storage", storage, "--trials", "6", "--pruner", "none", "--no-pretrained",
            "--loader-workers", "0", "--heartbeat-interval", "1", "--heartbeat-grace", "3"]


def start(files, storage, out, log):
    """One machine's `tune.py` (a real process), its output into `log`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "tune.py", *argv(files, storage, out)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def run_here(argv_list) -> tuple[int, str]:
    """tune.py's main in this process (saves an interpreter start): its exit code and everything it printed."""
    import tune
    from mtl.cli import main_guard
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            main_guard(lambda: tune.main(argv_list))
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, printed.getvalue()


def wait_for(condition, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.2)


def running_trial_of(study, pid):
    """The number of the trial process `pid` is running past its sampling, per the study's storage (its worker record
    and its config, recorded once every value is drawn), or None."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if isinstance(worker, dict) and worker.get("pid") == pid and worker.get("trial") == t.number \
                and "config" in t.user_attrs:  # NOTE: a trial killed mid-sampling has only some of its values
            return t.number
    return None


@pytest.mark.slow
def test_two_machines_share_a_study_on_postgresql_and_one_dies(postgres, files, tmp_path):
    storage = postgres("study")
    outs = {name: tmp_path / name for name in ("a", "b")}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("a", "b")}  # noqa: SIM115
    procs, paused = {}, False
    try:
        procs = {name: start(files, storage, outs[name], logs[name]) for name in ("a", "b")}  # at the same moment
        # NOTE: the order of events is set by the test, not by the machine's speed: A is paused in its first trial
        # (so it cannot run the whole study before B starts one, nor end before B's trial goes stale), B is frozen
        # while the storage shows it running a trial, then killed; A goes on once that trial's heartbeat is stale
        wait_for(lambda: list(outs["a"].glob("trials/*/config.yaml")) or procs["a"].poll() is not None, "A's trial")
        assert procs["a"].poll() is None, (tmp_path / "a.log").read_text()[-3000:]
        procs["a"].send_signal(signal.SIGSTOP)
        paused = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # NOTE: the machines' heartbeat settings, to read staleness as they judge it (this process fails nothing)
            watcher = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=3)
        study = optuna.load_study(study_name="mtl", storage=watcher)
        killed = None
        while killed is None:
            wait_for(lambda: running_trial_of(study, procs["b"].pid) is not None or procs["b"].poll() is not None,
                     "B's trial")
            assert procs["b"].poll() is None, (tmp_path / "b.log").read_text()[-3000:]
            procs["b"].send_signal(signal.SIGSTOP)
            killed = running_trial_of(study, procs["b"].pid)  # None: B finished that trial just before it froze
            if killed is None:
                procs["b"].send_signal(signal.SIGCONT)
        procs["b"].send_signal(signal.SIGKILL)
        procs["b"].wait()

        def state(number):
            return next(t for t in study.get_trials(deepcopy=False) if t.number == number).state.name

        # B's trial goes stale (no heartbeat for --heartbeat-grace 3 s) as Optuna's storage judges it
        killed_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == killed)
        wait_for(lambda: killed_id in study._storage._get_stale_trial_ids(study._study_id), "B's trial to go stale")
        procs["a"].send_signal(signal.SIGCONT)
        paused = False
        # A fails the dead trial at its next heartbeat check: the next trial it starts, or before it ends
        wait_for(lambda: state(killed) != "RUNNING" or procs["a"].poll() is not None, "A to fail the dead trial")
        assert state(killed) == "FAIL", "A's heartbeat check should have failed the trial of the killed process"
        # B started again: here, in this process, while A runs on
        code_b2, again = run_here(argv(files, storage, outs["b"]))
        (tmp_path / "b2.log").write_text(again)
        codes = {"a": procs["a"].wait(timeout=600), "b2": code_b2}
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                if paused:
                    proc.send_signal(signal.SIGCONT)
                proc.kill()
        for log in logs.values():
            log.close()
    printed = {name: (tmp_path / f"{name}.log").read_text() for name in ("a", "b", "b2")}
    assert codes == {"a": 0, "b2": 0}, printed["a"][-3000:] + printed["b2"][-3000:]
    trials = optuna.load_study(study_name="mtl", storage=storage).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING", "PRUNED")]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 6  # none trained twice
    dead = trials[killed]
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == killed)  # run again, same values
    assert dead.state.name == "FAIL" and retry.params == dead.params
    assert "its worker died" in printed["a"]  # A's heartbeat check, while B was down
    for out in outs.values():  # every machine's own outputs list the whole study
        table = pd.read_csv(out / "trials.csv").set_index("number")
        assert (table["state"] == "COMPLETE").sum() in (5, 6) and table.loc[killed, "state"] == "FAIL"
        assert f"run again as trial {retry.number}" in table.loc[killed, "fail_reason"]
    last = pd.read_csv(max(outs.values(), key=lambda o: (o / "trials.csv").stat().st_mtime) / "trials.csv")
    assert (last["state"] == "COMPLETE").sum() == 6
    shown = storage.replace(postgres.password, "***")
    assert f"in {shown}:" in printed["a"]  # the URL is printed with its password masked ...
    for text in [*printed.values(), *(p.read_text(errors="replace") for o in outs.values() for p in o.rglob("*")
                                      if p.is_file() and p.suffix in (".csv", ".yaml", ".log", ".txt", ""))]:
        assert postgres.password not in text  # ... and never in the clear, in no log or output file
