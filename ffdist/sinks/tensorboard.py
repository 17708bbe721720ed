"""TensorBoard event files under <run_dir>/tb: each record's measurements as
`<split>/<key>` scalars, pictures, the model graph and the hyper-parameters.

Every evaluation's confusion matrix is written under one tag (`val/confusion`, a step
slider in TensorBoard), and TensorBoard shows 10 images of a tag unless told otherwise:
`command()` is the command line that shows them all, the one the end of a run prints.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ffdist.sinks.base import Record, Sink, SinkSetup, measurements

if TYPE_CHECKING:
    from PIL import Image
    from torch import nn

log = logging.getLogger("ffdist")

SHOW_EVERY_IMAGE = "--samples_per_plugin images=1000"
"""TensorBoard keeps a random 10 images per tag (the last one always): a run with 20
evaluations would show 10 of its confusion matrices. This keeps up to 1000. (`images=0`,
which is often given as "keep all", shows none in TensorBoard 2.21: the image plugin uses
the same number as its display sample size.)"""


def command(logdir: str) -> str:
    """The tensorboard command line that shows the run's curves and every image."""
    return f"tensorboard --logdir {logdir} {SHOW_EVERY_IMAGE}"


class TensorBoardSink(Sink):
    shows_pictures = True

    def __init__(self, setup: SinkSetup) -> None:
        super().__init__(setup)
        from torch.utils.tensorboard import SummaryWriter  # lazy: ~1 s of imports

        # purge_step hides events at or after the resume step left by the killed run.
        resume = setup.resume_step
        self.tb = SummaryWriter(str(setup.run_dir / "tb"), purge_step=resume + 1 if resume else None)

    def record(self, rec: Record) -> None:
        split = rec.get("split")
        if split is None:  # the end of the run: its numbers go to hparams
            return
        for key, value in measurements(rec).items():
            self.tb.add_scalar(f"{split}/{key}", value, rec["step"])

    def image(self, tag: str, picture: Image.Image, step: int) -> None:
        import numpy as np

        self.tb.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def graph(self, model: nn.Module, example: Any) -> None:
        """A model that cannot be traced only costs a warning: the sink stays on."""
        was_training = model.training
        model.eval()  # tracing runs a forward: in train mode it would move BatchNorm stats
        try:
            self.tb.add_graph(model, example)
        except Exception as e:  # tracing fails on data-dependent control flow
            log.warning("log.graph: could not trace the model (%s: %s)", type(e).__name__, e)
        finally:
            model.train(was_training)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in params.items()}
        self.tb.add_hparams(flat, metrics, run_name=".")

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()
