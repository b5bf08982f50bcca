"""Stage ``validate_clicks``: the click-through kit's ``tasks.ctr.table_validate`` on the clicks family's blocks."""
from tasks.ctr.table_validate import main
from tasks.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: main("clicks"))
