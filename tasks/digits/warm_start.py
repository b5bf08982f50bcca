"""Stage ``warm_start_digits`` (``tasks.warm_start``): the champion's teacher and FP32 student as they are — new
images change no model shape (new classes do, and then the run trains from scratch)."""
from __future__ import annotations

from tasks.errors import run_cli
from tasks.warm_start import stage_main

if __name__ == "__main__":
    run_cli(lambda: stage_main("digits"))
