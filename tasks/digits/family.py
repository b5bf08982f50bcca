"""The digits family's contract (``tasks.family``): an image family of ``tasks.images``, accuracy, batch-1 latency."""
from __future__ import annotations

from tasks.images.family import image_family

FAMILY = image_family("digits", "Handwritten digits compression report")
