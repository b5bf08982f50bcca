"""Stage ``train_teacher_recsys``: the click-through kit's ``tasks.ctr.train_teacher`` on the recommender's blocks."""
from tasks.ctr.train_teacher import main
from tasks.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: main("recsys"))
