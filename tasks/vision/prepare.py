"""Stage ``prepare_vision``: the image kit's ``tasks.images.prepare`` on the vision family's blocks and intake."""
from tasks.errors import run_cli
from tasks.images.prepare import main
from tasks.vision.intake import INTAKE

if __name__ == "__main__":
    run_cli(lambda: main("vision", INTAKE))
