"""The recommender family: click-through prediction on MovieLens-100K (or any field schema) — its data source and
contract, teacher and student, stages and config. The generic code reaches it through ``family.py`` (tasks.family)
and ``config.py`` (tasks.config)."""
