#!/usr/bin/env python
"""Predict accuracy from weights: SNE against StatNN and a flattened-weights MLP, side by side.
The evaluation is ``bench.weightspace.encoder.evaluation``; ``--help`` lists its options.

    python scripts/weight_encoder_eval.py --zoo .cache/zoo/digits --cross-zoo .cache/zoo/digits-permuted \\
        --heads runs/headzoo/runs/* --out runs/weight-encoder-eval
"""

from __future__ import annotations

import sys

from bench.errors import BenchError
from bench.weightspace.encoder.evaluation import main

if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
