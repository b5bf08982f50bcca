"""Typed errors a user can cause, and the CLI wrapper that prints them without a traceback."""
from __future__ import annotations

import signal
import sys
import threading
import zlib
from collections.abc import Callable

#: Exit code of a stage that failed on bad input or config: deterministic, so never retried.
EXIT_USER_ERROR = 2
#: Exit code of a failure that may pass on a later try (a server down): the flow retries it.
EXIT_TRANSIENT = 75
#: What reading a truncated (EOFError) or corrupted (zlib.error) .gz / .bz2 file raises that is neither an OSError nor
#: a ValueError: catch it with those wherever a compressed file is read.
CORRUPT_STREAM = (EOFError, zlib.error)


class PipelineError(Exception):
    """A failure the user can fix; its message names what and where."""

    transient = False


class ServiceUnavailable(PipelineError):
    """A server the run needs (tracking, registry, object store) did not answer after bounded retries."""

    transient = True


class LockBusy(PipelineError):
    """Another process held a lock the run needs (DVC's repository lock) past the wait: may pass on a later try."""

    transient = True


class AccessDenied(PipelineError):
    """A server refused the run's credentials (HTTP 401/403): a setting to fix, not worth a retry."""


class ArtifactStoreError(PipelineError):
    """The artifact store refused a write (no space left, not writable): an operator's fix, not worth a retry."""


class ConfigError(PipelineError):
    """params.yaml is malformed: unknown key, wrong type, value out of range."""


class DataSourceError(PipelineError):
    """No source could provide the raw data files."""


class ChecksumError(PipelineError):
    """A raw file's content does not match its pinned SHA-256."""


class DataFormatError(PipelineError):
    """A raw file is truncated, corrupt or not in the expected format."""


class DataValidationError(PipelineError):
    """Processed data failed its expectation suite."""


class ParityError(PipelineError):
    """An exported ONNX model does not compute what its reference (the model it was exported from) computes."""


class CheckpointError(PipelineError):
    """A checkpoint exists but cannot be used."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a container or job stopped): met as Ctrl-C is, so the stage's clean-up runs."""


def _terminated(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)   # a second one is not asked twice: it ends the process there and then
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def run_cli(main: Callable[[], object]) -> None:
    """Run a stage's ``main`` with atomic outputs; print a PipelineError as one message and exit non-zero. A SIGTERM
    ends it as Ctrl-C does (outputs dropped, its MLflow run marked KILLED), not as the default's instant death."""
    from tasks.staging import atomic_outputs

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        with atomic_outputs():
            main()
    except PipelineError as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(EXIT_TRANSIENT if err.transient else EXIT_USER_ERROR)
    except Terminated as err:
        print(f"error: {err}; previous outputs kept", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
