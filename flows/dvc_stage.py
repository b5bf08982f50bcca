"""A stage of dvc.yaml run through DVC: ``dvc repro --single-item`` with its output streamed to the Prefect run's
log, a failure raised as ``StageFailed`` (bad input is never retried, a crash may be), the stage's outputs pushed to
the default remote, and the environment stage processes get (one tracking store, the parent run).
"""
from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import MissingContextError
from prefect.states import State

from flows.run_artifacts import publish_data_docs
from flows.stage_graph import below
from tasks.errors import EXIT_USER_ERROR, LockBusy, PipelineError
from tasks.expectations import DATA_DOCS
from tasks.io import tools_env
from tasks.mlflow_store import redact
from tasks.tracking import PARENT_ENV

if TYPE_CHECKING:
    from flows.stage_graph import StageNode

_TAIL_LINES = 400
LOCK_BUSY = "Unable to acquire lock"   # what DVC says when another DVC process of the project holds its lock


class StageFailed(PipelineError):
    """A stage exited non-zero; ``deterministic`` when it rejected its input (never worth a retry)."""

    def __init__(self, stage: str, detail: str, deterministic: bool) -> None:
        super().__init__(f"stage {stage!r} failed:\n{detail}")
        self.stage, self.deterministic = stage, deterministic


def run_dvc(root: Path, env: dict[str, str], *args: str, log: Callable[[str], None] | None = None,
            marker: str | None = None, lock_wait: float = 0.0) -> tuple[int, str, bool]:
    """Run ``dvc`` in ``root``; hand each line it (and the stage it runs) prints to ``log``; return its exit code,
    the tail of its output, and whether any line started with ``marker`` (however long the output grew).

    ``lock_wait``: for how many seconds to try again while another DVC process of the project holds its lock (a
    stage running beside this one, a push: DVC takes it for moments, releasing it while a stage's command runs),
    0 to fail at once. Bounded: DVC's own ``--wait-for-lock`` waits forever on a lock a stuck process keeps."""
    deadline, delay = time.monotonic() + lock_wait, 0.5
    while True:
        code, tail, seen = _run_dvc_once(root, env, args, log, marker)
        if code == 0 or LOCK_BUSY not in tail or time.monotonic() + delay > deadline:
            return code, tail, seen
        if log is not None:
            log(f"(the DVC lock is busy: trying again in {delay:.1f} s)")
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def _run_dvc_once(root: Path, env: dict[str, str], args: tuple[str, ...], log: Callable[[str], None] | None,
                  marker: str | None) -> tuple[int, str, bool]:
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    seen = False
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        for line in proc.stdout:
            tail.append(line)
            seen = seen or (marker is not None and line.startswith(marker))
            if log is not None:
                log(line.rstrip("\n"))
    except BaseException as err:   # interrupted in this thread (Ctrl-C, a cancelled run): DVC is not left writing
        # after the caller moved on; its output still read meanwhile (a stage blocked on a full pipe cannot end)
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        stop(proc, settle=_SETTLE if isinstance(err, KeyboardInterrupt) else 0.0)
        raise
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    return proc.wait(), "".join(tail), seen


_RUNNING: set[subprocess.Popen] = set()   # the DVC commands of this process, for an interruption to stop
_RUNNING_LOCK = threading.Lock()
_SETTLE = 5.0   # Ctrl-C in a terminal reached the stage too: its own clean-up is given this long before a second one


def stop_running() -> None:
    """Stop every DVC command this process runs (``stop``): an interruption reaches the main thread only, while the
    stages of a run are read by worker threads, which go on reading until their commands end."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        stop(proc, settle=_SETTLE)


def stop(proc: subprocess.Popen, grace: float = 10.0, settle: float = 0.0) -> None:
    """End ``proc`` and what it started as Ctrl-C in a terminal would (the stage's command first: DVC ignores SIGINT
    while one runs, and never passes a signal on), then harder, and wait for them: whatever the caller does next
    (undoing what it started, say) happens after them, never beside them. ``settle``: seconds given first for them
    to end on their own (a Ctrl-C at the terminal reached them already: a second would cut their clean-up short)."""
    import psutil

    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []

    def ended_within(seconds: float) -> list:   # those still running (DVC itself waited for as the Popen it is:
        deadline = time.monotonic() + seconds   # reaped by psutil, its exit status would read 0)
        _, running = psutil.wait_procs(below, timeout=seconds)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(deadline - time.monotonic(), 0.0))
        return [*running, *([proc] if proc.poll() is None else [])]

    alive = ended_within(settle) if settle else [*below, proc]
    for send in ("send_signal", "terminate", "kill"):
        if not alive:
            break
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                member.send_signal(signal.SIGINT) if send == "send_signal" else getattr(member, send)()
        below = [p for p in alive if p is not proc]
        alive = ended_within(grace)


def stage_logger() -> Callable[[str], None]:
    """Where a stage's output goes: the Prefect run's logger (the UI shows it under the task run), else stderr."""
    try:
        return get_run_logger().info
    except MissingContextError:
        return lambda line: print(line, file=sys.stderr, flush=True)


def retry_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """Retry what may pass on a later try (a server down, a killed process), never bad input or config."""
    err = state.data
    if isinstance(err, StageFailed):
        return not err.deterministic
    if isinstance(err, PipelineError):
        return err.transient
    return True


@task(task_run_name="{stage}", retry_condition_fn=retry_transient)
def run_stage(stage: str, root: Path, env: dict[str, str], data_docs: bool = False, lock_wait: float = 0.0,
              unchanged: bool = False) -> str:
    """Reproduce one stage (``lock_wait``: ``run_dvc``'s); return ``cached`` when DVC found it up to date (nothing
    ran), else ``ran``. A stage that renders Great Expectations Data Docs gets a Prefect artifact saying where they
    are, pass or fail. ``unchanged``: DVC found it up to date when the run started (``stale_stages``): no DVC process."""
    if unchanged:
        stage_logger()(f"Stage '{stage}' didn't change (DVC, at the start of the run), skipping")
        return "cached"
    try:
        ran = reproduce(stage, root, env, lock_wait=lock_wait)
    except StageFailed:
        close_killed_runs(stage, env)
        if data_docs:
            _point_at_data_docs(stage, env)
        raise
    if data_docs and ran:
        _point_at_data_docs(stage, env)
    return "ran" if ran else "cached"


def run_node(cfg: Any, node: Any, root: Path, env: dict[str, str], unchanged: bool, submit: bool = False) -> Any:
    """``run_stage`` of ``node`` as a run calls it (``submit``: for a future): the pipeline's retries for transient
    failures, DVC's lock waited for as long as the family's data lock (a stage of another family holds it a moment),
    the stage's Data Docs pointed at when its outputs hold them."""
    retrying = run_stage.with_options(retries=cfg.pipeline.retries, retry_delay_seconds=cfg.pipeline.retry_delays())
    docs = DATA_DOCS in {Path(o).name for o in node.outs}
    args = (node.name, root, env, docs, cfg.pipeline.data_lock_timeout_seconds)
    return (retrying.submit if submit else retrying)(*args, unchanged=unchanged)


def close_killed_runs(stage: str, env: dict[str, str]) -> None:
    """Mark KILLED the runs of ``stage`` under this pipeline run still RUNNING once it has failed (its process killed
    by a signal, the out-of-memory killer, could not end them); never failing the stage for it."""
    if PARENT_ENV not in env or "MLFLOW_TRACKING_URI" not in env:
        return
    try:
        from tasks.mlflow_store import client_for

        client = client_for(env["MLFLOW_TRACKING_URI"])
        parent = client.get_run(env[PARENT_ENV])
        query = (f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`pipeline.stage` = '{stage}' "
                 "and attributes.status = 'RUNNING'")
        for run in client.search_runs([parent.info.experiment_id], query):
            client.set_tag(run.info.run_id, "pipeline.killed", "left RUNNING when its stage failed")
            client.set_terminated(run.info.run_id, "KILLED")
    except Exception as err:  # noqa: BLE001 - a run left RUNNING is not worth hiding the stage's own failure
        stage_logger()(f"warning: {stage}'s runs left RUNNING were not marked KILLED "
                       f"({type(err).__name__}: {redact(str(err))})")


def _point_at_data_docs(stage: str, env: dict[str, str]) -> None:
    """``publish_data_docs``, never failing the stage for it (the Data Docs are in the MLflow run regardless)."""
    try:
        publish_data_docs(stage, env["MLFLOW_TRACKING_URI"], env[PARENT_ENV])
    except Exception as err:  # noqa: BLE001 - a missing pointer is not worth a failed stage
        stage_logger()(f"warning: no Prefect artifact for {stage}'s Data Docs ({type(err).__name__}: "
                       f"{redact(str(err))})")


def push_outputs(root: Path, env: dict[str, str], stage: str, lock_wait: float = 0.0) -> str:
    """``dvc push`` the stage's outputs when the project has a default remote; "" when done (or no remote), else why
    not (they stay in the local DVC cache)."""
    code, tail, _ = run_dvc(root, env, "remote", "default")
    if code != 0 or not tail.strip():
        return ""
    code, tail, _ = run_dvc(root, env, "push", stage, lock_wait=lock_wait)
    return "" if code == 0 else f"dvc push {stage} failed in {root}: {tail.strip()[-800:]}"


def push_versioned(root: Path, env: dict[str, str], stage: str, lock_wait: float = 0.0) -> None:
    """``push_outputs`` of a snapshot stage (a data version it made: the bootstrap, one remade from new pins) or a
    warm start stage (the weights a warm-started model began from): where ``flows.restore`` on another machine finds
    them, after a pipeline run, a sweep or an ingestion ran it (an accepted batch pushes its own version); one that
    fails is a warning in the run's log. Any other stage: nothing (its outputs are made again from those)."""
    if stage.startswith(("snapshot_", "warm_start_")) and (unpushed := push_outputs(root, env, stage, lock_wait)):
        stage_logger()(f"warning: {stage}'s output is not on the DVC remote: {unpushed}")


def reproduce(stage: str, root: Path, env: dict[str, str], log: bool = True, lock_wait: float = 0.0) -> bool:
    """``dvc repro --single-item stage`` in ``root`` (its output to the run's log when ``log``); return whether the
    stage ran, False when DVC found it up to date; raise ``StageFailed`` naming the stage's own error lines."""
    code, tail, ran = run_dvc(root, env, "repro", "--single-item", stage, log=stage_logger() if log else None,
                           marker=f"Running stage '{stage}'", lock_wait=lock_wait)
    if code != 0:
        errors = [ln for ln in tail.splitlines() if ln.startswith(("error:", "ERROR:", "  "))]
        raise StageFailed(stage, "\n".join(errors[-40:]) or tail[-2000:],
                          deterministic=re.search(rf"exited with {EXIT_USER_ERROR}\b", tail) is not None)
    return ran


def stale_stages(root: Path, nodes: list[StageNode]) -> set[str]:
    """The stages of ``nodes`` (graph order) a run reproduces: those DVC finds out of date when it starts
    (``changed_stages``) and every stage downstream of one of them. The others are up to date without a ``dvc repro``
    process of their own (each starts DVC and reads dvc.yaml, dvc.lock and params.yaml again). Decided once, up front:
    a stage's outputs may change even when DVC reports it cached (restored from its run cache), so what follows a
    stale stage is never skipped."""
    return below(nodes, changed_stages(root, [n.name for n in nodes]))


def changed_stages(root: Path, stages: list[str]) -> set[str]:
    """Those of ``stages`` that DVC finds out of date (as ``dvc status`` would: a dependency, parameter, command or
    output differs from dvc.lock, or the stage never ran), asked in this process. Every stage when DVC cannot tell
    (no dvc.lock yet, its lock busy, an error; said in the run's log): then each goes through ``dvc repro``, which
    reports any error itself."""
    if not (root / "dvc.lock").exists():
        return set(stages)
    try:
        return out_of_date(root, stages)
    except PipelineError as err:
        stage_logger()(f"warning: {err}; every stage goes through dvc repro")
        return set(stages)


def out_of_date(root: Path, stages: list[str], wait: float = 0.0) -> set[str]:
    """Those of ``stages`` DVC finds out of date, asked holding DVC's lock (waited for up to ``wait`` seconds while
    another DVC process holds it); a PipelineError (``LockBusy`` for the lock) when DVC cannot tell."""
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    deadline = time.monotonic() + wait
    while True:
        try:
            with Repo(str(root)) as repo, repo.lock:
                found = {s.name: s for s in repo.index.stages if isinstance(s, PipelineStage) and s.name in stages}
                return {name for name in stages if name not in found or found[name].status()}
        except LockError as err:
            if time.monotonic() > deadline:
                raise LockBusy(f"DVC could not tell which stages of {root} are up to date: its lock is busy "
                               f"({err})") from None
            time.sleep(1.0)
        except Exception as err:  # noqa: BLE001 - DVC's own errors, named in one line
            raise PipelineError(f"DVC could not tell which stages of {root} are up to date ({type(err).__name__}: "
                                f"{err})") from None


def stage_env(root: Path, uri: str, parent_run_id: str) -> dict[str, str]:
    """Environment for stage processes: this interpreter's tools first, one tracking store, the parent run."""
    return {**tools_env(), "MLFLOW_TRACKING_URI": uri, PARENT_ENV: parent_run_id, "PYTHONPATH": str(root)}
