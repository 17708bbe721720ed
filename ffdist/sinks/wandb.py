"""A Weights & Biases run, offline by default: clusters often have no internet, and an
offline run needs no account. WANDB_MODE, when set, decides (`online` needs a login or
WANDB_API_KEY); `wandb sync <run_dir>/wandb/offline-run-*` uploads an offline run later.

- the run's folder: <run_dir>/wandb/ (W&B's own layout: offline-run-<time>-<id>/);
- project: log.experiment, else the run's name; W&B run name: the run folder's name;
- config: the recipe (nested as in recipe.yaml);
- history: each record's numbers as `<split>/<key>` at its step (`train/loss`,
  `val/top1`), and the pictures (`val/confusion`, ...); the end of the run's numbers go to
  the run's summary (`best_top1`, `final_top1`, `seconds`);
- exit code: 0 finished, 75 stopped on request (it resumes), 1 failed.

The run's id is kept in <run_dir>/wandb-run.json: a resumed run continues the same W&B run
(resume="allow"; offline, each segment is a folder of its own with that id, and `wandb
sync` of them all fills one run). W&B's console capture is off: the process's output is
the user's own log.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import TYPE_CHECKING

from ffdist.errors import EXIT_PREEMPTED
from ffdist.sinks.base import Record, Sink, SinkSetup, measurements, need, save_json

if TYPE_CHECKING:
    from PIL import Image

RUN_FILE = "wandb-run.json"
EXIT_CODE = {"finished": 0, "stopped": EXIT_PREEMPTED, "failed": 1}


class WandbSink(Sink):
    shows_pictures = True

    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        self.wandb = wandb = need("wandb", "wandb")  # lazy: about 1 s of imports
        rcp, run_dir = setup.recipe, setup.run_dir
        file = run_dir / RUN_FILE
        run_id = None
        if setup.resume_step is not None and file.is_file():
            run_id = json.loads(file.read_text())["run_id"]
        run_id = run_id or secrets.token_hex(6)  # W&B ids: letters and digits
        self.exit_code = 1  # closed without being told how the run ended
        self.run = wandb.init(
            project=rcp.log.experiment or rcp.name, name=run_dir.name, id=run_id,
            resume="allow", dir=str(run_dir), config=rcp.to_dict(),
            mode=os.environ.get("WANDB_MODE") or "offline",
            settings=wandb.Settings(console="off", quiet=True))
        save_json(file, {"run_id": run_id})

    def record(self, rec: Record) -> None:
        split = rec.get("split")
        numbers = measurements(rec)
        if split is None:  # the end of the run: its numbers are the run's summary
            self.run.summary.update(numbers)
            return
        self.run.log({f"{split}/{k}": v for k, v in numbers.items()}, step=rec["step"])

    def image(self, tag: str, picture: Image.Image, step: int) -> None:
        self.run.log({tag: self.wandb.Image(picture)}, step=step)

    def end(self, status: str) -> None:
        self.exit_code = EXIT_CODE[status]

    def close(self) -> None:
        self.run.finish(exit_code=self.exit_code)
