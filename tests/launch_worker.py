"""Worker for test_launch.py: `python tests/launch_worker.py <distill arguments>` runs the command
as one process of a launch (RANK, WORLD_SIZE, MASTER_ADDR/PORT set by the test, no launcher
around it, as `srun` starts one task per process). With FAIL_RANK=r, process r fails at its first
checkpoint, the way FAIL_HOW says:

    raise   its disk is full (the free-space check fails there and only there)
    freeze  it stops dead (SIGSTOP: a frozen machine; it neither answers nor ends)
"""

from __future__ import annotations

import os
import signal
import sys
from collections import namedtuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distill import files  # noqa: E402
from distill.cli import main  # noqa: E402

if os.environ.get("FAIL_RANK") == os.environ["RANK"]:
    usage, real = namedtuple("usage", "total used free"), files.shutil.disk_usage

    def disk_usage(path):
        if "checkpoints" in str(path):
            if os.environ["FAIL_HOW"] == "freeze":
                os.kill(os.getpid(), signal.SIGSTOP)
            return usage(10**9, 10**9, 1024)
        return real(path)

    files.shutil.disk_usage = disk_usage

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
