"""Stage ``snapshot_<family>``: a family's raw data as a versioned snapshot, the bootstrap plus every accepted batch.

Layout of ``<snapshot>`` (``data/<family>/raw``, a DVC output with ``persist: true``: ``dvc repro`` never deletes it)::

    snapshot.json        {"family", "batches": [{"id", "files": {name: sha256}, "rows": {...}, "source", ...}]}
    <batch id>/<files>   one folder per batch, written once and never rewritten

The stage creates an absent snapshot: the family's published data set (read from its pinned, checksum-verified
sources) as batch ``0000-bootstrap``, or no batch at all when ``ingest.<family>.bootstrap`` is ``empty`` (data that
only arrives by ``python -m flows.ingest``); not when dvc.lock records a version with batches accepted on top (a
clone not yet pulled), which ``dvc pull`` restores: DVC's cache lists that version's batches where it holds it, else
a version of more files than the new one is taken to have them. The files the bootstrap's source holds that are no
data it reads (``skipped``) are recorded with it and printed. An existing snapshot is verified: every batch's files
must have the digests it was accepted with, and a published bootstrap must come from today's pinned sources (a
snapshot that holds only its bootstrap is remade from the sources params pin now; one with accepted batches is
refused; a pin the sources cannot give here, an unpinned image folder absent on this machine, is not compared).
``flows.ingest`` adds batches that passed their contract and drift checks and records the new version with
``dvc commit``, so ``dvc.lock`` holds the snapshot's hash and every stage downstream re-runs on the new data.

What a family's files hold is its ``tasks/<family>/intake.py``'s business (``tasks.intake.Intake``); this module only
stores, hashes and lists them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks.config import load_config
from tasks.errors import DataFormatError, PipelineError
from tasks.intake import Intake
from tasks.io import UMASK, file_digest, write_json
from tasks.pending_batch import settle

MANIFEST = "snapshot.json"
BOOTSTRAP = "0000-bootstrap"
SHOWN = 20   # the skipped files a snapshot's manifest names (it counts them all)


def read(snapshot: Path) -> dict[str, Any]:
    """The snapshot's manifest; a missing or unreadable one names the folder."""
    try:
        manifest = json.loads((snapshot / MANIFEST).read_text())
    except FileNotFoundError:
        raise DataFormatError(f"{snapshot}: no {MANIFEST}; create the snapshot with `dvc repro` first") from None
    except (OSError, ValueError) as err:
        raise DataFormatError(f"{snapshot / MANIFEST}: cannot be read ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("batches"), list):
        raise DataFormatError(f"{snapshot / MANIFEST}: has no list of batches")
    return manifest


def folder_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a batch folder, by name (sub-folders are not part of a batch)."""
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def batch_digest(files: dict[str, str]) -> str:
    """One digest for a batch: its files' names and digests (the same content under another id is the same batch)."""
    import hashlib

    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify(snapshot: Path) -> dict[str, Any]:
    """The manifest, once every batch's files are there with the digests they were accepted with."""
    manifest = read(snapshot)
    for batch in manifest["batches"]:
        folder = snapshot / batch["id"]
        if not folder.is_dir():
            raise DataFormatError(f"{folder}: batch {batch['id']} of {snapshot / MANIFEST} is missing")
        found = folder_digests(folder)
        if found != batch["files"]:
            changed = sorted(set(found) ^ set(batch["files"]) | {n for n in found if batch["files"].get(n) != found[n]})
            raise DataFormatError(f"{folder}: {', '.join(changed)} differ from what was accepted (snapshot.json); "
                                  "an accepted batch is never edited: restore it with `dvc checkout`")
    return manifest


def batch_tables(snapshot: Path, intake: Intake) -> list[tuple[str, Any]]:
    """(id, tables) of every batch, in the order they were accepted."""
    return [(b["id"], intake.read_batch(snapshot / b["id"])) for b in verify(snapshot)["batches"]]


def stage_batches(snapshot: Path, intake: Intake) -> tuple[str, list[tuple[str, Any]]]:
    """(a description of the snapshot as a stage's data source, (id, tables) of every batch in order); a snapshot
    without a batch names the command that adds one."""
    batches = batch_tables(snapshot, intake)
    if not batches:
        raise DataFormatError(f"{snapshot}: the snapshot holds no batch yet; add one with "
                              f"`python -m flows.ingest --family {read(snapshot)['family']} <batch folder>`")
    return f"snapshot {snapshot} of {len(batches)} batch(es): {', '.join(b for b, _ in batches)}", batches


def tables(snapshot: Path, intake: Intake) -> tuple[list[str], Any]:
    """(batch ids, the family's tables of the whole snapshot); a snapshot without a batch names the command that
    adds one."""
    _, batches = stage_batches(snapshot, intake)
    return [b for b, _ in batches], intake.combine([t for _, t in batches])


def unfit_batch_name(batch_id: str) -> str | None:
    """Why ``batch_id`` (a batch folder's name) cannot name a batch of a snapshot, else None."""
    if batch_id in ("", BOOTSTRAP, MANIFEST) or batch_id.startswith(".") or "/" in batch_id:   # "." and ".." hidden
        return (f"{batch_id!r} cannot name a batch (empty, hidden, a path, or a name a snapshot keeps for itself: "
                f"{BOOTSTRAP}, {MANIFEST}); rename the folder")
    return None


def add_batch(snapshot: Path, batch_id: str, source: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Copy the batch folder ``source`` into the snapshot as ``batch_id`` and list it in the manifest; return the
    manifest entry. The folder lands whole (copied beside, then renamed) before the manifest names it, and the
    manifest is replaced atomically: a kill leaves the snapshot as it was (plus at most an unlisted folder)."""
    if problem := unfit_batch_name(batch_id):
        raise DataFormatError(f"{source}: {problem}")
    manifest = verify(snapshot)
    if any(b["id"] == batch_id for b in manifest["batches"]):
        raise DataFormatError(f"{snapshot}: already holds a batch {batch_id}")
    target = snapshot / batch_id
    if target.exists():   # an unlisted folder left by a kill between the copy and the manifest
        shutil.rmtree(target)
    scratch = Path(tempfile.mkdtemp(dir=snapshot, prefix=f".{batch_id}."))
    scratch.chmod(0o777 & ~UMASK)   # mkdtemp makes it private; as mkdir would make it
    try:
        for path in sorted(source.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, scratch / path.name)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        files = folder_digests(target)
        record = {"id": batch_id, "files": files, "digest": batch_digest(files),
                  "accepted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
        write_json(snapshot / MANIFEST, {**manifest, "batches": [*manifest["batches"], record]})
    except Exception:   # not listed (a disk full, an unreadable file): the folder leaves again, never versioned
        shutil.rmtree(target, ignore_errors=True)
        raise
    return record


def create(snapshot: Path, family: str, intake: Intake, cfg: Any, recorded: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """A new snapshot in ``snapshot``: the published data as its first batch, or none (``bootstrap: empty``).
    ``recorded``: what dvc.lock records of the folder (``recorded_version``), if anything; a version that holds
    batches accepted on top of the bootstrap (a clone without ``dvc pull``, the folder deleted) is refused, never
    silently replaced by one without them: its ``batches`` where DVC's cache lists them (one of the bootstrap alone
    is made anew from today's sources, fewer files or not), else any version of more files than the new one."""
    spec = intake.settings(cfg)

    def refuse(made: int) -> None:
        held, nfiles = (recorded or {}).get("batches"), int((recorded or {}).get("nfiles", 0))
        accepted = [b for b in held or [] if b != BOOTSTRAP]
        if not accepted and (held is not None or nfiles <= made):
            return
        if accepted:
            why = (f"the batches accepted since ({', '.join(accepted[:3])}{' ...' if len(accepted) > 3 else ''}) "
                   "would drop out of the data")
            fix = "or delete its stage's entry from dvc.lock to start anew"
        else:   # DVC's cache does not list that version here: it may have held the bootstrap alone
            why = ("the batches accepted since would drop out of the data; or, if it held the bootstrap alone, its "
                   "source now gives fewer files")
            fix = "or, if it held the bootstrap alone, delete its stage's entry from dvc.lock to make it anew"
        raise DataFormatError(
            f"{snapshot}: missing, and dvc.lock records a version of it of {nfiles} files (a new one would hold "
            f"{made}: {why}); restore it with `dvc pull {snapshot}` (`dvc checkout {snapshot}` when DVC's cache "
            f"holds it), {fix}")

    if spec.bootstrap == "empty":
        refuse(1)   # (its manifest alone): said before anything is made
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=snapshot.parent, prefix=f".{snapshot.name}."))
    scratch.chmod(0o777 & ~UMASK)   # as mkdir would make it
    try:
        batches = []
        if spec.bootstrap == "published":
            try:
                source, found, pins = intake.bootstrap(cfg)
            except PipelineError as err:   # offline, say: the version dvc.lock records may be what is wanted
                if recorded:
                    err.args = (f"{err}; dvc.lock records a version of {snapshot}: `dvc pull {snapshot}` restores it",)
                raise
            intake.write_batch(found, scratch / BOOTSTRAP)
            files = folder_digests(scratch / BOOTSTRAP)
            skipped = found.get("skipped") or []   # the source's files that are no data it reads (not stored)
            batches.append({"id": BOOTSTRAP, "files": files, "digest": batch_digest(files), "source": source,
                            "pins": pins, "rows": intake.rows(found),
                            **({"skipped": {"count": len(skipped), "files": skipped[:SHOWN]}} if skipped else {})})
        write_json(scratch / MANIFEST, {"family": family, "bootstrap": spec.bootstrap, "batches": batches})
        refuse(sum(1 for p in scratch.rglob("*") if p.is_file()))
        os.replace(scratch, snapshot)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return read(snapshot)


def ensure(snapshot: Path, family: str, intake: Intake, cfg: Any, recorded: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """Create the snapshot when it is absent (``recorded``: what dvc.lock records of it, see ``create``), else
    verify it (and that a published bootstrap is today's)."""
    for left in snapshot.parent.glob(f".{snapshot.name}.old.*"):   # a remade bootstrap's old copy, left by a kill
        shutil.rmtree(left, ignore_errors=True)
    if not snapshot.exists():
        return create(snapshot, family, intake, cfg, recorded)
    manifest = verify(snapshot)
    if manifest.get("family") != family:
        raise DataFormatError(f"{snapshot / MANIFEST}: holds family {manifest.get('family')!r}, not {family!r}")
    first = bootstrap_entry(manifest)
    made = manifest.get("bootstrap", "published" if first is not None else "empty")
    wanted = intake.settings(cfg).bootstrap
    if made != wanted:
        raise DataFormatError(f"{snapshot}: was created with ingest.{family}.bootstrap {made}, params.yaml says "
                              f"{wanted}; move it (and {snapshot.parent / 'quarantine'}) away to start anew")
    for left in snapshot.glob(".*"):   # a batch's scratch copy left by a kill: never part of the snapshot
        if left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
    if first is not None and _as_pinned(first.get("pins")) != _as_pinned(
            pins := _pins_now(snapshot, intake, cfg, len(manifest["batches"]) > 1)):
        if pins is None:   # its source does not read now, and batches were accepted since: kept, as said
            return manifest
        was = first.get("pins") or {}
        changed = sorted(k for k in was.keys() | pins.keys() if was.get(k) != pins.get(k))
        if changed == [CONTENT] and CONTENT in was and CONTENT in pins and len(manifest["batches"]) > 1:
            # the unpinned folder changed (or was re-encoded) since it bootstrapped a snapshot that has taken batches
            # since: the snapshot is the data's version now; new images join it as batches
            print(f"warning: {snapshot}: its bootstrap's image folder changed since it was read ({CONTENT} "
                  f"{str(was[CONTENT])[:12]}… now {str(pins[CONTENT])[:12]}…); the snapshot keeps the images it read "
                  "and the batches accepted since (new images join as a batch: `python -m flows.ingest`)")
            return manifest
        # the pins both give agree, and one gives more: today's sources cannot give a pin here (an unpinned image
        # folder absent on this machine), or the snapshot was recorded before a release added one; neither says the
        # data changed, so a snapshot with accepted batches is kept (one of the bootstrap alone is remade)
        agree = all(was[k] == pins[k] for k in was.keys() & pins.keys())
        if agree and (pins.keys() < was.keys() or pins.keys() > was.keys() and len(manifest["batches"]) > 1):
            print(f"note: {snapshot}: its bootstrap's {', '.join(changed)} not compared (not given "
                  f"{'here' if pins.keys() < was.keys() else 'when it was made'})")
            return manifest
        if len(manifest["batches"]) > 1:
            raise DataFormatError(f"{snapshot}: was bootstrapped from other published files than params.yaml pins "
                                  f"now ({intake.pins_key}; {', '.join(changed)} differ) and holds accepted batches; "
                                  "put those files back as they were (new data joins as a batch: `python -m "
                                  "flows.ingest`), or move the folder away to bootstrap it anew")
        # nothing arrived on top of the published data: the snapshot is remade from what params pin now (the
        # version it replaces stays in DVC's cache and dvc.lock's history)
        old = Path(tempfile.mkdtemp(dir=snapshot.parent, prefix=f".{snapshot.name}.old."))
        os.replace(snapshot, old / snapshot.name)
        try:
            manifest = create(snapshot, family, intake, cfg)
        except BaseException:
            if not snapshot.exists():   # the old one comes back (else it stays in the hidden folder, named)
                os.replace(old / snapshot.name, snapshot)
                old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    return manifest


CONTENT = "content_sha256"   # an unpinned image folder's content digest, among a bootstrap's pins


def _pins_now(snapshot: Path, intake: Intake, cfg: Any, batches: bool) -> dict[str, Any] | None:
    """The pins of the bootstrap's sources today; None, said on stdout, when they do not read (an unpinned folder
    emptied or reorganised) under a snapshot that has taken ``batches`` since (it is the data's version now; one of
    the bootstrap alone is remade from its source, whose error is raised)."""
    try:
        return intake.pins(cfg)
    except DataFormatError as err:
        if not batches:
            raise
        print(f"warning: {snapshot}: its bootstrap's source does not read now ({err}); the snapshot keeps the "
              "images it read and the batches accepted since")
        return None


def _as_pinned(pins: dict[str, Any] | None) -> dict[str, Any] | None:
    """``pins`` as they read once the folder is pinned: an unpinned folder's path and content digest recorded, then
    its digest pinned as ``sha256`` (the snapshot stage prints it to pin) are the same images."""
    if not pins or CONTENT not in pins:
        return pins
    return {**{k: v for k, v in pins.items() if k not in (CONTENT, "image_folder")}, "sha256": pins[CONTENT]}


def recorded_version(root: Path, snapshot: Path) -> dict[str, Any] | None:
    """What ``root``'s dvc.lock records of the folder ``snapshot`` (DVC's ``md5``, ``nfiles``), with the ``batches``
    that version holds when the project's DVC cache lists it (a clone not yet pulled has no listing: None)."""
    from tasks.lineage import locked_outputs

    recorded = locked_outputs(root).get(Path(os.path.relpath(snapshot.absolute(), root.absolute())).as_posix())
    if not recorded:
        return None
    return {**recorded, "batches": _listed_batches(root, str(recorded.get("md5", "")))}


def _listed_batches(root: Path, md5: str) -> list[str] | None:
    """The batch folders of the folder version ``md5`` (``<hash>.dir``) in DVC's cache of ``root``, else None."""
    try:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
    except ImportError:
        return None
    try:
        with Repo(str(root)) as repo:
            listing = Path(repo.cache.local.path, md5[:2], md5[2:])
        files = json.loads(listing.read_text()) if md5.endswith(".dir") else None
        return sorted({f["relpath"].split("/")[0] for f in files if "/" in f["relpath"]}) if files is not None else None
    except (DvcException, OSError, ValueError, KeyError, TypeError, AttributeError):   # not listed here: unknown
        return None


def bootstrap_entry(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's entry of batch ``0000-bootstrap`` (its first, when it has one)."""
    first = next(iter(manifest["batches"]), None)
    return first if first is not None and first["id"] == BOOTSTRAP else None


def bootstrap_skipped(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """``{"count", "files"}``: the files of the bootstrap's source that are no data it reads, if any."""
    return (bootstrap_entry(manifest) or {}).get("skipped")


def describe(manifest: dict[str, Any]) -> str:
    return "; ".join(f"{b['id']} ({', '.join(f'{k} {v}' for k, v in b.get('rows', {}).items())})"
                     for b in manifest["batches"]) or "no batch yet"


def stage_main(family: str, intake: Intake) -> None:
    """``python -m tasks.<family>.snapshot --snapshot data/<family>/raw``: the stage's command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--snapshot", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_config(args.params)
    from tasks.tracking import stage_run

    if left := settle(Path("."), args.snapshot, args.snapshot / MANIFEST):   # by an ingestion killed mid-way
        print(f"warning: {left}", file=sys.stderr)
    # what dvc.lock records of an absent snapshot (its paths are relative to the project, the stage's working
    # directory); an existing one is verified against its own manifest, and dvc.lock is not read for it
    recorded = None if args.snapshot.exists() else recorded_version(Path("."), args.snapshot)
    bootstrap = {f"ingest.{family}.bootstrap": intake.settings(cfg).bootstrap}
    with stage_run(f"snapshot_{family}", cfg, params=bootstrap) as run:
        manifest = ensure(args.snapshot, family, intake, cfg, recorded)
        run.log_metrics({"batches": len(manifest["batches"])})
        if (first := bootstrap_entry(manifest)) is not None:
            run.set_tag("data.source", first["source"])
        run.log_artifact(args.snapshot / MANIFEST)
    print(f"{args.snapshot}: {len(manifest['batches'])} batch(es): {describe(manifest)}")
    if content := ((first or {}).get("pins") or {}).get(CONTENT):
        print(f"{BOOTSTRAP}: its image folder's content digest is {content} (pin it as image_folder.sha256)")
    if skipped := bootstrap_skipped(manifest):
        print(f"{BOOTSTRAP}: skipped {skipped['count']} file(s) of its source that it does not read: "
              f"{', '.join(skipped['files'][:5])}{' ...' if skipped['count'] > 5 else ''}")
