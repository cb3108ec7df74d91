"""Prefect tasks: thin wrappers that call ``pruneflow.stages`` and log what they produce to MLflow."""
