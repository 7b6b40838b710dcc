"""Crash-safe SQLite store of graphs, configurations and measured labels.

One file holds the computational graphs (compressed JSON keyed by their
fingerprint), the m-configurations (their canonical spec strings), tasks,
devices and labels: one numeric value per
``(graph, config, task, device, mode, kind)`` with the tool version that
measured it. ``kind`` is what was measured (``peak_memory_bytes``,
``latency_s``, ``flops``, ``params``, ``acc``, ``val_PCK`` ...); a memory label
keeps its breakdown in ``extra``.

Crash safety: the file is in WAL mode with ``synchronous=FULL`` and every
record (graph + config + all its labels) is one transaction, so a killed run
loses at most the record in flight and concurrent readers see whole records or
nothing. FULL costs one fsync per record: a few milliseconds against the
seconds a measurement takes, and in exchange a committed label survives a power
cut too, not just a killed process (NORMAL would only promise the latter).

An empty string in ``config``, ``task``, ``device`` or ``mode`` means "does not
apply": AIO-P's accuracy and FLOPs labels, for instance, belong to the
architecture, not to an m-configuration or a device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiop import __version__
from aiop.cache.errors import CacheError

if TYPE_CHECKING:
    from aiop.cg.graph import ComputeGraph

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Written into the SQLite header ("AIOP") so a foreign SQLite file is told apart
# without reading its tables.
APPLICATION_ID = 0x41494F50
SQLITE_MAGIC = b"SQLite format 3\x00"

# Kinds the profiler writes; anything else numeric in a record is kept too.
MEASUREMENT_KINDS = ("peak_memory_bytes", "latency_s", "flops", "params")
# Record fields that are part of the key or the provenance, not labels.
_RECORD_KEYS = frozenset({"mode", "device", "tool_version", "breakdown", "task", "config"})

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE graphs(
    fingerprint TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    num_nodes INTEGER NOT NULL,
    num_edges INTEGER NOT NULL,
    flops INTEGER NOT NULL,
    params INTEGER NOT NULL,
    json_gz BLOB NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL
);
CREATE TABLE configs(spec TEXT PRIMARY KEY, created TEXT NOT NULL);
CREATE TABLE tasks(
    name TEXT PRIMARY KEY,
    metric TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE devices(name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '{}');
CREATE TABLE labels(
    graph TEXT NOT NULL REFERENCES graphs(fingerprint),
    config TEXT NOT NULL REFERENCES configs(spec),
    task TEXT NOT NULL REFERENCES tasks(name),
    device TEXT NOT NULL REFERENCES devices(name),
    mode TEXT NOT NULL,
    kind TEXT NOT NULL,
    value REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    tool_version TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL,
    PRIMARY KEY(graph, config, task, device, mode, kind)
) WITHOUT ROWID;
-- the trainer's query ("all memory labels for device X, mode meta") and the
-- profiler's ("what is missing") both filter on these columns
CREATE INDEX labels_by_kind ON labels(kind, device, mode, task);
"""
_TABLES = ("graphs", "configs", "tasks", "devices", "labels")


# Stores open in this process, by real path. Closing ANY descriptor of a file
# drops every POSIX lock this process holds on it, SQLite's included, and a
# writer elsewhere may then checkpoint under a live reader (torn reads). So the
# header is read with plain I/O only while no Store here has the file open.
_OPEN: dict[str, int] = {}
_OPEN_LOCK = threading.Lock()


def _cg() -> Any:
    """``aiop.cg.graph``, imported on first use: importing the ``aiop.cg`` package
    loads torch (seconds), and reading or merging labels needs none of it."""
    from aiop.cg import graph

    return graph


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


@dataclass(frozen=True)
class GraphInfo:
    """A stored graph's headline facts (the graph itself via :meth:`Store.get_graph`)."""

    fingerprint: str
    name: str
    source: str
    num_nodes: int
    num_edges: int
    flops: int
    params: int
    meta: dict[str, Any]
    created: str


@dataclass(frozen=True)
class LabelRecord:
    """One measured value."""

    graph: str
    config: str
    task: str
    device: str
    mode: str
    kind: str
    value: float
    extra: dict[str, Any]
    tool_version: str
    created: str


@dataclass
class Record:
    """All labels of one ``(graph, config, task, device, mode)``, as the profiler wrote them."""

    graph: str
    config: str
    task: str
    device: str
    mode: str
    values: dict[str, float] = field(default_factory=dict)
    breakdown: dict[str, float] | None = None
    tool_version: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The profiler's result dict: values, breakdown, mode, device, tool_version."""
        out: dict[str, Any] = dict(self.values)
        if self.breakdown is not None:
            out["breakdown"] = dict(self.breakdown)
        out.update(mode=self.mode, device=self.device, tool_version=self.tool_version)
        return out


def check_spec(spec: Any) -> str:
    """The config key for ``spec``: a canonical ``key=value,...`` string ('' = no config).

    The store does not parse configurations (that is :mod:`aiop.mconfig`'s job);
    it only refuses strings that cannot be a spec, so a typo does not become a key.
    """
    if not isinstance(spec, str):
        spec = str(spec)  # e.g. an MConfig whose str() is its canonical spec
    if spec == "":
        return spec
    if any(c.isspace() for c in spec):
        raise CacheError(f"config spec {spec!r} contains whitespace; pass the canonical form")
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key or not value or "=" in value:
            raise CacheError(f"config spec {spec!r} is not key=value pairs separated by commas")
    return spec


def _check_value(kind: str, value: Any) -> float:
    if isinstance(value, bool) or (
        not isinstance(value, (int, float)) and not hasattr(value, "item")
    ):
        raise CacheError(f"label {kind!r} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CacheError(f"label {kind!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise CacheError(f"label {kind!r} must be finite, got {number}")
    return number


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or "\n" in value:
        raise CacheError(f"{what} must be a one-line string, got {value!r}")
    return value


def _sqlite_uri(path: Path, mode: str) -> str:
    return f"file:{quote(str(path.absolute()))}?mode={mode}"


def _check_header(path: Path) -> None:
    """Refuse a file that is not a whole SQLite database before SQLite touches it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(100)
    if not header.startswith(SQLITE_MAGIC):
        raise CacheError(f"{path}: not an SQLite file (is it a .pkl or .json cache?)")
    if len(header) < 100:
        raise CacheError(f"{path}: truncated SQLite file ({size} bytes)")
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise CacheError(f"{path}: corrupt SQLite header (page size {page_size})")
    if size % page_size:
        raise CacheError(f"{path}: truncated SQLite file ({size} bytes, pages of {page_size})")
    change_counter, pages = struct.unpack(">II", header[24:32])
    valid_for = struct.unpack(">I", header[92:96])[0]
    wal = path.with_name(path.name + "-wal")
    # With a WAL file present the header may run ahead of the file during a
    # checkpoint that a crash interrupted; SQLite repairs that on open.
    has_wal = wal.exists() and wal.stat().st_size > 0
    if change_counter == valid_for and pages * page_size > size and not has_wal:
        raise CacheError(f"{path}: truncated SQLite file ({size} of {pages * page_size} bytes)")


class Store:
    """An aiop cache file. Use as a context manager; one instance per thread.

    ``Store(path)`` creates the file when it is missing; ``readonly=True``
    requires it to exist and never writes. A file that is not an aiop cache
    raises :class:`CacheError` and is left as it was.
    """

    def __init__(
        self, path: str | os.PathLike[str], readonly: bool = False, *, timeout: float = 60.0
    ):
        self.path = Path(path)
        self.readonly = readonly
        self._depth = 0
        self._key = os.path.realpath(self.path)
        self._conn = None  # type: ignore[assignment]
        with _OPEN_LOCK:
            first = _OPEN.get(self._key, 0) == 0
            _OPEN[self._key] = _OPEN.get(self._key, 0) + 1
        try:
            self._conn = self._connect(timeout, check_header=first)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        with _OPEN_LOCK:
            left = _OPEN.get(self._key, 1) - 1
            if left > 0:
                _OPEN[self._key] = left
            else:
                _OPEN.pop(self._key, None)

    # -- opening -----------------------------------------------------------
    def _connect(self, timeout: float, check_header: bool) -> sqlite3.Connection:
        path = self.path
        fresh = not path.exists() or (path.is_file() and path.stat().st_size == 0)
        if path.exists() and not path.is_file():
            raise CacheError(f"{path}: not a file")
        if self.readonly and not path.exists():
            raise CacheError(f"{path}: no such cache file")
        if self.readonly and fresh:
            raise CacheError(f"{path}: empty file, not an aiop cache")
        if not path.parent.is_dir():
            raise CacheError(f"{path}: directory {path.parent} does not exist")
        if not fresh and check_header:
            with _OPEN_LOCK:  # no other Store of this process may open it meanwhile
                if _OPEN.get(self._key, 0) <= 1:
                    _check_header(path)
        mode = "ro" if self.readonly else ("rwc" if fresh else "rw")
        try:
            conn = sqlite3.connect(
                _sqlite_uri(path, mode), uri=True, timeout=timeout, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise CacheError(f"{path}: cannot open ({exc})") from None
        try:
            # Reads only, so a foreign or damaged file is refused untouched.
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            n_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if n_tables and app_id != APPLICATION_ID:
                raise CacheError(f"{path}: an SQLite database, but not an aiop cache")
            if n_tables and version != SCHEMA_VERSION:
                raise CacheError(
                    f"{path}: aiop cache schema {version}, this aiop reads {SCHEMA_VERSION}"
                )
            if self.readonly:
                if not n_tables:
                    raise CacheError(f"{path}: empty SQLite database, not an aiop cache")
                conn.execute("PRAGMA query_only=ON")
            else:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                if not n_tables:
                    self._create_schema(conn)
                else:
                    # written only when it changes, so opening rarely takes the write lock
                    conn.execute(
                        "INSERT INTO meta VALUES('aiop_version_last', ?) ON CONFLICT(key)"
                        " DO UPDATE SET value=excluded.value WHERE value != excluded.value",
                        (__version__,),
                    )
        except CacheError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise CacheError(f"{path}: corrupt or unreadable cache ({exc})") from None
        return conn

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have created it while we waited for the lock.
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                # execute() one statement at a time: executescript() would commit early
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta VALUES(?, ?)",
                    [
                        ("application", "aiop.cache"),
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("aiop_version_created", __version__),
                        ("aiop_version_last", __version__),
                        ("created", _now()),
                    ],
                )
                # '' rows stand for "no task / no device / no config"
                conn.execute("INSERT INTO tasks(name) VALUES('')")
                conn.execute("INSERT INTO devices(name) VALUES('')")
                conn.execute("INSERT INTO configs VALUES('', ?)", (_now(),))
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]
            self._release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, readonly={self.readonly})"

    # -- plumbing ------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one atomic commit (nested calls join the outer one)."""
        if self.readonly:
            raise CacheError(f"{self.path}: opened read-only")
        if self._conn is None:
            raise CacheError(f"{self.path}: store is closed")
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise CacheError(f"{self.path}: cannot write ({exc})") from None
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            with contextlib.suppress(sqlite3.Error):  # keep the original error
                self._conn.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise CacheError(f"{self.path}: commit failed ({exc})") from None

    def _query(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        if self._conn is None:
            raise CacheError(f"{self.path}: store is closed")
        try:
            return self._conn.execute(sql, tuple(params))
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: {exc}") from None

    def _iter(self, sql: str, params: Iterable[Any] = ()) -> Iterator[tuple[Any, ...]]:
        cursor = self._query(sql, params)
        try:
            while rows := cursor.fetchmany(1024):
                yield from rows
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: {exc}") from None
        finally:
            cursor.close()

    # -- graphs ----------------------------------------------------------------
    def put_graph(
        self, cg: ComputeGraph, name: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> str:
        """Store ``cg`` (idempotent) and return its fingerprint; ``meta`` merges into the stored."""
        cgm = _cg()
        if not isinstance(cg, cgm.ComputeGraph):
            raise CacheError(f"expected a ComputeGraph, got {type(cg).__name__}")
        if name is None and not meta:
            fp = cg.fingerprint
            if self.has_graph(fp):  # the common re-put: skip serialising it again
                return fp
        try:
            data = cg.to_dict()
            blob = zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 6)
            meta_json = _dumps(dict(meta or {}))
        except (cgm.CGError, TypeError, ValueError) as exc:
            raise CacheError(f"graph {cg.name!r} cannot be stored: {exc}") from None
        fp = data["fingerprint"]
        with self.transaction():
            self._query(
                "INSERT INTO graphs VALUES(?,?,?,?,?,?,?,?,?,?) ON CONFLICT(fingerprint) DO UPDATE"
                " SET meta = json_patch(graphs.meta, excluded.meta),"
                " name = CASE WHEN graphs.name = '' THEN excluded.name ELSE graphs.name END",
                (
                    fp,
                    _check_name("graph name", cg.name if name is None else name),
                    cg.source,
                    cg.num_nodes,
                    cg.num_edges,
                    cg.total_flops,
                    cg.total_params,
                    blob,
                    meta_json,
                    _now(),
                ),
            )
        return fp

    def has_graph(self, fingerprint: str) -> bool:
        return (
            self._query("SELECT 1 FROM graphs WHERE fingerprint=?", (fingerprint,)).fetchone()
            is not None
        )

    def get_graph(self, fingerprint: str) -> ComputeGraph:
        """The stored graph; :class:`CacheError` when it is missing or damaged."""
        row = self._query(
            "SELECT json_gz FROM graphs WHERE fingerprint=?", (fingerprint,)
        ).fetchone()
        if row is None:
            raise CacheError(f"{self.path}: no graph {fingerprint!r}")
        cgm = _cg()
        try:
            return cgm.ComputeGraph.from_json(zlib.decompress(row[0]))
        except (zlib.error, cgm.CGError) as exc:
            raise CacheError(f"{self.path}: graph {fingerprint} is damaged ({exc})") from None

    def graph_info(self, fingerprint: str) -> GraphInfo:
        for info in self.graphs(fingerprints=[fingerprint]):
            return info
        raise CacheError(f"{self.path}: no graph {fingerprint!r}")

    def graphs(
        self,
        *,
        name: str | None = None,
        source: str | None = None,
        fingerprints: Iterable[str] | None = None,
    ) -> Iterator[GraphInfo]:
        """Stored graphs (``name`` is an SQL LIKE pattern), ordered by fingerprint."""
        where, params = [], []
        if name is not None:
            where.append("name LIKE ?")
            params.append(name)
        if source is not None:
            where.append("source = ?")
            params.append(source)
        if fingerprints is not None:
            fps = list(fingerprints)
            where.append(f"fingerprint IN ({','.join('?' * len(fps))})")
            params.extend(fps)
        sql = (
            "SELECT fingerprint, name, source, num_nodes, num_edges, flops, params, meta, created"
            " FROM graphs"
        )
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY fingerprint"
        for row in self._iter(sql, params):
            yield GraphInfo(*row[:7], meta=json.loads(row[7]), created=row[8])

    # -- configs, tasks, devices -----------------------------------------------
    def put_config(self, spec: Any) -> str:
        spec = check_spec(spec)
        with self.transaction():
            self._query("INSERT OR IGNORE INTO configs VALUES(?, ?)", (spec, _now()))
        return spec

    def configs(self) -> list[str]:
        return [r[0] for r in self._query("SELECT spec FROM configs ORDER BY spec")]

    def put_task(
        self, name: str, metric: str = "", description: Mapping[str, Any] | None = None
    ) -> None:
        _check_name("task", name)
        with self.transaction():
            self._query(
                "INSERT INTO tasks VALUES(?,?,?) ON CONFLICT(name) DO UPDATE"
                " SET metric=excluded.metric, description=excluded.description",
                (name, metric, _dumps(dict(description or {}))),
            )

    def tasks(self) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT name, metric, description FROM tasks ORDER BY name")
        return {n: {"metric": m, "description": json.loads(d)} for n, m, d in rows}

    def put_device(self, name: str, description: Mapping[str, Any] | None = None) -> None:
        _check_name("device", name)
        with self.transaction():
            self._query(
                "INSERT INTO devices VALUES(?,?) ON CONFLICT(name) DO UPDATE"
                " SET description=excluded.description",
                (name, _dumps(dict(description or {}))),
            )

    def devices(self) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT name, description FROM devices ORDER BY name")
        return {n: json.loads(d) for n, d in rows}

    # -- labels ------------------------------------------------------------------
    def _graph_key(self, graph: ComputeGraph | str) -> str:
        if not isinstance(graph, str):
            return self.put_graph(graph)  # type: ignore[arg-type]
        if not self.has_graph(graph):
            raise CacheError(f"{self.path}: unknown graph {graph!r}; put_graph it first")
        return graph

    def _ensure_keys(self, config: str, task: str, device: str) -> None:
        now = _now()
        self._query("INSERT OR IGNORE INTO configs VALUES(?, ?)", (config, now))
        self._query("INSERT OR IGNORE INTO tasks(name) VALUES(?)", (task,))
        self._query("INSERT OR IGNORE INTO devices(name) VALUES(?)", (device,))

    def put_label(
        self,
        graph: ComputeGraph | str,
        config: Any,
        kind: str,
        value: float,
        *,
        task: str = "",
        device: str = "",
        mode: str = "",
        extra: Mapping[str, Any] | None = None,
        tool_version: str = "",
        replace: bool = True,
    ) -> bool:
        """Store one label in one transaction; False when it existed and ``replace`` is off."""
        return bool(
            self.put_labels(
                graph, config, [(kind, value, extra)], task=task, device=device, mode=mode,
                tool_version=tool_version, replace=replace,
            )
        )  # fmt: skip

    def put_labels(
        self,
        graph: ComputeGraph | str,
        config: Any,
        labels: Iterable[tuple[str, float, Mapping[str, Any] | None]],
        *,
        task: str = "",
        device: str = "",
        mode: str = "",
        tool_version: str = "",
        replace: bool = True,
    ) -> int:
        """Store ``(kind, value, extra)`` labels of one key in one transaction; rows written."""
        spec = check_spec(config)
        for what, v in (("task", task), ("device", device), ("mode", mode)):
            _check_name(what, v)
        now, version = _now(), str(tool_version)
        rows = []
        for kind, value, extra in labels:
            if not _check_name("kind", kind):
                raise CacheError("label kind must not be empty")
            number = _check_value(kind, value)
            try:
                extra_json = _dumps(dict(extra or {}))
            except (TypeError, ValueError) as exc:
                raise CacheError(f"label {kind!r}: extra is not JSON ({exc})") from None
            rows.append([kind, number, extra_json])
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self.transaction():
            fp = self._graph_key(graph)
            self._ensure_keys(spec, task, device)
            key = (fp, spec, task, device, mode)
            try:
                cur = self._conn.executemany(
                    f"{verb} INTO labels VALUES(?,?,?,?,?,?,?,?,?,?)",
                    [(*key, *row, version, now) for row in rows],
                )
            except sqlite3.DatabaseError as exc:
                raise CacheError(f"{self.path}: {exc}") from None
            return max(cur.rowcount, 0)

    def put_record(
        self,
        graph: ComputeGraph | str,
        config: Any,
        record: Mapping[str, Any],
        *,
        task: str = "",
        device: str | None = None,
        mode: str | None = None,
        tool_version: str | None = None,
    ) -> list[str]:
        """Store a profiler result (graph, config and every numeric field) in ONE transaction.

        ``device``, ``mode`` and ``tool_version`` default to the record's own
        fields; ``breakdown`` rides along with ``peak_memory_bytes``. Returns
        the kinds written.
        """
        if not isinstance(record, Mapping):
            raise CacheError(f"a record must be a dict, got {type(record).__name__}")
        device = str(record.get("device", "")) if device is None else device
        mode = str(record.get("mode", "")) if mode is None else mode
        tool_version = str(record.get("tool_version", "")) if tool_version is None else tool_version
        breakdown = record.get("breakdown")
        if breakdown is not None:
            if not isinstance(breakdown, Mapping):
                raise CacheError("record breakdown must be a dict of bytes")
            breakdown = {str(k): _check_value(f"breakdown.{k}", v) for k, v in breakdown.items()}
        values: dict[str, float] = {}
        info: dict[str, Any] = {}
        for key, value in record.items():
            if key in _RECORD_KEYS or value is None:  # None: not measured in this mode
                continue
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric or hasattr(value, "item") or key in MEASUREMENT_KINDS:
                values[key] = _check_value(key, value)
            else:
                info[key] = value  # kept beside the labels, e.g. a notes string
        if not values:
            raise CacheError("record has no numeric labels")
        if breakdown is not None and "peak_memory_bytes" not in values:
            raise CacheError("record has a breakdown but no peak_memory_bytes")
        labels = []
        for kind, value in values.items():
            extra: dict[str, Any] = {"info": info} if info else {}
            if kind == "peak_memory_bytes" and breakdown is not None:
                extra["breakdown"] = breakdown
            labels.append((kind, value, extra))
        self.put_labels(
            graph, config, labels, task=task, device=device, mode=mode, tool_version=tool_version
        )
        return list(values)

    def has_label(
        self,
        graph: str,
        config: Any,
        kind: str,
        *,
        task: str = "",
        device: str = "",
        mode: str = "",
    ) -> bool:
        row = self._query(
            "SELECT 1 FROM labels WHERE graph=? AND config=? AND task=? AND device=? AND mode=?"
            " AND kind=?",
            (graph, check_spec(config), task, device, mode, kind),
        ).fetchone()
        return row is not None

    def get_record(
        self, graph: str, config: Any, *, task: str = "", device: str = "", mode: str = ""
    ) -> dict[str, Any] | None:
        """The profiler dict for one key, or None when nothing is stored."""
        for rec in self.records(graph=graph, config=config, task=task, device=device, mode=mode):
            return rec.as_dict()
        return None

    def _existing(
        self, kinds: list[str], device: str, mode: str, task: str
    ) -> set[tuple[str, str, str]]:
        sql = (
            f"SELECT graph, config, kind FROM labels WHERE kind IN ({','.join('?' * len(kinds))})"
            " AND device=? AND mode=? AND task=?"
        )
        return set(self._iter(sql, [*kinds, device, mode, task]))  # type: ignore[arg-type]

    def missing(
        self,
        graphs: Iterable[str],
        configs: Iterable[Any],
        kinds: Iterable[str] = MEASUREMENT_KINDS,
        *,
        device: str = "",
        mode: str = "",
        task: str = "",
    ) -> list[tuple[str, str, str]]:
        """The ``(graph, config, kind)`` triples of the product that have no label yet."""
        kinds = list(kinds)
        specs = [check_spec(c) for c in configs]
        have = self._existing(kinds, device, mode, task)
        return [(g, c, k) for g in graphs for c in specs for k in kinds if (g, c, k) not in have]

    def missing_pairs(
        self,
        graphs: Iterable[str],
        configs: Iterable[Any],
        kinds: Iterable[str] = MEASUREMENT_KINDS,
        *,
        device: str = "",
        mode: str = "",
        task: str = "",
    ) -> list[tuple[str, str]]:
        """The ``(graph, config)`` pairs lacking any of ``kinds``: what a resumed run measures."""
        seen: dict[tuple[str, str], None] = {}
        for g, c, _ in self.missing(graphs, configs, kinds, device=device, mode=mode, task=task):
            seen[(g, c)] = None
        return list(seen)

    def _label_filter(self, **filters: Any) -> tuple[str, list[Any]]:
        where, params = [], []
        for col, value in filters.items():
            if value is None:
                continue
            if col == "config":
                value = check_spec(value)
            if isinstance(value, (list, tuple, set, frozenset)):
                value = list(value)
                where.append(f"{col} IN ({','.join('?' * len(value))})")
                params.extend(value)
            else:
                where.append(f"{col} = ?")
                params.append(value)
        return (" WHERE " + " AND ".join(where) if where else ""), params

    def labels(
        self,
        *,
        graph: str | None = None,
        config: Any = None,
        kind: str | Iterable[str] | None = None,
        task: str | None = None,
        device: str | None = None,
        mode: str | None = None,
    ) -> Iterator[LabelRecord]:
        """Labels matching every given filter (None = any; a list = any of), in key order."""
        if kind is not None and not isinstance(kind, str):
            kind = tuple(kind)
        where, params = self._label_filter(
            kind=kind, device=device, mode=mode, task=task, graph=graph, config=config
        )
        sql = (
            "SELECT graph, config, task, device, mode, kind, value, extra, tool_version, created"
            f" FROM labels{where} ORDER BY graph, config, task, device, mode, kind"
        )
        for row in self._iter(sql, params):
            yield LabelRecord(
                *row[:7], extra=json.loads(row[7]), tool_version=row[8], created=row[9]
            )

    def records(
        self,
        *,
        graph: str | None = None,
        config: Any = None,
        task: str | None = None,
        device: str | None = None,
        mode: str | None = None,
        kinds: Iterable[str] | None = None,
    ) -> Iterator[Record]:
        """Labels grouped per ``(graph, config, task, device, mode)``, for training a predictor.

        With ``kinds`` only records that have every one of them are yielded.
        """
        want = set(kinds) if kinds is not None else set()
        current: Record | None = None
        rows = self.labels(graph=graph, config=config, task=task, device=device, mode=mode)
        for lab in rows:
            key = (lab.graph, lab.config, lab.task, lab.device, lab.mode)
            if current is None or key != (
                current.graph, current.config, current.task, current.device, current.mode
            ):  # fmt: skip
                if current is not None and want <= current.values.keys():
                    yield current
                current = Record(*key)
            current.values[lab.kind] = lab.value
            if "breakdown" in lab.extra:
                current.breakdown = lab.extra["breakdown"]
            current.tool_version = lab.tool_version or current.tool_version
        if current is not None and want <= current.values.keys():
            yield current

    # -- whole-file operations ---------------------------------------------------
    def count(self) -> dict[str, int]:
        """Rows per table (the '' placeholders for 'no config/task/device' not counted)."""
        out = {}
        for table in _TABLES:
            key = {"configs": "spec"}.get(table, "name")
            where = f" WHERE {key} != ''" if table in ("configs", "tasks", "devices") else ""
            out[table] = self._query(f"SELECT count(*) FROM {table}{where}").fetchone()[0]
        return out

    def meta(self) -> dict[str, str]:
        return dict(self._query("SELECT key, value FROM meta").fetchall())

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` plus the foreign keys: 'ok' when sound."""
        result = [r[0] for r in self._query("PRAGMA integrity_check")]
        fk = self._query("PRAGMA foreign_key_check").fetchall()
        if fk:
            result.append(f"{len(fk)} foreign-key violations")
        return "ok" if result == ["ok"] else "; ".join(result)

    def to_dict(self) -> dict[str, Any]:
        """Everything in the store as plain JSON data (graphs in full)."""
        return {
            "format": "aiop.cache",
            "schema": SCHEMA_VERSION,
            "aiop_version": __version__,
            "graphs": [
                {**asdict(info), "graph": self.get_graph(info.fingerprint).to_dict()}
                for info in self.graphs()
            ],
            "tasks": self.tasks(),
            "devices": self.devices(),
            "configs": [c for c in self.configs() if c],
            "labels": [asdict(lab) for lab in self.labels()],
        }

    def export_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically (a reader never sees half a file)."""
        return atomic_write(Path(path), json.dumps(self.to_dict(), indent=1).encode())

    def import_json(self, path: str | os.PathLike[str], *, replace: bool = False) -> dict[str, int]:
        """Add an :meth:`export_json` file's contents; returns counts of graphs and labels added."""
        path = Path(path)
        data = read_export_json(path)
        added = {"graphs": 0, "labels": 0}
        with self.transaction():
            for name, t in data.get("tasks", {}).items():
                self.put_task(name, t.get("metric", ""), t.get("description"))
            for name, d in data.get("devices", {}).items():
                self.put_device(name, d)
            for g in data["graphs"]:
                fp = g.get("fingerprint")
                if not self.has_graph(fp):
                    added["graphs"] += 1
                try:
                    graph = _cg().ComputeGraph.from_dict(g["graph"])
                except (_cg().CGError, KeyError, TypeError) as exc:
                    raise CacheError(f"{path}: bad graph {fp} ({exc})") from None
                self.put_graph(graph, g.get("name"), g.get("meta"))
            for lab in data["labels"]:
                added["labels"] += self.put_label(
                    lab["graph"], lab["config"], lab["kind"], lab["value"], task=lab["task"],
                    device=lab["device"], mode=lab["mode"], extra=lab.get("extra"),
                    tool_version=lab.get("tool_version", ""), replace=replace,
                )  # fmt: skip
        return added

    # -- AIO-P pickles (see aiop.cache.aiop_pkl) ------------------------------
    def import_aiop_pkl(
        self,
        path: str | os.PathLike[str],
        trust_pickle: bool = False,
        *,
        task: str = "classification",
    ) -> Any:
        """Import an AIO-P ``.pkl`` cache (only with ``trust_pickle``); returns an ImportReport."""
        from aiop.cache.aiop_pkl import import_aiop_pkl

        return import_aiop_pkl(self, path, trust_pickle=trust_pickle, task=task)

    def export_aiop_pkl(
        self, path: str | os.PathLike[str], *, metric: str = "acc", task: str | None = None
    ) -> int:
        """Write graphs with a ``metric`` label as an AIO-P ``.pkl``; returns entries written."""
        from aiop.cache.aiop_pkl import export_aiop_pkl

        return export_aiop_pkl(self, path, metric=metric, task=task)


def read_export_json(path: Path) -> dict[str, Any]:
    """Load and sanity-check an :meth:`Store.export_json` file."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CacheError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path}: not a JSON cache export ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "aiop.cache":
        raise CacheError(f"{path}: JSON, but not an aiop cache export")
    if data.get("schema") != SCHEMA_VERSION:
        raise CacheError(
            f"{path}: export schema {data.get('schema')!r}, this aiop reads {SCHEMA_VERSION}"
        )
    return data


def atomic_write(path: Path, payload: bytes) -> Path:
    """Write ``payload`` to a temporary sibling, fsync, and rename it over ``path``."""
    if not path.parent.is_dir():
        raise CacheError(f"{path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
