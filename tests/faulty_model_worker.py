"""The real worker, with a model that raises while a flag file exists (a fault injected by tests).

Run as ``python tests/faulty_model_worker.py``; ``FAULTY_MODEL_FLAG`` names the flag file. Only the
model call is replaced (through a :class:`~stream_detector.worker.DetectorService` subclass, as the
throughput benchmark's variants do); everything else is the product's worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stream_detector import worker as worker_module
from stream_detector.settings import Settings


class FaultyModelService(worker_module.DetectorService):
    def _scorer_for(self, runner):
        score = super()._scorer_for(runner)
        flag = Path(os.environ["FAULTY_MODEL_FLAG"])

        def faulty(windows):
            if flag.exists():
                raise RuntimeError("injected model failure (CUDA out of memory)")
            return score(windows)

        return faulty


def main() -> int:
    worker_module.DetectorService = FaultyModelService
    worker_module.run_worker(Settings.load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
