"""The real worker under a wall clock the test steps (a clock injected, as libfaketime would step it).

Run as ``python tests/stepped_clock_worker.py``; ``STEPPED_CLOCK_FILE`` names a file holding the
step in seconds (absent: none), read every 0.1 s. The detector's wall clock (event validation,
incident bookkeeping) is ``time.time() + step``; its monotonic clock is left alone, as a step of the
system clock leaves ``time.monotonic``. Everything else is the product's worker.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from stream_detector import worker as worker_module
from stream_detector.settings import Settings

_step = [0.0]


def _follow(path: Path) -> None:
    while True:
        try:
            _step[0] = float(path.read_text() or 0.0)
        except (OSError, ValueError):
            _step[0] = 0.0
        time.sleep(0.1)


def stepped_time() -> float:
    return time.time() + _step[0]


class SteppedClockService(worker_module.DetectorService):
    def __init__(self, settings: Settings, metrics=None):
        super().__init__(settings, metrics)
        self.detector.clock = stepped_time
        self.detector.decoder.clock = stepped_time


def main() -> int:
    threading.Thread(target=_follow, args=(Path(os.environ["STEPPED_CLOCK_FILE"]),), daemon=True).start()
    worker_module.DetectorService = SteppedClockService
    worker_module.run_worker(Settings.load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
