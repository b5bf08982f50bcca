"""Stage ``export_digits``: the image kit's ``tasks.images.export`` on the digits family's blocks."""
from tasks.errors import run_cli
from tasks.images.export import main

if __name__ == "__main__":
    run_cli(lambda: main("digits"))
