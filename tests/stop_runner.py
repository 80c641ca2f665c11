"""A script with one pause point, for tests that signal a real process at a known moment (tests/test_tune_faults.py).

    python -m tests.stop_runner SKIP SCRIPT [ARGS...]

runs SCRIPT as `python SCRIPT ARGS` runs it (runpy, as __main__), except that right after the first atomic
rename onto a trial's last.pt (`trials/<n>/last.pt`, n not in SKIP: trial numbers joined by commas, or `-`) the
process stops itself with SIGSTOP. That trial has then committed its first epoch and has the rest to train, so a
signal sent now lands in the middle of a trial, however fast or slow the machine is. The test waits for the stop
(os.waitpid with WUNTRACED: an event, not a clock), then kills the process, or interrupts it and lets it go on
(SIGINT, then SIGCONT: the interrupt is handled as soon as it runs again). The pause point fires once.
"""
import os
import runpy
import signal
import sys
from pathlib import Path


def pause_after_first_epoch(skip: set[int]):
    real_replace, fired = os.replace, [False]

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        path = Path(dst)
        if (not fired[0] and path.name == "last.pt" and path.parent.parent.name == "trials"
                and path.parent.name.isdigit() and int(path.parent.name) not in skip):
            fired[0] = True
            os.kill(os.getpid(), signal.SIGSTOP)
    os.replace = replace


def main():
    # NOTE: a process started in the background of a non-interactive shell (`nohup pytest &`, a CI runner) inherits
    # SIGINT ignored, and so would this one; the test stands for a user pressing Ctrl-C at a terminal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    skip_text, script, *args = sys.argv[1:]
    pause_after_first_epoch(set() if skip_text == "-" else {int(n) for n in skip_text.split(",")})
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
