"""The real worker, with a model that raises (a fault injected by tests): on every call while the
flag file ``FAULTY_MODEL_FLAG`` names exists, and on one call in ``FAULTY_MODEL_EVERY`` (the 17th,
then every that many calls later) when that is set.

Run as ``python tests/faulty_model_worker.py``. Only the model call is replaced (through a
:class:`~stream_detector.worker.DetectorService` subclass, as the throughput benchmark's variants
do); everything else is the product's worker.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from stream_detector import worker as worker_module
from stream_detector.settings import Settings

FIRST_FAULT = 17  # early, so that even a short run meets one


class FaultyModelService(worker_module.DetectorService):
    def _scorer_for(self, runner):
        score = super()._scorer_for(runner)
        flag = Path(os.environ["FAULTY_MODEL_FLAG"]) if os.environ.get("FAULTY_MODEL_FLAG") else None
        every = int(os.environ.get("FAULTY_MODEL_EVERY", "0"))
        calls = itertools.count(1)

        def faulty(windows):
            n = next(calls)  # the model is called on the one inference thread
            if flag is not None and flag.exists():
                raise RuntimeError("injected model failure (CUDA out of memory)")
            if every and n % every == FIRST_FAULT % every:
                raise RuntimeError(f"injected model failure (call {n}, one in {every})")
            return score(windows)

        return faulty


def main() -> int:
    worker_module.DetectorService = FaultyModelService
    worker_module.run_worker(Settings.load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
