"""Stage ``export_vision``: the image kit's ``tasks.images.export`` on the vision family's blocks."""
from tasks.errors import run_cli
from tasks.images.export import main

if __name__ == "__main__":
    run_cli(lambda: main("vision"))
