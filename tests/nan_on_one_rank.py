"""`python -m translator` with a NaN training loss on rank 1 only, at its 5th loss (step 5):
run under torchrun by tests/test_distributed.py to check that every rank agrees to skip or stop."""

import importlib
import os
import sys

from translator.cli import main

training = importlib.import_module("translator.train")
real_loss, calls = training.loss_fn, []


def loss_nan_on_rank_1_at_step_5(*args, **kwargs):
    calls.append(1)
    value = real_loss(*args, **kwargs)
    return value * float("nan") if os.environ["RANK"] == "1" and len(calls) == 5 else value


training.loss_fn = loss_nan_on_rank_1_at_step_5
sys.exit(main(sys.argv[1:]))
