"""The digits family's params sections: the image kit's (``tasks.images.config``), its ablation included, and a data block that
also pins the bundled source the images are written from (``fetch_digits``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import model_validator

from tasks.config_types import Strict
from tasks.family_config import Sha256
from tasks.images.config import SECTIONS as IMAGE_SECTIONS
from tasks.images.config import check as check_images
from tasks.images.data_config import ImageData

if TYPE_CHECKING:
    from tasks.config import Config


class Bundle(Strict):
    """scikit-learn's ``datasets/data/digits.csv.gz`` (64 ink levels 0-16 and the label a row), pinned by the SHA-256
    of its decompressed content."""

    sha256: Sha256


class DigitsData(ImageData):
    bundle: Bundle

    @model_validator(mode="before")
    @classmethod
    def _an_image_folder(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("image_folder") is None:   # before the IDX files' pins are asked for
            raise ValueError("image_folder: the digits are read as the image folder fetch_digits writes "
                             "(data/digits/images)")
        return data


SECTIONS: dict[str, Any] = {**IMAGE_SECTIONS, "data": DigitsData}


def check(cfg: Config) -> None:
    check_images(cfg, "digits")
