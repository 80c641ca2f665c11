"""Fault-injection helper of tests/test_faults.py: a warm parent that forks real training processes to kill.

Run as `python -m tests.fault_runner` from the checkout. It imports torch, timm and mtl once (about 10 s on 2 busy
cores, which a fresh interpreter per kill would pay again), prints {"ready": true}, then reads one JSON
command per line on stdin:

    {"argv": [...], "log": PATH, "out": FOLDER, "kill_write": [NAME, N, "before" | "after"], "kill_step": N,
     "kill_item": N}

and forks a child that runs `train_multitask.main(argv)` under `main_guard`, exactly what `python
train_multitask.py ARGV` runs (user errors exit 2), with stdout and stderr in LOG. It replies
{"pid": PID} at once and {"pid": PID, "status": S} when the child ends (S: exit code, or minus the
signal). `kill_write` makes the child SIGKILL itself at its N-th atomic rename onto FOLDER/NAME:
"before" (the temporary file is written in full but not renamed) or "after" (renamed, the next
write not begun); `kill_step` at its N-th optimizer step; `kill_item` as it reads its N-th photo
(FaceDataset.__getitem__, training or validation: with --workers 0 the photos are read in this
process), a moment anywhere in an epoch's training or validation that no clock decides.
"""
import json
import os
import signal
import sys
import traceback

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401 - warm import: the epoch figures use it
from torch.utils.tensorboard import SummaryWriter  # noqa: E402,F401 - warm import

import mtl.train  # noqa: E402,F401 - warm import
import train_multitask  # noqa: E402
from mtl.cli import main_guard  # noqa: E402


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def install_faults(cmd):
    """The child's kill points: an atomic rename onto out/NAME (the N-th), the N-th optimizer step, the N-th photo."""
    out = os.path.abspath(cmd["out"])
    if cmd.get("kill_write"):
        name, nth, phase = cmd["kill_write"]
        real_replace, seen = os.replace, [0]

        def replace(src, dst, *args, **kwargs):
            hit = False
            if os.path.basename(dst) == name and os.path.dirname(os.path.abspath(dst)) == out:
                seen[0] += 1
                hit = seen[0] == nth
            if hit and phase == "before":
                kill_self()
            real_replace(src, dst, *args, **kwargs)
            if hit and phase == "after":
                kill_self()
        os.replace = replace
    if cmd.get("kill_step"):
        from torch.optim.optimizer import register_optimizer_step_post_hook
        steps = [0]

        def after_step(optimizer, args, kwargs):
            steps[0] += 1
            if steps[0] == cmd["kill_step"]:
                kill_self()
        register_optimizer_step_post_hook(after_step)
    if cmd.get("kill_item"):
        from mtl.dataset import FaceDataset
        real_getitem, items = FaceDataset.__getitem__, [0]

        def getitem(self, i):
            items[0] += 1
            if items[0] == cmd["kill_item"]:
                kill_self()
            return real_getitem(self, i)
        FaceDataset.__getitem__ = getitem


def child(cmd):
    fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        install_faults(cmd)
        main_guard(lambda: train_multitask.main(cmd["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a bug: its traceback goes to the log
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main():
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(cmd)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
