"""Worker for test_stage_trust.py: `python tests/stage_killed.py <distill arguments>` runs the
command and SIGKILLs this process (no handler, no cleanup: as the OOM killer or a failed node
would) right after the checkpoint of step KILL_AT_STEP (an environment variable) is saved."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import distill.loop.train as train  # noqa: E402
from distill.cli import main  # noqa: E402

KILL_AT = int(os.environ["KILL_AT_STEP"])
saved = train.save_checkpoint


def save_then_die(accelerator, ckpt_root, state, *args, **kwargs):
    folder = saved(accelerator, ckpt_root, state, *args, **kwargs)
    if state.global_step >= KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return folder


train.save_checkpoint = save_then_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
