"""Stage ``export_clicks``: the click-through kit's ``tasks.ctr.export`` on the clicks family's blocks."""
from tasks.ctr.export import main
from tasks.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: main("clicks"))
