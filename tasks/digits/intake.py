"""The digits family's intake (``tasks.intake``): the image kit's; the image folder fetch_digits writes is the
bootstrap batch, recorded with the bundle pin it was written from (an unpinned folder's pins are its path alone:
a re-pinned bundle must remake the bootstrap, not leave the old images in place)."""
from __future__ import annotations

from typing import Any

from tasks.images.intake import image_intake


def bundle_pin(cfg: Any) -> dict[str, Any]:
    return {"bundle_sha256": cfg.data.digits.bundle.sha256}


INTAKE = image_intake("digits", bundle_pin, "data.digits.bundle.sha256 (or data.digits.image_folder)")
