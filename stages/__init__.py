"""Thin stage entry points: parse args → load config → call the core → write outputs atomically → log the run."""
