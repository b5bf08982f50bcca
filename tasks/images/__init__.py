"""The image kit: image classification machinery every image family builds on (its data sources, contract and
intake; a ResNet teacher and a MobileNet-style student; each stage's code, reading ``<key>.<family>``). A family
built on it is a package of thin stage modules (``main("<family>")``), ``config.py`` (the kit's ``SECTIONS``),
``family.py`` (``image_family``) and ``intake.py`` (``image_intake``): ``tasks/vision`` and ``tasks/digits``. It
names no family."""
