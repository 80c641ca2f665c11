"""tune.py under faults (run alone: pytest -m faults): a study killed with SIGKILL and interrupted with SIGINT
in the middle of trials (real processes) loses no finished trial, runs the killed trial again, cleans what the
kill left behind (last.pt, unfinished .tmp writes), and the rerun ends with exactly --trials finished trials.
Each signal lands at a known moment, on a fast machine or a busy one: the process stops itself between a trial's
first and second epoch (tests/stop_runner.py) and waits there for the test.
"""
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest

from tests.helpers import ROOT, tiny_study_inputs

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def command(tmp_path_factory, cache_dir):
    """tune.py's command line on 20 synthetic people at 40x52, 2 epochs a trial, for a study in `out`."""
    data, base = tiny_study_inputs(tmp_path_factory.mktemp("tune_faults"), seed=3, epochs=2)

    def make(out):
        return ["--config", str(base), "--data", str(data), "--cache-dir", str(cache_dir), "--out", str(out),
                "--trials", "2", "--pruner", "none", "--loader-workers", "0"]
    return make


def start(argv, log, skip=()):
    """tune.py ARGV in a real process that stops itself right after the first epoch of a trial not in `skip`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    skip_text = ",".join(str(n) for n in sorted(skip)) or "-"
    return subprocess.Popen([sys.executable, "-m", "tests.stop_runner", skip_text, "tune.py", *argv], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def stopped_mid_trial(proc, out, timeout=600) -> int:
    """Wait for the process to stop at its pause point (tests/stop_runner.py); return the trial it stopped in.

    The bound only ends a wait for an event that did not come (the stop, or an early end); no clock decides when the
    signal lands: the process is frozen between a trial's first and second epoch until the test acts.
    """
    deadline = time.time() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid and os.WIFSTOPPED(status):
            break
        assert not pid, f"tune.py ended (wait status {status}) before the trial to interrupt"
        assert time.time() < deadline, f"tune.py did not reach its pause point in {timeout} s"
        time.sleep(0.1)
    found = [int(p.parent.name) for p in out.glob("trials/*/last.pt")]
    assert len(found) == 1, found  # the one trial in progress: one epoch committed, more to train
    return found[0]


@pytest.mark.slow
def test_sigkill_and_sigint_mid_study_lose_nothing(command, tmp_path):
    out = tmp_path / "study"
    with open(tmp_path / "run1.log", "w") as log:
        proc = start(command(out), log, skip={0})
        killed = stopped_mid_trial(proc, out)  # trial 0 finished, the next one between its epochs
        assert killed == 1
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    # NOTE: a kill inside an atomic write (mtl/io.atomic_path) leaves this; its window is milliseconds, so plant it
    leftover = out / "trials" / str(killed) / ".last.pt.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert (out / "trials" / str(killed) / "last.pt").is_file()

    with open(tmp_path / "run2.log", "w") as log:
        proc = start(command(out), log, skip={killed})
        interrupted = stopped_mid_trial(proc, out)  # the killed trial's retry, between its epochs
        assert not leftover.exists() and not (out / "trials" / str(killed) / "last.pt").exists()  # cleaned at start
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)  # NOTE: the interrupt is pending; it is handled as soon as it runs again
        status = proc.wait(timeout=300)
    printed = (tmp_path / "run2.log").read_text()
    assert status == 130, f"exit {status}:\n{printed[-3000:]}"
    assert "interrupted: the study is kept" in printed and "Traceback" not in printed, printed[-3000:]

    import tune  # the rerun: in this process (a third interpreter start would only cost time)
    assert tune.main(command(out))["finished"] == 2
    trials = optuna.load_study(study_name="mtl", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 2 and {t.state.name for t in finished} == {"COMPLETE"}  # exactly --trials
    assert trials[0].state.name == "COMPLETE"  # finished before the kill: kept
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    table = pd.read_csv(out / "trials.csv").set_index("number")
    assert table.loc[killed, "state"] == "FAIL" and "ended without a word (killed?)" in table.loc[killed, "fail_reason"]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed)  # the killed values, again
    assert retry.params == trials[killed].params
    assert table.loc[interrupted, "state"] == "FAIL" and table.loc[interrupted, "fail_reason"] == "interrupted (Ctrl-C)"
    assert not list(out.rglob("last.pt")) and not list(out.rglob("*.tmp"))  # nothing left behind
