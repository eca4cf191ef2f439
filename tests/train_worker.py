"""Run by test_distributed.py, alone or under `accelerate launch`: the `vlp` command line with
the `random:tiny` model's dropout off (not a test module).

Dropout draws differ between one process and two (other RNG streams, other tensor shapes), so
with it the two loss trajectories differ by noise; without it they differ only by the loss's
reduction and float rounding. The recipe sets `model.img_dropout`; BERT's dropout comes from
the model preset, which no recipe key reaches.
"""

from __future__ import annotations

import sys

from vlp_cli import model
from vlp_cli.cli import main

_tiny = model.PRESETS["tiny"]


def _tiny_without_dropout(vocab_size: int) -> dict:
    return {**_tiny(vocab_size), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


if __name__ == "__main__":
    model.PRESETS["tiny"] = _tiny_without_dropout
    sys.argv[0] = "vlp"
    main()
