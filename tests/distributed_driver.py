"""Run several `pretrain train` commands one after the other in the same launched processes.

Used by the multi-process tests: `torchrun ... tests/distributed_driver.py RUNS.json`, where RUNS.json
is a list of argument lists for `pretrain train`, or of {"args": [...], "env": {...}} for a run that
needs environment variables of its own (set for that run only). The driver opens the process group once and every
run uses it (`pretrain train` leaves a group it did not create open; a group cannot be re-created in
the same processes under torchrun's store). Otherwise each run is exactly a separate launch; sharing
the processes saves the interpreter and import start-up that would dominate 20-step test runs.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from pretrain.cli import main

if __name__ == "__main__":
    dist.init_process_group("gloo")  # once: `pretrain train` uses a group it finds and leaves it open
    for entry in json.loads(Path(sys.argv[1]).read_text()):
        args, env = (entry["args"], entry["env"]) if isinstance(entry, dict) else (entry, {})
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        code = main(["train", *args])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
        if code:
            sys.exit(code)
