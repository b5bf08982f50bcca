"""The clicks family's contract (``tasks.family``): a table family of ``tasks.ctr``, AUC, one-request latency."""
from __future__ import annotations

from tasks.ctr.table_evaluate import table_family

FAMILY = table_family("clicks", "Click table compression report")
