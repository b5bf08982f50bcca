"""Stage ``prepare_digits``: the image kit's ``tasks.images.prepare`` on the digits family's blocks and intake."""
from tasks.digits.intake import INTAKE
from tasks.errors import run_cli
from tasks.images.prepare import main

if __name__ == "__main__":
    run_cli(lambda: main("digits", INTAKE))
