"""`python -m tests.fault.per_rank RECIPE [key=value ...]`: ffdist.train, with the overrides
of PER_RANK_<r> (e.g. PER_RANK_1="optim.lr=0.2") added on rank r only: ranks started with
different recipes on purpose, as a typo in one node's command would (tests only)."""

from __future__ import annotations

import os
import sys

from ffdist import train

if __name__ == "__main__":
    extra = os.environ.get(f"PER_RANK_{os.environ.get('RANK', '0')}", "").split()
    sys.exit(train.main([*sys.argv[1:], *extra]))
