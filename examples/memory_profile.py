"""Where a `wsvd` command's resident memory peaks: runs `wsvd ARGS` in this process, samples RSS every 50 ms and
prints the main thread's stack at each new peak 50 MB above the last one (not CI; Linux).

    python examples/memory_profile.py compress --no-stream --model smollm2-135m --recipe wsvd --rho1 0.5 \\
        --bits w8a8 --calib-windows 16 --quiet --out /tmp/profiled

The sampler thread costs some time, so take wall times from a run without it (`/usr/bin/time -v wsvd ...`).
"""

import os
import sys
import threading
import time
import traceback

from wsvd_passes.cli import main

STEP = 50 * 2**20  # report a new peak this far above the last reported one


def _rss() -> int:
    """Resident bytes of this process now (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _stack(thread_id: int, depth: int = 8) -> str:
    frame = sys._current_frames().get(thread_id)
    frames = traceback.extract_stack(frame)[-depth:] if frame is not None else []
    return " <- ".join(f"{f.filename.rpartition('site-packages/')[2]}:{f.lineno} {f.name}" for f in reversed(frames))


def run(argv: list[str]) -> int:
    main_thread, start = threading.get_ident(), time.perf_counter()
    state = {"peak": 0, "reported": 0, "done": False, "where": ""}

    def sample():
        while not state["done"]:
            rss = _rss()
            if rss > state["peak"]:  # the stack at every new maximum, so the final one is where the peak is
                state["peak"], state["where"] = rss, _stack(main_thread)
                if rss > state["reported"] + STEP:
                    state["reported"] = rss
                    print(f"[mem] {time.perf_counter() - start:7.1f} s {rss / 2**30:.2f} GiB  {state['where']}",
                          file=sys.stderr, flush=True)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    try:
        return main(argv)
    finally:
        state["done"] = True
        print(f"[mem] peak {state['peak'] / 2**30:.2f} GiB after {time.perf_counter() - start:.0f} s, at "
              f"{state['where']}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
