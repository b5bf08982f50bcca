"""The vision family: image classification (Fashion-MNIST by default, or any labelled image folder) — its data
source and contract, teacher and student, stages and config. The generic code reaches it through ``family.py``
(tasks.family) and ``config.py`` (tasks.config)."""
