"""An MLflow run: the tracking store MLFLOW_TRACKING_URI names (MLflow's own default
without it: mlflow.db in the working directory, artifacts under ./mlruns).

- experiment: log.experiment, else the run's name; MLflow run name: the run folder's name;
- params: the flattened recipe (`optim.lr`, `model.name`, ...), at the start;
- metrics: each record's numbers as `<split>/<key>` at its step (`train/loss`, `val/top1`),
  the end of the run's as they are (`best_top1`, `final_top1`, `seconds`);
- artifacts: each picture as it is drawn (MLflow's image log, a step slider in its UI), and
  model.pt when the run has finished;
- status: FINISHED, KILLED (stopped on request: it resumes) or FAILED.

The run's id is kept in <run_dir>/mlflow-run.json: a resumed run logs into the same MLflow
run (params it already has are kept; MLflow cannot change a param). MLflow cannot delete
points either: after a hard kill, the steps between the last checkpoint and the kill are
logged again by the resumed run, and MLflow shows both.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ffdist.recipe import flatten
from ffdist.sinks.base import Record, Sink, SinkSetup, measurements, need, save_json

if TYPE_CHECKING:
    from PIL import Image

RUN_FILE = "mlflow-run.json"
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
PARAMS_PER_CALL = 100  # MLflow's limit for one log_batch


class MlflowSink(Sink):
    shows_pictures = True

    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        mlflow = need("mlflow", "mlflow")  # lazy: about 1 s of imports
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.uri = mlflow.get_tracking_uri()
        self.file = setup.run_dir / RUN_FILE
        self.status = "KILLED"  # closed without being told how the run ended
        self.run_id = self._resumed() or self._create()
        self._log_params()

    def _resumed(self) -> str | None:
        """The MLflow run of the run this one resumes, if it is in this tracking store."""
        if self.setup.resume_step is None or not self.file.is_file():
            return None
        saved = json.loads(self.file.read_text())
        if saved.get("tracking_uri") != self.uri:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(saved["run_id"])
        except MlflowException:  # deleted from the store since
            return None
        self.client.update_run(saved["run_id"], status="RUNNING")
        return saved["run_id"]

    def _create(self) -> str:
        rcp = self.setup.recipe
        name = rcp.log.experiment or rcp.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name))
        run = self.client.create_run(experiment_id, run_name=self.setup.run_dir.name,
                                     tags={"ffdist.run_dir": str(self.setup.run_dir)})
        save_json(self.file, {"run_id": run.info.run_id, "tracking_uri": self.uri,
                              "experiment_id": experiment_id})
        return run.info.run_id

    def _log_params(self) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in flatten(self.setup.recipe.to_dict()).items()
                  if k not in have]
        for i in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i:i + PARAMS_PER_CALL])

    def record(self, rec: Record) -> None:
        from mlflow.entities import Metric

        split = rec.get("split")
        prefix = f"{split}/" if split else ""
        stamp = int(rec["time"] * 1000)
        metrics = [Metric(prefix + k, float(v), stamp, rec["step"])
                   for k, v in measurements(rec).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, picture: Image.Image, step: int) -> None:
        self.client.log_image(self.run_id, picture, key=tag, step=step)

    def end(self, status: str) -> None:
        self.status = STATUS[status]
        model = self.setup.run_dir / "model.pt"
        if status == "finished" and model.is_file():
            self.client.log_artifact(self.run_id, str(model))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, self.status)

