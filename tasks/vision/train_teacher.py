"""Stage ``train_teacher_vision``: the image kit's ``tasks.images.train_teacher`` on the vision family's blocks."""
from tasks.errors import run_cli
from tasks.images.train_teacher import main

if __name__ == "__main__":
    run_cli(lambda: main("vision"))
