"""An image family's data params (``data.<family>``): where its images come from (an image folder, or a published
data set's IDX files such as Fashion-MNIST's), how they split, what validation holds every split to, and how
arriving batches are checked (``ingest.<family>``)."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config_types import Fraction, Positive, ProjectPath, Seed, Strict
from tasks.family_config import Sha256

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class SplitSizes(Strict):
    train: Positive
    val: Positive
    test: Positive


class PixelStats(Strict):
    """Per-channel mean and standard deviation of pixel/255 (one value per channel)."""
    mean: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(min_length=1, max_length=4)
    std: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(min_length=1, max_length=4)

    @model_validator(mode="after")
    def _one_per_channel(self) -> PixelStats:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} channels but std {len(self.std)}")
        return self


class PublishedIdx(Strict):
    """What a published IDX data set holds, its contract beside the checksums (validate_<family> holds the data to
    it): images in its training and test parts, their size, and whether every class has the same share
    (Fashion-MNIST: 60,000 + 10,000 images of 28x28, balanced; MNIST's are not)."""
    train: Positive
    test: Positive
    height: Positive
    width: Positive
    balanced: bool


class ImageFolder(Strict):
    """A user's own images (``tasks/image_folder.py``): ``<path>/<class>/<image>`` (one folder per class; its name is
    the class), or ``<path>/train/<class>/...`` with ``test/`` (and ``val/``) beside it to keep given splits.
    ``channels`` 1 (grey) or 3 (RGB) converts every image, null keeps grey only when every image is grey; ``size``
    [height, width] resizes every image, null requires one size. ``test_fraction`` carves a seeded stratified test
    split when there is no test folder, ``val_fraction`` the validation split from what is left when there is no
    val folder (``val_size`` and ``pixels`` beside it are the IDX files'). ``sha256``: optional pin of
    the folder's content (the snapshot stage prints it)."""
    # its content, not its path, is a split param (tasks.lineage.data_params): a seeded carve splits its images
    CONTENT: ClassVar[frozenset[str]] = frozenset({"path"})
    path: str
    channels: Literal[1, 3] | None = None
    size: Annotated[list[Positive], Field(min_length=2, max_length=2)] | None = None
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1   # of the images left after the test split
    sha256: Sha256 | None = None
    pixels: PixelStats | None = None   # null: measured on the training split


class ImageData(Strict):
    # The images: a user's folder when set, else the published IDX files (the four of IDX_FILES, each pinned by
    # sha256) from the first source that has them: source_dir, system_dir, then url into download_cache.
    # where the pinned files are found and what the published set holds: no row depends on them (tasks.lineage)
    LOCATION: ClassVar[frozenset[str]] = frozenset({"source_dir", "system_dir", "system_package", "url",
                                                    "download_cache", "published"})
    INPUTS: ClassVar[frozenset[str]] = frozenset({"source_dir"})   # read by the stages: a project's copy links it
    image_folder: ImageFolder | None = None
    source_dir: str | None = None
    system_dir: str | None = None
    system_package: str | None = None   # the Debian package that installs system_dir
    url: str | None = None
    download_cache: ProjectPath | None = None
    sha256: dict[str, Sha256] = {}
    class_names: list[str] | None = None   # of the IDX labels 0, 1, ...; null: the label numbers
    # the IDX images' normalisation; null: measured on the training split (either way recorded in the data's manifest)
    pixels: PixelStats | None = None
    val_size: Positive | None = None   # of the IDX training images, held out for validation
    published: PublishedIdx | None = None   # the IDX data set's contract
    # each batch after the first holds out this share of its images as test rows (the recent window of the run it
    # arrives in: images no model trained on); 0: later batches only grow training and validation
    batch_test_fraction: Fraction = 0.0
    seed: Seed
    subset: SplitSizes | None = None   # of the test split: of the first batch's test rows (the golden window)

    @model_validator(mode="after")
    def _all_files_pinned(self) -> ImageData:
        if self.image_folder is not None:
            return self
        if set(self.sha256) != set(IDX_FILES):
            raise ValueError(f"sha256 must pin exactly {list(IDX_FILES)}, got {sorted(self.sha256)}")
        if self.val_size is None or self.published is None:
            raise ValueError("the IDX files need val_size and published (or set image_folder)")
        if self.url is not None and self.download_cache is None:
            raise ValueError("url needs download_cache, the folder its downloads are kept in")
        if self.subset and self.subset.val > self.val_size:
            raise ValueError(f"subset.val ({self.subset.val}) exceeds val_size ({self.val_size})")
        return self


class ImageValidation(Strict):
    class_balance_tolerance: Annotated[float, Field(gt=0.0, lt=1.0)]
    max_cross_split_duplicate_fraction: Fraction   # images of a later split that are copies of an earlier split's


Share = Annotated[float, Field(ge=0.0, le=1.0)]


class ImageDrift(Strict):
    """Largest change a new batch of images may bring against the accepted ones (TFX's comparators); more is drift."""

    class_linf: Share                  # L-infinity between the batch's and the accepted class mix
    mean_intensity_js: Share           # Jensen-Shannon divergence (base 2) of the per-image mean intensity histograms
    ink_js: Share                      # ... of the per-image share of inked (non-background) pixels
    blank_share: Share                 # share of the batch's images that are blank or near-constant


class ImageReplay(Strict):
    """``python -m flows.replay --family <family>``: the published training images released as an initial set (with the
    published test images, the fixed golden set) and labelled batches of ``batch_rows``."""

    initial_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]
    batch_rows: Positive


class ImageIngest(Strict):
    """``python -m flows.ingest --family <family>``: what a new batch of images must satisfy to join the snapshot."""

    bootstrap: Literal["published", "empty"]   # the snapshot starts as the published data (or image folder), or empty
    min_rows: Positive                 # images in a batch
    blank_std: Annotated[float, Field(ge=0.0)]   # an image whose pixel standard deviation (0-255) is below this is blank
    max_repeated_fraction: Fraction    # images that are byte-for-byte copies of an accepted one (or of another in the batch)
    drift: ImageDrift
    replay: ImageReplay
