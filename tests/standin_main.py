"""Runs the stand-in training in its own process, for the multi-process and CLI tests.

python tests/standin_main.py WORKDIR STEPS [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from standin import standin_config

from unclip_jax.parallel import initialize_distributed
from unclip_jax.training import train_and_evaluate

if __name__ == "__main__":
    workdir, steps = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3:
        initialize_distributed(
            enabled=True,
            coordinator_address=sys.argv[3],
            num_processes=int(sys.argv[4]),
            process_id=int(sys.argv[5]),
        )
    train_and_evaluate(standin_config(steps=steps, checkpoint_every=steps), workdir)
