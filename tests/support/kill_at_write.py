"""Run `flux2-lora ARGS`, SIGKILLing the process at one chosen moment of one checkpoint write.

    python -m tests.support.kill_at_write CHECKPOINT OP -- train ...

CHECKPOINT: the n-th call of checkpoint.save_checkpoint (1-based) to interrupt; OP: the k-th file-system operation
inside it (tensor files, JSON files, renames, fsyncs, the `latest` pointer, retention) before which the process
dies. An OP past the last operation kills it right after save_checkpoint returns. The kill is a real SIGKILL, as
from the OOM killer or a preempting scheduler: no handler, no cleanup.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any

from flux2_lora import checkpoint as ckpt

_inside = {"call": 0, "op": 0}


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _counted(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _inside["call"] == TARGET_CALL:
            _inside["op"] += 1
            print(f"kill_at_write: operation {_inside['op']}: {fn.__name__}", flush=True)
            if _inside["op"] == TARGET_OP:
                print(f"kill_at_write: SIGKILL before {fn.__name__} (operation {TARGET_OP})", flush=True)
                _kill()
        return fn(*args, **kwargs)

    return wrapper


def _install() -> None:
    for name in ("save_file", "_fsync_tree", "_fsync_dir", "atomic_write_text", "_retain"):
        setattr(ckpt, name, _counted(getattr(ckpt, name)))
    os.replace = _counted(os.replace)
    Path.write_text = _counted(Path.write_text)  # type: ignore[method-assign]
    save = ckpt.save_checkpoint

    @functools.wraps(save)
    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        _inside["call"] += 1
        result = save(*args, **kwargs)
        if _inside["call"] == TARGET_CALL:
            print(f"kill_at_write: SIGKILL after the checkpoint was written ({_inside['op']} operations)", flush=True)
            _kill()
        return result

    ckpt.save_checkpoint = save_checkpoint


if __name__ == "__main__":
    TARGET_CALL, TARGET_OP = int(sys.argv[1]), int(sys.argv[2])
    assert sys.argv[3] == "--"
    _install()
    from flux2_lora.cli import main

    sys.exit(main(sys.argv[4:]))
