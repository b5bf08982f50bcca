"""The vision family's params sections: the image kit's (``tasks.images.config``), ablation included —
Fashion-MNIST by default (``data.vision``), a ResNet teacher, a MobileNet-style student."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.images.config import SECTIONS
from tasks.images.config import check as check_images

if TYPE_CHECKING:
    from tasks.config import Config

__all__ = ["SECTIONS", "check"]


def check(cfg: Config) -> None:
    check_images(cfg, "vision")


