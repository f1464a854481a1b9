"""The function Ray Train runs in every worker. It only times the imports and hands over to
`launcher.worker.train_loop.TrainingRun`; it is a module of its own so that the driver, which passes it to the
TorchTrainer, does not import transformers or DeepSpeed through it (torch it gets from Ray Train anyway).
"""

from __future__ import annotations

import time
from typing import Any


def train_worker(config: dict[str, Any]) -> None:
    stamps = {"worker": time.time()}  # start-up phases (launcher.driver.startup), reported after the first step
    from launcher.worker.engine import import_deepspeed

    import_deepspeed()  # before anything else can import it with mlflow
    from launcher.worker.train_loop import TrainingRun

    stamps["imports"] = time.time()
    run = TrainingRun(config, stamps)
    run.setup()
    run.train()
