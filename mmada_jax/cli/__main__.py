"""`python -m mmada_jax.cli ARGS` = `mmada-jax ARGS` (what the launch scripts run on every host)."""

import sys

from mmada_jax.cli import main

sys.exit(main())
