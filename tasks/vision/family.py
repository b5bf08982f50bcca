"""The vision family's contract (``tasks.family``): an image family of ``tasks.images`` (Fashion-MNIST or a user's
image folder), accuracy, batch-1 latency, with an ablation."""
from __future__ import annotations

from tasks.images.family import image_family

FAMILY = image_family("vision", "Vision compression report", ablation=True)
