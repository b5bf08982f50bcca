"""The click-through kit: machinery every click-through family builds on — field-embedding models (DeepFM teacher
and student, FM, LR), their training and distillation, dimension pruning, row sharing, QAT with INT8 tables, ONNX
export and its parity check, each stage's code reading ``<key>.<family>``. A family built on it is a package of thin
stage modules (``main("<family>")``), its data source, contract and evaluation, and ``config.py`` (the kit's
``SECTIONS`` and its own): ``tasks/recsys``. It names no family."""
