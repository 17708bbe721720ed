"""Fuzz image decoding: any file a folder dataset may hold (odd modes, 1x1, zero bytes,
truncated, another format under a .jpg name) decodes to uint8 CHW with the run's channel
count and survives the train/eval transforms, or is reported in whole words; a dataset
with bad_images=error raises a DataError naming the file, with skip it skips."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ffdist.data import transforms as T
from ffdist.data.datasets import FileImages, decode, decode_error
from ffdist.errors import DataError
from tests.fuzz import strategies
from tests.fuzz.conftest import examples

# make test-all only: random cases of paths the fast tier covers with fixed ones
# (tests/fault/user_errors/); `make fuzz` is the long run.
pytestmark = pytest.mark.extended


@settings(max_examples=examples("images"))
@given(spec=strategies.image_files, channels=st.sampled_from([1, 3]),
       size=st.sampled_from([1, 4, 8, 17]))
def test_any_image_file_decodes_or_is_reported(spec, channels, size):
    with tempfile.TemporaryDirectory() as box:
        path = strategies.write_image(Path(box) / "img", spec)
        try:
            x = decode(str(path), channels)
        except (RuntimeError, OSError, ValueError) as e:
            reason = decode_error(e)
            assert reason and "\n" not in reason and ".cpp" not in reason, reason
            assert len(reason) <= 160
            for policy in ("error", "skip"):
                ds = FileImages([(str(path), 0)], T.folder_eval(size), channels,
                                bad_images=policy, max_bad_fraction=1.0)
                if policy == "error":
                    with pytest.raises(DataError, match="cannot be decoded as an image|"
                                       "pixels, more than data.max_image_pixels"):
                        ds[(0, 0)]
                else:
                    assert ds[(0, 0)] is None
            return
        assert x.dtype == torch.uint8 and x.dim() == 3 and x.shape[0] == channels, spec
        for tf in (T.folder_train(size), T.folder_eval(size)):
            y = tf(x)
            assert y.dtype == torch.uint8 and tuple(y.shape) == (channels, size, size), spec
