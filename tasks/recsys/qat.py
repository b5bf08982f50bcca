"""Stage ``qat_recsys``: the click-through kit's ``tasks.ctr.qat`` on the recommender's blocks."""
from tasks.ctr.qat import main
from tasks.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: main("recsys"))
