"""The digits family's intake (``tasks.intake``): the image kit's; the image folder is the bootstrap batch."""
from tasks.images.intake import image_intake

INTAKE = image_intake("digits")
