"""The digits family: scikit-learn's bundled handwritten digits (8x8 grey, 10 classes, 1,797 images) written out as an
image folder (``fetch.py``) and compressed by the image kit (``tasks.images``) like a user's own images would be.
Added through the family contract only: this package, its params blocks and its dvc.yaml stages (docs/byom.md)."""
