"""The text family: sentence classification, a Transformer teacher distilled into a BiLSTM student — its data
source and contract, teacher and student, stages and config. The generic code reaches it through ``family.py``
(tasks.family) and ``config.py`` (tasks.config)."""
