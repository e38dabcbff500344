"""Imported by a server started with this directory on PYTHONPATH (`bench.memory --trace`).

With BENCH_TRACEMALLOC set it traces allocations from the start, and every SIGUSR1
writes a snapshot to `$BENCH_TRACEMALLOC/snapshot-<pid>-<n>.pickle`.
"""

import os

if os.environ.get("BENCH_TRACEMALLOC"):
    import itertools
    import pickle
    import signal
    import tracemalloc

    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1")))
    _taken = itertools.count()

    def _snapshot(*_):
        path = os.path.join(os.environ["BENCH_TRACEMALLOC"], f"snapshot-{os.getpid()}-{next(_taken)}.pickle")
        with open(path + ".part", "wb") as file:
            pickle.dump(tracemalloc.take_snapshot(), file)
        os.replace(path + ".part", path)

    signal.signal(signal.SIGUSR1, _snapshot)
