"""Stage ``train_teacher_clicks``: the click-through kit's ``tasks.ctr.train_teacher`` on the clicks family's blocks."""
from tasks.ctr.train_teacher import main
from tasks.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: main("clicks"))
