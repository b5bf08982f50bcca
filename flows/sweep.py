"""Recipe sweep: compression recipes of one family as parallel Prefect tasks on Dask, one MLflow child run each.

    python -m flows.sweep [--root .] [--family recsys] [--address tcp://host:8786] [--workers 2] [--recipes 8]

A recipe is a set of params overrides drawn from ``sweep.space.<family>`` (every combination, or ``recipes`` of them
drawn with ``seed``), each without the knobs no stage of its recipe reads, so that no recipe runs twice. The family's
upstream stages (data, validation, teacher) run once in the project, as in the pipeline flow; each recipe then runs
the family's compression, export and evaluation stages of dvc.yaml in a scratch copy of the project
(``flows.workspace``) that shares those upstream outputs, on a Dask worker (``prefect-dask``: a LocalCluster by
default, an existing scheduler when ``address`` is given). A recipe's stage runs are children of its recipe run,
itself a child of the sweep run. A recipe that fails is recorded as failed and the sweep goes on; one whose worker
died is run again elsewhere by Dask. Then the sweep writes the Pareto front (quality up, bytes down, latency down) to
``reports/sweep/<family>/`` with a plot, logs it, and registers the best recipe that passes the gate's floors and
teacher-relative goals as ``challenger`` (``champion`` is the promotion flow's to move).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_client
from prefect.futures import as_completed

from flows.dvc_stage import push_versioned, run_node, stage_env, stale_stages
from flows.recipe import run_recipe
from flows.registry_lock import data_lock
from flows.stage_graph import downstream_of, family_stages, stage_graph
from flows.sweep_report import best_passing, pareto_front, write_sweep_report
from flows.sweep_space import sweep_recipes
from tasks.config import SweepConfig, load_config
from tasks.errors import PipelineError, run_cli
from tasks.mlflow_store import client_for, redact, tracking_uri
from tasks.tracking import pipeline_run


class UsageError(PipelineError):
    """A command-line value the sweep cannot take."""


def dask_runner(sweep: SweepConfig, address: str | None, workers: int | None) -> Any:
    """prefect-dask's runner: an existing scheduler, else a LocalCluster of single-threaded worker processes."""
    from prefect_dask import DaskTaskRunner

    if address or sweep.address:
        return DaskTaskRunner(address=address or sweep.address)
    workers = sweep.workers if workers is None else workers
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@contextmanager
def this_prefect_api_for_workers() -> Iterator[None]:
    """Point the LocalCluster's worker processes at this flow's Prefect API. Without PREFECT_API_URL each worker
    would start a temporary server of its own (~20 s each) against the same local database."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    with get_client(sync_client=True) as client:
        os.environ["PREFECT_API_URL"] = str(client.api_url)
    try:
        yield
    finally:
        del os.environ["PREFECT_API_URL"]


def project_tracking_uri(root: Path) -> str:
    """The tracking URI of the project at ``root``, password and all, as a pipeline run derives it (its params and
    ``$MLFLOW_TRACKING_URI``). The recipes' subflow derives it here rather than taking it as a parameter: Prefect
    stores a subflow's parameters verbatim and shows them in its UI."""
    return tracking_uri(load_config(root / "params.yaml"), root)


@flow(name="sweep-recipes")
def fan_out(recipes: list[dict[str, Any]], family: str, root: str, work: str, sweep_run_id: str,
            upstream_outs: list[str], stages: list[str], threads: int,
            retry_delays: list[float]) -> list[dict[str, Any]]:
    """Every recipe as one task on the flow's (Dask) task runner; a failed recipe is recorded, never fatal."""
    uri = project_tracking_uri(Path(root))   # a task's arguments, unlike a flow's, are not stored by Prefect
    task = run_recipe.with_options(retries=len(retry_delays), retry_delay_seconds=retry_delays)
    futures = {task.submit(i, r, family, Path(root), Path(work), uri, sweep_run_id, upstream_outs, stages,
                           threads): i for i, r in enumerate(recipes)}
    outcomes: dict[int, dict[str, Any]] = {}
    for future in as_completed(list(futures)):  # fetch each result as it lands, not left on a worker that may die
        i = futures[future]
        try:
            outcomes[i] = {"status": "ok", **future.result()}
        except Exception as err:  # noqa: BLE001 - the task failed (bad params, a stage error) or its worker died
            why = f"{type(err).__name__}: {redact(str(err))}"   # a server's error names the URL, password and all
            print(f"recipe-{i:03d} failed: {why}")
            outcomes[i] = {"index": i, "name": f"recipe-{i:03d}", "overrides": recipes[i], "status": "failed",
                           "error": why[-4000:]}
    return [outcomes[i] for i in range(len(recipes))]


def swept_family(cfg: Any, family: str | None) -> str:
    """``family`` (default ``sweep.family``) when params give it a ``sweep.space`` entry; else a UsageError naming
    the families that have one (before anything is copied or started)."""
    family = family or cfg.sweep.family
    if family not in cfg.families or family not in cfg.sweep.space:
        raise UsageError(f"--family: {family!r} has no sweep.space entry; choose one of "
                         f"{sorted(f for f in cfg.families if f in cfg.sweep.space)}")
    return family


@flow(name="recipe-sweep", log_prints=True)
def recipe_sweep(root: str = ".", family: str | None = None, address: str | None = None, workers: int | None = None,
                 recipes: int | None = None, register_best: bool = True) -> dict[str, Any]:
    """Sweep ``recipes`` compression recipes of ``family`` on Dask; report the Pareto front; register the best."""
    root_path = Path(root).resolve()
    cfg = load_config(root_path / "params.yaml")
    sweep = cfg.sweep
    family = swept_family(cfg, family)
    for option, value in (("recipes", recipes), ("workers", workers)):
        if value is not None and value < 1:   # (the CLI refuses them too)
            raise UsageError(f"{option}: {value}; a sweep needs at least 1")
    workers = sweep.workers if workers is None else workers
    uri = project_tracking_uri(root_path)
    nodes = family_stages(stage_graph(root_path), family)
    below = downstream_of(nodes, f"train_teacher_{family}")
    upstream = [n for n in nodes if n not in below]
    count = sweep.recipes if recipes is None else recipes
    drawn = sweep_recipes(root_path, cfg, family, [n.name for n in below], count)
    if recipes is not None and sweep.method == "grid":
        print(f"note: sweep.method is grid: all {len(drawn)} distinct recipes run, not --recipes {recipes}")
    # the family's data lock, as a pipeline run holds it, from before its MLflow run (a busy lock starts nothing)
    # until the last recipe ended: the upstream stages read the raw snapshot and every recipe links their outputs
    # (flows.recipe.link_outputs) when it starts; the report and the registration read only the recipes' copies
    with ExitStack() as data_held:
        data_held.enter_context(data_lock(root_path, [family], cfg.pipeline.data_lock_timeout_seconds))
        with pipeline_run(cfg, f"sweep-{family}", root_path) as parent:
            scheduler = address or sweep.address or f"LocalCluster({workers})"
            parent.set_tags({"sweep.family": family, "sweep.method": sweep.method, "sweep.recipes": str(len(drawn)),
                             "sweep.scheduler": scheduler})
            env = stage_env(root_path, uri, parent.run_id)
            stale = stale_stages(root_path, upstream)
            for node in upstream:  # data, validation and teacher: once, in the project, as the pipeline runs them
                run_node(cfg, node, root_path, env, unchanged=node.name not in stale)
                push_versioned(root_path, env, node.name, cfg.pipeline.data_lock_timeout_seconds)
            start = time.perf_counter()
            with this_prefect_api_for_workers():
                outcomes = fan_out.with_options(task_runner=dask_runner(sweep, address, workers))(
                    drawn, family, str(root_path), str(root_path / sweep.work_dir / parent.run_id), parent.run_id,
                    [o for n in upstream for o in n.outs], [n.name for n in below], sweep.threads_per_worker,
                    cfg.pipeline.retry_delays(sweep.recipe_retries))
            seconds = time.perf_counter() - start
            data_held.close()   # ingestion and pipeline runs may change the family's data again
            metric = cfg.block("gate", family).metric
            ok = [o for o in outcomes if o["status"] == "ok"]
            front = pareto_front(ok, metric)
            best = best_passing(outcomes, metric)
            files = write_sweep_report(root_path / "reports" / "sweep" / family, outcomes, front, best, metric,
                                       {"family": family, "recipes": len(drawn), "seconds": seconds})
            for path in files:
                parent.log_artifact(path, "sweep")
            parent.log_metrics({"sweep.recipes_ok": len(ok), "sweep.recipes_failed": len(outcomes) - len(ok),
                                "sweep.seconds": seconds, "sweep.pareto_size": len(front)})
            registered = _register(best, family, uri, parent.run_id) if register_best and best else None
            parent.set_tag("sweep.registered", json.dumps(registered) if registered else "none")
    return {"sweep_run_id": parent.run_id, "family": family, "outcomes": outcomes, "pareto": front,
            "best": best, "registered": registered, "recipes_seconds": seconds, "tracking_uri": redact(uri)}


def _register(best: dict[str, Any], family: str, uri: str, sweep_run_id: str) -> dict[str, Any]:
    """Register the best recipe's INT8 student as ``challenger`` through the pipeline's own gate, with the git commit
    and dirty state of the project its copy was made of (the copy's own commit is in no history to restore from)."""
    from flows.gating import gate_and_register

    where = Path(best["dir"])
    cfg, client = load_config(where / "params.yaml"), client_for(uri)
    tags = {"sweep.run_id": sweep_run_id, "sweep.recipe": json.dumps(best["overrides"], sort_keys=True),
            "sweep.source_commit": best["source"]["git.commit"], **best["source"]}
    report = gate_and_register(where, cfg, client, uri, best["run_id"], sweep_run_id, family, may_promote=False,
                               extra_tags=tags)
    return {"name": report["name"], "version": report["version"], "recipe": best["name"],
            "unchanged": report["unchanged"]}


def summary(result: dict[str, Any]) -> str:
    ok = [o for o in result["outcomes"] if o["status"] == "ok"]
    lines = ["", (f"=== recipe sweep ({result['family']}): {len(ok)} of {len(result['outcomes'])} recipes ran, "
                  f"{result['recipes_seconds']:.1f} s ==="),
             f"Pareto front: {', '.join(result['pareto']) or '(empty)'}",
             f"report: reports/sweep/{result['family']}/sweep.md and pareto.png; MLflow run {result['sweep_run_id']}"]
    lines += [f"  {o['name']} FAILED: {o['error'].splitlines()[-1] if o['error'] else ''}"
              for o in result["outcomes"] if o["status"] != "ok"]
    reg, best = result["registered"], result["best"]
    if reg and reg.get("unchanged"):   # its file was registered before: no version made, no alias moved
        lines.append(f"best recipe {reg['recipe']} is already {reg['name']} version {reg['version']}; "
                     "registry unchanged")
    elif reg:
        lines.append(f"registered {reg['name']} version {reg['version']} ({reg['recipe']}) as challenger")
    elif best:   # only with --no-register: a passing best is otherwise always registered
        lines.append(f"best recipe passing the gate on validation: {best['name']} (not registered: --no-register)")
    else:
        lines.append("no recipe passed the gate: nothing registered")
    return "\n".join(lines)


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description="Sweep compression recipes on Dask (see sweep in params.yaml).",
                                     exit_on_error=False)
    parser.add_argument("--root", default=".")
    parser.add_argument("--family", default=None, help="default: sweep.family")
    parser.add_argument("--address", default=None, help="an existing Dask scheduler (default: sweep.address)")
    parser.add_argument("--workers", type=positive, default=None, help="LocalCluster workers (default: sweep.workers)")
    parser.add_argument("--recipes", type=positive, default=None,
                        help="random draws (default: sweep.recipes; method grid runs them all)")
    parser.add_argument("--no-register", dest="register_best", action="store_false")
    try:
        args = parser.parse_args()
    except argparse.ArgumentError as err:   # one line, as run_cli prints a user's error (not usage and a traceback)
        raise UsageError(str(err)) from None
    # what the flow refuses first, refused before it starts Prefect (a temporary server, ~15 s, then a traceback)
    swept_family(load_config(Path(args.root) / "params.yaml"), args.family)
    stage_graph(Path(args.root))   # a dvc.yaml DVC can read
    print(summary(recipe_sweep(args.root, args.family, args.address, args.workers, args.recipes, args.register_best)))


if __name__ == "__main__":
    run_cli(main)
