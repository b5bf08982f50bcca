"""MovieLens-100K sources, read into one normalised schema and verified against pinned SHA-256s.

Sources, in order: ``data.recsys.source_dir`` (RecBole atomic files ``ml-100k.{inter,user,item}`` or the
GroupLens ``ml-100k.zip``); the copy inside the ``recbole`` wheel on PyPI, fetched with ``pip download --no-deps``
into the download cache and read as a zip (never installed, never imported); the official GroupLens zip. Every
raw file (the three RecBole files, or the zip) must match its SHA-256 pinned in params.yaml before it is parsed.
Whatever the format, the result is three tables:

- ``ratings``: user_id, item_id, rating (1-5), timestamp (unix seconds)
- ``users``: user_id, age, gender (M/F), occupation, zip_code
- ``items``: item_id, release_year (0 when unknown), genres (``|``-joined, in GENRES order)

(RecBole's copy has lost one release year that GroupLens has: item 1412 reads ``V`` and becomes 0.)
"""
from __future__ import annotations

import hashlib
import io
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tasks.errors import ChecksumError, DataFormatError, DataSourceError
from tasks.io import pip_wheel, write_atomic
from tasks.recsys.config import RecsysData

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
RECBOLE_FILES = {"ratings": "ml-100k.inter", "users": "ml-100k.user", "items": "ml-100k.item"}
GROUPLENS_FILES = {"ratings": "u.data", "users": "u.user", "items": "u.item"}
RECBOLE_COLUMNS = {"ratings": ("user_id", "item_id", "rating", "timestamp"),
                   "users": ("user_id", "age", "gender", "occupation", "zip_code"),
                   "items": ("item_id", "release_year", "class")}
ZIP_NAME = "ml-100k.zip"
Reader = Callable[[str], bytes]   # a file name -> its bytes


def _year(text: str) -> int:
    digits = text.strip()[-4:]
    return int(digits) if digits.isdigit() else 0


def _csv(blob: bytes, file: str, **options) -> pd.DataFrame:
    """``file``'s rows as strings; a row pandas cannot split raises DataFormatError naming the file (one line)."""
    try:
        return pd.read_csv(io.BytesIO(blob), dtype=str, keep_default_na=False, **options)
    except ValueError as err:  # ParserError, EmptyDataError, UnicodeDecodeError
        raise DataFormatError(f"{file}: {' '.join(str(err).split())}") from err


def parse_recbole(read: Reader) -> dict[str, pd.DataFrame]:
    """Normalised tables from RecBole atomic files: tab-separated with ``name:type`` headers; genres
    space-separated in ``class``."""
    def table(name: str) -> pd.DataFrame:
        file = RECBOLE_FILES[name]
        blob = read(file)
        if not blob.strip():
            raise DataFormatError(f"{file} is empty")
        frame = _csv(blob, file, sep="\t")
        frame.columns = [c.split(":")[0] for c in frame.columns]
        missing = [c for c in RECBOLE_COLUMNS[name] if c not in frame.columns]
        if missing:
            raise DataFormatError(f"{file} has no column {', '.join(missing)} (its columns: {', '.join(frame.columns)})")
        return frame

    ratings, users, items = table("ratings"), table("users"), table("items")
    return normalise({
        "ratings": ratings[["user_id", "item_id", "rating", "timestamp"]],
        "users": users[["user_id", "age", "gender", "occupation", "zip_code"]],
        "items": pd.DataFrame({"item_id": items["item_id"], "release_year": items["release_year"].map(_year),
                               "genres": items["class"].map(lambda c: "|".join(g for g in GENRES if g in c.split()))}),
    }, RECBOLE_FILES)


def parse_grouplens(read: Reader) -> dict[str, pd.DataFrame]:
    """Normalised tables from GroupLens files: ``u.data`` tab-separated, ``u.user``/``u.item`` pipe-separated
    (latin-1), 19 genre flags."""
    files = GROUPLENS_FILES
    ratings = _csv(read(files["ratings"]), files["ratings"], sep="\t", header=None,
                   names=["user_id", "item_id", "rating", "timestamp"])
    users = _csv(read(files["users"]), files["users"], sep="|", header=None,
                 names=["user_id", "age", "gender", "occupation", "zip_code"])
    raw = _csv(read(files["items"]), files["items"], sep="|", header=None, encoding="latin-1")
    flags = raw.iloc[:, 5:5 + len(GENRES)].to_numpy()
    items = pd.DataFrame({"item_id": raw[0], "release_year": raw[2].map(_year),
                          "genres": ["|".join(g for g, f in zip(GENRES, row, strict=True) if f == "1") for row in flags]})
    return normalise({"ratings": ratings, "users": users, "items": items}, files)


def typed(frame: pd.DataFrame, types: dict[str, str], file: str) -> pd.DataFrame:
    """``frame`` with ``types``, column by column so that a value that does not fit names its column."""
    for column, dtype in types.items():
        try:
            frame = frame.assign(**{column: frame[column].astype(dtype)})
        except (ValueError, TypeError, OverflowError) as err:  # OverflowError: an id past 64 bits
            raise DataFormatError(f"{file}: column {column} does not hold {dtype} values ({err})") from err
    return frame


def _one_row_each(frame: pd.DataFrame, key: str, file: str) -> pd.DataFrame:
    """``frame``, if no ``key`` is on two rows: ratings are joined to users and items on it."""
    repeated = frame[key][frame[key].duplicated()].unique().tolist()
    if repeated:
        listed = ", ".join(map(str, repeated[:5])) + (" ..." if len(repeated) > 5 else "")
        raise DataFormatError(f"{file}: {key} {listed} on more than one row; each must be on one row")
    return frame


def normalise(tables: dict[str, pd.DataFrame], files: dict[str, str]) -> dict[str, pd.DataFrame]:
    """Typed columns, one row per user and per item, rows sorted by key: one schema whatever the source format.
    ``files`` names the file each table was read from, for the errors."""
    ratings = typed(tables["ratings"], {"user_id": "int64", "item_id": "int64", "rating": "float64",
                                         "timestamp": "float64"}, files["ratings"])
    ratings = typed(ratings, {"rating": "int64", "timestamp": "int64"}, files["ratings"])
    users = _one_row_each(typed(tables["users"], {"user_id": "int64", "age": "int64"}, files["users"]),
                          "user_id", files["users"])
    items = _one_row_each(typed(tables["items"], {"item_id": "int64", "release_year": "int64"}, files["items"]),
                          "item_id", files["items"])
    users = users.astype({c: "str" for c in ("gender", "occupation", "zip_code")})
    return {"ratings": ratings.sort_values(["user_id", "item_id", "timestamp"]).reset_index(drop=True),
            "users": users.sort_values("user_id").reset_index(drop=True),
            "items": items.astype({"genres": "str"}).sort_values("item_id").reset_index(drop=True)}


def _check(name: str, blob: bytes, pinned: dict[str, str], source: str) -> bytes:
    actual = hashlib.sha256(blob).hexdigest()
    if actual != pinned[name]:
        raise ChecksumError(f"{source}: {name} has SHA-256 {actual}, expected {pinned[name]} "
                            f"(data.recsys.sha256 in params.yaml); it is not the published MovieLens-100K")
    return blob


def _zip_reader(archive: Path, folder: str, check: Callable[[str, bytes], bytes]) -> Reader:
    """Members of ``archive/folder``; ``check`` verifies each member (wheel) or the archive itself (GroupLens)."""
    def read(name: str) -> bytes:
        try:
            with zipfile.ZipFile(archive) as zf:
                return check(name, zf.read(f"{folder}/{name}"))
        except KeyError as err:
            raise DataFormatError(f"{archive}: has no {folder}/{name}") from err

    return read


def _grouplens_zip(cfg: RecsysData, directory: Path) -> Path | str:
    target = directory / ZIP_NAME
    if not target.is_file():
        try:
            with urllib.request.urlopen(cfg.url, timeout=30) as resp:
                write_atomic(target, resp.read())
        except OSError as err:
            return f"download failed: {err}"
    return target


def _from_dir(directory: Path, cfg: RecsysData) -> tuple[Callable, Reader] | str:
    """RecBole files or the GroupLens zip in ``directory``."""
    pins = cfg.sha256
    if all((directory / f).is_file() for f in RECBOLE_FILES.values()):
        return parse_recbole, lambda name: _check(name, (directory / name).read_bytes(), pins, str(directory))
    if (directory / ZIP_NAME).is_file():
        return _grouplens(directory / ZIP_NAME, pins)
    return f"neither {sorted(RECBOLE_FILES.values())} nor {ZIP_NAME} found"


def _grouplens(archive: Path, pins: dict[str, str]) -> tuple[Callable, Reader]:
    _check(ZIP_NAME, archive.read_bytes(), pins, str(archive.parent))
    return parse_grouplens, _zip_reader(archive, "ml-100k", lambda name, blob: blob)


def acquire(cfg: RecsysData) -> tuple[str, dict[str, pd.DataFrame]]:
    """(source description, normalised tables) from the first source that has verified files."""
    tried: list[str] = []
    if cfg.source_dir is None:
        tried.append("params data.recsys.source_dir: not set")
    else:
        found = _from_dir(Path(cfg.source_dir), cfg)
        if not isinstance(found, str):
            return _load(f"params data.recsys.source_dir ({cfg.source_dir})", *found)
        tried.append(f"params data.recsys.source_dir ({cfg.source_dir}): {found}")
    wheel = pip_wheel(Path(cfg.download_cache), cfg.wheel.package, cfg.wheel.version)
    if isinstance(wheel, Path):
        source = f"{wheel} ({cfg.wheel.member_dir})"
        check = lambda name, blob: _check(name, blob, cfg.sha256, source)
        return _load(source, parse_recbole, _zip_reader(wheel, cfg.wheel.member_dir, check))
    tried.append(f"PyPI wheel {cfg.wheel.package}=={cfg.wheel.version}: {wheel}")
    archive = _grouplens_zip(cfg, Path(cfg.download_cache))
    if isinstance(archive, Path):
        return _load(f"GroupLens {cfg.url}", *_grouplens(archive, cfg.sha256))
    tried.append(f"GroupLens {cfg.url}: {archive}")
    raise DataSourceError("no source has MovieLens-100K; tried, in order:\n  " + "\n  ".join(tried) +
                          "\nSet data.recsys.source_dir in params.yaml to a folder with ml-100k.{inter,user,item} "
                          f"or {ZIP_NAME}, or let pip reach PyPI.")


def _load(source: str, parse: Callable, read: Reader) -> tuple[str, dict[str, pd.DataFrame]]:
    try:
        tables = parse(read)
    except DataFormatError as err:  # names the file and what is wrong with it
        raise DataFormatError(f"{source}: {err}") from err
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        raise DataFormatError(f"{source}: cannot be parsed as MovieLens-100K ({type(err).__name__}: {err})") from err
    empty = [name for name, table in tables.items() if table.empty]
    if empty:
        raise DataFormatError(f"{source}: no rows in the {', '.join(empty)} table(s); the files hold a header only")
    return source, tables
