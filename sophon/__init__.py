"""Sophon: non-fine-tunable learning (IEEE S&P 2024) as a reproducible pipeline.

The core never reads params.yaml and never knows which orchestrator called it.
"""

__version__ = "0.1.0"
