"""Stage ``train_teacher_digits``: the image kit's ``tasks.images.train_teacher`` on the digits family's blocks."""
from tasks.errors import run_cli
from tasks.images.train_teacher import main

if __name__ == "__main__":
    run_cli(lambda: main("digits"))
