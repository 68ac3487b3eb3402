"""`python -m qstream ...` with two clock marks for bench_verify: when this script starts (the interpreter is up)
and when the command has returned (its atexit handlers run), written as JSON to $QSTREAM_BENCH_MARKS at exit.

Nothing is imported before the command runs, so the command's own order (read-ahead before torch) is kept.
"""

import atexit
import json
import os
import sys
import time

started = time.time()
marks = os.environ["QSTREAM_BENCH_MARKS"]


def _done() -> None:  # registered first, so it runs after the command's own atexit handlers
    with open(marks, "w") as fh:
        json.dump({"script": started, "returned": time.time()}, fh)


atexit.register(_done)
sys.argv[0] = "qstream"
from qstream.cli import main  # noqa: E402

main()
