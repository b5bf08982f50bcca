"""The vision family's intake (``tasks.intake``): the image kit's (``tasks.images.intake``) — labelled images
arriving as IDX batch folders on Fashion-MNIST's published data (or the image folder of ``data.vision``)."""
from tasks.images.intake import image_intake

INTAKE = image_intake("vision")
