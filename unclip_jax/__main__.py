"""`python -m unclip_jax` is the `unclip-jax` command."""

import sys

from unclip_jax.cli import main

sys.exit(main())
