"""The store of what a served model saw (``serve --collect DB``): its predictions and the corrections people gave,
in a real database through SQLAlchemy, and the uploads as content-hash named files in a folder beside it.

SQLite (WAL mode: readers never block the writer, and several gunicorn workers append to one file, each waiting
on the lock at most ``BUSY_MS``) is the default: a path, embedded, nothing to start. A ``postgresql://`` URL
(driver psycopg 3) is for servers that run on several machines; their uploads folder is then ``--collect-files``
(default ``./collected-files``), a shared mount. Files are named by the SHA-256 of their bytes only, so the same
photo sent twice is stored once and no client-chosen name ever becomes a path. In the 2-worker test, 200 concurrent
uploads gave 200 rows and 1 file per distinct photo (tests/test_collect.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import time

from transferkit.errors import TransferkitError
from transferkit.files import atomic_path
from transferkit.log import logger

BUSY_MS = 2000  # how long a writer waits on a locked SQLite file before the batch counts as not collected
KINDS = ("wrong", "none", "right")  # a correction: "wrong: it is X", "none of these", or "right"
_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
_HEX = re.compile(r"^[0-9a-f]{64}$")


class StoreError(TransferkitError):
    """The database cannot be opened or written (corrupt, locked, unreachable)."""


def is_url(target: str) -> bool:
    return "://" in str(target)


def store_url(target: str) -> str:
    """The SQLAlchemy URL of ``target``: a path is a SQLite file; ``postgresql://`` gets the psycopg 3 driver."""
    target = str(target)
    if not is_url(target):
        return "sqlite:///" + os.path.abspath(target)
    if target.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + target.split("://", 1)[1]
    return target


def files_folder(target: str, files: str | None = None) -> str:
    """Where the uploads go: ``files`` if given, else ``DB.files/`` beside a SQLite file, else ./collected-files."""
    if files:
        return os.path.abspath(files)
    if not is_url(target):
        return os.path.abspath(str(target)) + ".files"
    return os.path.abspath("collected-files")


ADDED = ("answer",)  # columns of ``predictions`` after the first schema (nullable TEXT, added when missing)


def _tables(missing: tuple[str, ...] = ()):
    """The tables; ``missing``: the later columns an older store lacks (left out, so it reads as it is)."""
    import sqlalchemy as sa

    meta = sa.MetaData()
    predictions = sa.Table(
        "predictions", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(32), nullable=False, unique=True),
        sa.Column("created", sa.Float, nullable=False, index=True),
        sa.Column("model", sa.String(64)),
        sa.Column("image", sa.String(64), nullable=False, index=True),
        sa.Column("ext", sa.String(8)),
        sa.Column("filename", sa.String(200)),
        sa.Column("label", sa.String(200)),
        sa.Column("probability", sa.Float),
        sa.Column("novelty", sa.Float),
        sa.Column("unknown", sa.Boolean),
        sa.Column("top_k", sa.Text),
        sa.Column("latency_ms", sa.Float),
        sa.Column("worker", sa.Integer),
        *[sa.Column(name, sa.Text) for name in ADDED if name not in missing])  # answer: JSON, multi-label
    feedback = sa.Table(
        "feedback", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("prediction_uid", sa.String(32), nullable=False, index=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("label", sa.String(200)))
    models = sa.Table(
        "models", meta,
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("path", sa.Text),
        sa.Column("info", sa.Text))  # JSON: class names, backbone, image size, validation, reference
    return meta, predictions, feedback, models


class Store:
    """The database of ``target`` (a SQLite path or a URL) and its uploads folder; tables made when missing."""

    def __init__(self, target: str, files: str | None = None, create: bool = True):
        import sqlalchemy as sa

        self.target, self.url = str(target), store_url(target)
        self.files = files_folder(target, files)
        self.meta, self.predictions, self.feedback, self.models = _tables()
        if not create and not is_url(target) and not os.path.isfile(target):
            raise StoreError(f"{target}: no such store (serve --collect {target} makes it)")
        try:
            if self.url.startswith("sqlite"):
                self.engine = sa.create_engine(self.url, connect_args={"timeout": BUSY_MS / 1000})
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            else:
                self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=2, max_overflow=2)
        except Exception as exc:  # noqa: BLE001 - an unknown dialect, a missing driver: one line
            raise StoreError(f"{_shown(self.target)}: cannot open the store ({_reason(exc)})") from None
        if create:
            self._create()
        else:
            self._read_as_is()

    def _create(self) -> None:
        """CREATE the tables, and ADD the later columns an older store lacks; two workers starting together may
        race on either, so a failure is retried."""
        for attempt in range(3):
            try:
                self.meta.create_all(self.engine, checkfirst=True)
                self._upgrade()
                return
            except Exception as exc:  # noqa: BLE001 - corrupt file, lost race, unreachable server
                if attempt == 2:
                    raise StoreError(f"{_shown(self.target)}: cannot open the store ({_reason(exc)})") from None
                time.sleep(0.2 * (attempt + 1))

    def _missing(self) -> tuple[str, ...]:
        import sqlalchemy as sa

        have = {c["name"] for c in sa.inspect(self.engine).get_columns("predictions")}
        return tuple(name for name in ADDED if name not in have)

    def _upgrade(self) -> None:
        """ALTER TABLE ADD COLUMN for each later column missing (a store written by an earlier version)."""
        import sqlalchemy as sa

        for name in self._missing():
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.text(f"ALTER TABLE predictions ADD COLUMN {name} TEXT"))
                logger.info(f"{_shown(self.target)}: column predictions.{name} added (a store of an earlier schema)")
            except Exception:  # noqa: BLE001 - another worker added it first: checked again below
                if name in self._missing():
                    raise

    def _read_as_is(self) -> None:
        """A reader never alters the store: the table as an older store has it (its later columns read None)."""
        import sqlalchemy as sa

        try:
            missing = self._missing() if sa.inspect(self.engine).has_table("predictions") else ()
        except Exception:  # noqa: BLE001 - unreadable: read() says so in one line
            return
        if missing:
            self.meta, self.predictions, self.feedback, self.models = _tables(missing)

    def write_image(self, digest: str, data: bytes) -> str:
        """The upload's file (written once, atomically; an existing one is kept): its extension."""
        ext = image_ext(data)
        path = self.image_path(digest, ext)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
        return ext

    def image_path(self, digest: str, ext: str) -> str:
        if not _HEX.match(digest or "") or ext not in _EXT.values() and ext != "img":
            raise StoreError(f"not a stored image name: {digest!r}")
        return os.path.join(self.files, digest[:2], f"{digest}.{ext}")

    def insert_predictions(self, rows: list[dict]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.predictions.insert(), rows)

    def register_model(self, model_hash: str, path: str, info: dict) -> None:
        """The served model's summary (monitor's reference), once per model hash (a racing worker's is kept)."""
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            if conn.execute(sa.select(self.models.c.hash).where(self.models.c.hash == model_hash)).first():
                return
            try:
                conn.execute(self.models.insert(), [{"hash": model_hash, "created": time.time(), "path": path,
                                                     "info": json.dumps(info, ensure_ascii=False)}])
            except sa.exc.IntegrityError:
                pass

    def model_infos(self) -> dict[str, dict]:
        """{model hash: its summary} of the models that served into this store."""
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return {r.hash: json.loads(r.info or "{}") | {"path": r.path}
                    for r in conn.execute(sa.select(self.models))}

    def add_feedback(self, uid: str, kind: str, label: str | None) -> bool:
        """Record a correction of prediction ``uid``; False when no such prediction is stored."""
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            found = conn.execute(sa.select(self.predictions.c.id).where(self.predictions.c.uid == uid)).first()
            if found is None:
                return False
            conn.execute(self.feedback.insert(), [{"prediction_uid": uid, "created": time.time(), "kind": kind,
                                                   "label": label}])
        return True

    def read(self, since: float | None = None) -> tuple[list[dict], dict[str, dict]]:
        """(every stored prediction as a dict, oldest first; the latest correction of each prediction uid)."""
        import sqlalchemy as sa

        query = sa.select(self.predictions).order_by(self.predictions.c.id)
        if since is not None:
            query = query.where(self.predictions.c.created >= since)
        try:
            with self.engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(query)]
                fixes = conn.execute(sa.select(self.feedback).order_by(self.feedback.c.id)).all()
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"{_shown(self.target)}: cannot read the store ({_reason(exc)})") from None
        for row in rows:
            row["top_k"] = json.loads(row["top_k"] or "[]")
            row["answer"] = json.loads(row["answer"]) if row.get("answer") else None
        return rows, {f.prediction_uid: dict(f._mapping) for f in fixes}

    def count(self) -> int:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.predictions)).scalar())

    def close(self) -> None:
        self.engine.dispose()


def image_ext(data: bytes) -> str:
    """The stored file's extension, from the bytes' own format (never from the client's file name)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return _EXT.get(img.format, "img")
    except Exception:  # noqa: BLE001 - answered uploads decoded once already; anything else keeps a neutral name
        return "img"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # a commit survives a killed process (not a power cut)
    cursor.execute(f"PRAGMA busy_timeout={BUSY_MS}")
    cursor.close()


def _shown(target: str) -> str:
    """``target`` without a URL's password."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", str(target))


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return _shown(text[0] if text else type(exc).__name__)[:300]
