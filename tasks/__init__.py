"""Pipeline stages: one module per stage, each a pure function plus a thin CLI that dvc.yaml calls."""
