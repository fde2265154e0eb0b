"""Thin stage entry points: parse args → load config → call the core → write outputs atomically → log the run."""

import os

# Idle OpenMP threads sleep instead of spinning: when other processes share the cores (a second pipeline,
# a test run), spinning threads slow torch down by an order of magnitude. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
