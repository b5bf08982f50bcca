"""Prefect flows: how the stages of dvc.yaml are wired, scheduled and run."""
