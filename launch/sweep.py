#!/usr/bin/env python3
"""Runs a config's sweep: one named run (workdir) per point, one after another, then a summary.

    launch/sweep.py --config configs/clip.py:tiny --root runs/sweep [--config.KEY=VALUE ...] \
        [--launcher local|tpu_pod|slurm] [--launcher-args '...'] [--dry-run]
    launch/sweep.py summarise --root runs/sweep [--metrics loss,retrieval/all_attributes]

The logic lives in `unclip_jax.sweep` (see its docstring for the layout of the root).
"""

import os
import sys

try:
    from unclip_jax.sweep import main
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from unclip_jax.sweep import main

if __name__ == "__main__":
    sys.exit(main())
