"""Tests for synapse.py, against real parts.

The providers are exercised against a real HTTP server on 127.0.0.1 (the
``FakeProvider`` below) that speaks both wire formats byte for byte; the
command line runs in a subprocess with an isolated HOME, XDG_CONFIG_HOME and
database, as users run it.  No test touches the internet.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import synapse

HERE = Path(__file__).resolve().parent
SYNAPSE = str(HERE / "synapse.py")
# The synapse command as the installed console script runs it: the module
# imported (its bytecode cached), then main().  `python synapse.py` from the
# checkout, which compiles the whole file at every start, has tests of its own.
COMMAND = [sys.executable, "-c", "import sys, synapse; sys.exit(synapse.main())"]
KEY = "sk-test-SECRET-0123456789abcdef"


# ---------------------------------------------------------------------------
# A real HTTP server that plays a provider.
# ---------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted HTTP response.

    ``chunks`` are written one network write each, ``delay`` seconds apart
    (``head_delay`` before the status line); ``drop`` closes the socket after
    them without ending the response; ``encoding`` ("gzip" or "deflate")
    compresses the whole body and says so in ``Content-Encoding``, whatever the
    client asked for.
    """

    status: int = 200
    chunks: List[bytes] = field(default_factory=list)
    headers: Dict[str, str] = field(default_factory=dict)
    content_type: str = "text/event-stream"
    delay: float = 0.0
    drop: bool = False
    chunked: bool = True
    head_delay: float = 0.0
    encoding: str = ""


def compressed(data: bytes, encoding: str) -> bytes:
    import gzip
    import zlib
    return gzip.compress(data) if encoding == "gzip" else zlib.compress(data)


@dataclass
class Received:
    path: str
    headers: Dict[str, str]
    body: Optional[dict]
    method: str = "POST"


def sse(*payloads: object) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, bytes) else json.dumps(p, ensure_ascii=False).encode()) + b"\n\n"
                    for p in payloads)


def openai_chunk(text: Optional[str], **delta: object) -> dict:
    if text is not None:
        delta["content"] = text
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def openai_stream(*pieces: str, done: bool = True) -> bytes:
    body = sse(openai_chunk(None, role="assistant"), *[openai_chunk(p) for p in pieces])
    return body + (b"data: [DONE]\n\n" if done else b"")


def hello() -> "Reply":
    """The reply most tests need and never look at."""
    return Reply(chunks=[openai_stream("Hello", " from", " the server")])


def anthropic_event(kind: str, **fields: object) -> bytes:
    return (f"event: {kind}\ndata: ".encode()
            + json.dumps({"type": kind, **fields}, ensure_ascii=False).encode()
            + b"\n\n")


def anthropic_stream(*pieces: str, stop: bool = True) -> bytes:
    body = anthropic_event("message_start", message={"id": "msg_1", "type": "message",
                                                      "role": "assistant", "content": []})
    body += anthropic_event("content_block_start", index=0,
                            content_block={"type": "text", "text": ""})
    body += anthropic_event("ping")
    for piece in pieces:
        body += anthropic_event("content_block_delta", index=0,
                                delta={"type": "text_delta", "text": piece})
    body += anthropic_event("content_block_stop", index=0)
    body += anthropic_event("message_delta", delta={"stop_reason": "end_turn"},
                            usage={"output_tokens": 3})
    return body + (anthropic_event("message_stop") if stop else b"")


class FakeProvider:
    """ThreadingHTTPServer on 127.0.0.1 answering from a queue of Replies."""

    def __init__(self) -> None:
        self.replies: "queue.Queue[Reply]" = queue.Queue()
        self.received: List[Received] = []
        self.unscripted: List[str] = []  # requests that found the queue empty: a test bug
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                owner.received.append(Received(self.path, dict(self.headers.items()),
                                               json.loads(raw) if raw else None, self.command))
                try:
                    reply = owner.replies.get_nowait()
                except queue.Empty:
                    owner.unscripted.append(self.path)
                    reply = UNSCRIPTED
                if reply.head_delay:
                    time.sleep(reply.head_delay)
                if reply.encoding:
                    reply = Reply(**{**reply.__dict__, "chunks": [
                        compressed(b"".join(reply.chunks), reply.encoding)],
                        "headers": {**reply.headers, "Content-Encoding": reply.encoding}})
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.flush()
                try:
                    for chunk in reply.chunks:
                        if reply.delay:
                            time.sleep(reply.delay)
                        if reply.chunked:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        else:
                            self.wfile.write(chunk)
                        self.wfile.flush()
                    if reply.drop:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if reply.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A client that hangs up mid-reply is a case under test, not news
        # (and in-process runs would see the report on their own stderr).
        self.server.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def queue(self, *replies: Reply) -> None:
        for reply in replies:
            self.replies.put(reply)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# What a request gets when the test scripted no reply for it; the fixture then
# fails the test, so that a test which queued too few replies cannot pass.
UNSCRIPTED = Reply(status=418, chunks=[b'{"error": {"message": "no reply was scripted"}}'],
                   content_type="application/json")


@pytest.fixture
def server():
    fake = FakeProvider()
    yield fake
    fake.close()
    assert not fake.unscripted, f"requests with no scripted reply: {fake.unscripted}"


# ---------------------------------------------------------------------------
# An isolated user: HOME, XDG_CONFIG_HOME, config and database of their own.
# ---------------------------------------------------------------------------


class User:
    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.xdg = root / "xdg"
        self.home.mkdir()
        self.config_dir = self.xdg / "synapse"
        self.db_path = self.config_dir / "sessions.db"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.endswith("_API_KEY") and not k.startswith("SYNAPSE_")
                    and k != "PYTHONDONTWRITEBYTECODE"}
        self.env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.xdg),
                        PYTHONIOENCODING="utf-8", COLUMNS="200",
                        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))

    def write_config(self, text: str, mode: int = 0o600) -> Path:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        path = self.config_dir / "config.toml"
        path.write_text(text, encoding="utf-8")
        path.chmod(mode)
        return path

    def use_server(self, server: FakeProvider, provider: str = "deepseek", extra: str = "") -> None:
        self.write_config(f'provider = "{provider}"\nbase_url = "{server.url}"\n'
                          f'api_key = "{KEY}"\n{extra}')

    def spawn(self, *args: str, input: Optional[bytes] = None, env: Optional[dict] = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
        """``synapse ARGS`` as a user runs it: a process of its own."""
        return subprocess.run(
            [*COMMAND, *args], input=input, capture_output=True,
            env={**self.env, **(env or {})}, timeout=timeout, cwd=self.root,
            stdin=None if input is not None else subprocess.DEVNULL)

    def run(self, *args: str, input: Optional[bytes] = None, env: Optional[dict] = None,
            tty: str = "") -> subprocess.CompletedProcess:
        """``synapse.main(ARGS)`` in this process, in the user's environment, its
        streams captured: what ``spawn`` gives, without a process start.
        ``tty`` names the streams that claim to be a terminal ("in", "out", "err")."""
        streams = (sys.stdin, sys.stdout, sys.stderr)
        saved_env, saved_cwd = dict(os.environ), os.getcwd()
        sys.stdin = FakeStream(input or b"", "in" in tty)
        sys.stdout, sys.stderr = FakeStream(b"", "out" in tty), FakeStream(b"", "err" in tty)
        os.environ.clear()
        os.environ.update({**self.env, **(env or {})})
        time.tzset()  # a TZ of the user's own, as a process would read it
        os.chdir(self.root)
        try:
            code = synapse.main(list(args))
            out, error = sys.stdout, sys.stderr
            for stream in (out, error):
                stream.flush()
        finally:
            sys.stdin, sys.stdout, sys.stderr = streams
            os.environ.clear()
            os.environ.update(saved_env)
            time.tzset()
            os.chdir(saved_cwd)
        return subprocess.CompletedProcess(["synapse", *args], code, out.buffer.getvalue(),
                                           error.buffer.getvalue())

    def ok(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
        """Run a command that must succeed (setting the scene for a test)."""
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, err(result)
        return result

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen([*COMMAND, *args], env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=self.root, **kwargs)

    def rows(self, sql: str, params: tuple = ()) -> list:
        conn = sqlite3.connect(self.db_path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def messages(self) -> list:
        return self.rows("SELECT role, content FROM messages ORDER BY rowid")

    def session_ids(self) -> list:
        return [r[0] for r in self.rows("SELECT id FROM sessions ORDER BY rowid")]


class FakeStream(io.TextIOWrapper):
    """A standard stream for ``User.run``: UTF-8 bytes in memory, a terminal or not."""

    def __init__(self, data: bytes, tty: bool):
        super().__init__(io.BytesIO(data), encoding="utf-8", write_through=True)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an in-memory stream has no file descriptor")


@pytest.fixture
def user(tmp_path):
    return User(tmp_path)


def text(result: subprocess.CompletedProcess) -> str:
    return result.stdout.decode("utf-8")


def err(result: subprocess.CompletedProcess) -> str:
    return result.stderr.decode("utf-8")


def assert_one_error_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """The documented exit code and one `synapse: error:` line, no traceback."""
    stderr = err(result)
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines()
             if line.startswith("synapse: error:")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


@pytest.fixture
def store(tmp_path):
    s = synapse.SqliteStore(str(tmp_path / "store.db"))
    yield s
    s.close()


def make_session(store, *, provider="echo", model="echo", updated=None, created=None,
                 name=None, session_id=None) -> synapse.Session:
    session = synapse.Session.new(provider, model, name=name)
    if session_id is not None:
        session = session._replace(id=uuid.UUID(session_id))
    if created is not None:
        session = session._replace(created_at=created)
    if updated is not None:
        session = session._replace(updated_at=updated)
    store.create_session(session)
    return session


def set_updated(path, session_id, moment: datetime) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?",
                 (synapse.format_timestamp(moment), str(session_id)))
    conn.commit()
    conn.close()


NOW = datetime.now(timezone.utc)
# Rows written straight to a database, as other tools or older versions might.
INSERT_MESSAGE = "INSERT INTO messages (id, session_id, role, content, timestamp) VALUES"


# ---------------------------------------------------------------------------
# Storage: records, the store API, migrations, cleanup (SPEC §4)
# ---------------------------------------------------------------------------


def test_role_values_and_records():
    assert [r.value for r in synapse.Role] == ["system", "user", "assistant"]
    session = synapse.Session.new("echo", "echo", system_prompt="be brief", name="n")
    assert isinstance(session.id, uuid.UUID) and session.created_at == session.updated_at
    assert session.created_at.tzinfo is not None
    message = synapse.StoredMessage.new(session.id, synapse.Role.USER, "hi")
    assert message.role is synapse.Role.USER and message.session_id == session.id
    assert synapse.SessionConfig() == synapse.SessionConfig(100, 90, True, None)
    # The fields, in SPEC §4's order, so positional construction means the same.
    assert synapse.Session._fields == ("id", "name", "provider", "model", "system_prompt",
                                       "created_at", "updated_at", "forked_from")
    assert session.forked_from is None
    assert synapse.SessionSummary._fields == ("id", "name", "provider", "model", "created_at",
                                              "updated_at", "message_count", "preview")
    assert synapse.StoredMessage._fields == ("id", "session_id", "role", "content", "timestamp",
                                             "provider", "model", "input_tokens", "output_tokens",
                                             "stop_reason")
    assert message[5:] == (None,) * 5
    reply = synapse.StoredMessage.new(session.id, synapse.Role.ASSISTANT, "yo", provider="echo",
                                      model="echo", input_tokens=1, output_tokens=2, stop_reason="stop")
    assert reply[5:] == ("echo", "echo", 1, 2, "stop")
    assert synapse.CleanupResult._fields == ("sessions_deleted", "by_max_limit", "by_retention")
    assert synapse.SessionConfig._fields == ("max_sessions", "retention_days", "auto_cleanup",
                                             "database_url")
    with pytest.raises(AttributeError):
        session.name = "records are immutable"  # type: ignore[misc]
    assert synapse.CleanupResult(3, 1, 2) == synapse.CleanupResult(
        sessions_deleted=3, by_max_limit=1, by_retention=2)
    for cls in (synapse.DatabaseError, synapse.SessionNotFound, synapse.MigrationError,
                synapse.InvalidData):
        assert issubclass(cls, synapse.StorageError)
    assert synapse.SessionNotFound("abc").session_id == "abc"


def test_session_store_protocol_has_exactly_the_eight_methods():
    methods = {name for name in vars(synapse.SessionStore)
               if not name.startswith("_") and callable(getattr(synapse.SessionStore, name))}
    assert methods == {"create_session", "get_session", "list_sessions", "touch_session",
                       "delete_session", "add_message", "get_messages", "cleanup"}
    store_methods = set(dir(synapse.SqliteStore))
    assert methods <= store_methods


def test_timestamps_are_stored_fixed_width_utc(store):
    session = make_session(store)
    store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.USER, "x"))
    conn = sqlite3.connect(store.path)
    created, updated = conn.execute("SELECT created_at, updated_at FROM sessions").fetchone()
    (stamp,) = conn.execute("SELECT timestamp FROM messages").fetchone()
    for value in (created, updated, stamp):
        assert len(value) == len("2026-11-24T09:30:00.123456+00:00") and value.endswith("+00:00")
    assert updated >= created


def test_session_round_trip_and_get_missing(store):
    session = synapse.Session.new("anthropic", "claude", system_prompt="sys", name="Name")
    store.create_session(session)
    assert store.get_session(session.id) == session
    assert store.get_session(uuid.uuid4()) is None


def test_messages_come_back_in_insertion_order_when_timestamps_tie(store):
    session = make_session(store)
    moment = datetime(2026, 1, 1, tzinfo=timezone.utc)
    contents = [f"m{i}" for i in range(30)]
    random.Random(4).shuffle(contents)
    for content in contents:
        message = synapse.StoredMessage(uuid.uuid4(), session.id, synapse.Role.USER, content, moment)
        store.add_message(message)
    assert [m.content for m in store.get_messages(session.id)] == contents


def test_add_message_updates_session_and_refuses_unknown_session(store):
    session = make_session(store, updated=NOW - timedelta(days=3))
    store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.USER, "hi"))
    assert store.get_session(session.id).updated_at > NOW - timedelta(minutes=1)
    with pytest.raises(synapse.SessionNotFound) as caught:
        store.add_message(synapse.StoredMessage.new(uuid.uuid4(), synapse.Role.USER, "lost"))
    assert caught.value.session_id is not None


def test_a_transaction_sqlite_ended_itself_reports_the_first_error(store):
    # A full disk makes SQLite roll back on its own; the ROLLBACK after it must
    # not replace that error with "no transaction is active".
    with pytest.raises(synapse.DatabaseError, match="is full; free some space"):
        with store._write() as conn:
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
    session = make_session(store, name="after")  # and the store writes on
    assert store.get_session(session.id).name == "after"


def test_touch_session(store):
    session = make_session(store, updated=NOW - timedelta(days=3))
    store.touch_session(session.id)
    assert store.get_session(session.id).updated_at > NOW - timedelta(minutes=1)
    with pytest.raises(synapse.SessionNotFound):
        store.touch_session(uuid.uuid4())


def test_list_sessions_order_counts_and_limit(store):
    a = make_session(store, name="a")
    make_session(store, name="b")
    c = make_session(store, name="c")
    for i in range(3):
        store.add_message(synapse.StoredMessage.new(a.id, synapse.Role.USER, f"a{i}"))
    store.add_message(synapse.StoredMessage.new(c.id, synapse.Role.ASSISTANT, "only assistant"))
    listed = store.list_sessions()
    assert [s.name for s in listed] == ["c", "a", "b"]
    assert [s.message_count for s in listed] == [1, 3, 0]
    assert listed[0].preview is None and listed[1].preview == "a0" and listed[2].preview is None
    assert [s.name for s in store.list_sessions(limit=2)] == ["c", "a"]


@pytest.mark.parametrize("content, preview", [
    ("x" * 60, "x" * 49 + "\u2026"),
    ("x" * 50, "x" * 50),
    ("first line\n\n  second\tline  \r\n third", "first line second line third"),
    ("\U0001F600" * 60, "\U0001F600" * 49 + "\u2026"),
    ("\U0001F469\u200d\U0001F4bb says   hi", "\U0001F469\u200d\U0001F4bb says hi"),
])
def test_preview_rule(store, content, preview):
    session = make_session(store)
    store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.USER, content))
    store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.USER, "second"))
    (summary,) = store.list_sessions()
    assert summary.preview == preview
    assert len(summary.preview) <= 50


def test_list_sessions_is_one_query_for_the_page(store):
    for _ in range(25):
        session = make_session(store)
        store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.USER, "hello"))
    statements = []
    store._conn.set_trace_callback(statements.append)
    summaries = store.list_sessions(limit=20)
    store._conn.set_trace_callback(None)
    assert len(summaries) == 20
    assert len(statements) == 1, statements


def test_delete_session_takes_its_messages(store, tmp_path):
    keep = make_session(store)
    doomed = make_session(store)
    for s in (keep, doomed):
        for i in range(3):
            store.add_message(synapse.StoredMessage.new(s.id, synapse.Role.USER, f"m{i}"))
    assert store.delete_session(doomed.id) is True
    assert store.delete_session(doomed.id) is False
    store.close()
    conn = sqlite3.connect(tmp_path / "store.db")
    assert conn.execute("SELECT count(*) FROM messages WHERE session_id NOT IN"
                        " (SELECT id FROM sessions)").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM messages").fetchone() == (3,)
    assert conn.execute("SELECT session_id FROM messages").fetchall() == [(str(keep.id),)] * 3


def test_connection_pragmas(store):
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 60_000  # SPEC 4: at least 60 s
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 2  # FAST, whatever the build


def test_new_databases_get_16k_pages_and_old_ones_keep_theirs(tmp_path):
    with synapse.SqliteStore(str(tmp_path / "new.db")) as store:
        assert store._conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    for statement in synapse.load_migrations()[0].statements:  # as SQLite's default makes it
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with synapse.SqliteStore(str(old)) as store:
        assert store._conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        session = make_session(store)
        store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.USER, "still works"))
        assert [m.content for m in store.get_messages(session.id)] == ["still works"]


def test_schema_of_migrations_one_and_two(store):
    conn = store._conn
    columns = {row[1]: (row[2], row[3], row[5]) for row in conn.execute("PRAGMA table_info(sessions)")}
    assert columns == {"id": ("TEXT", 1, 1), "name": ("TEXT", 0, 0), "provider": ("TEXT", 1, 0),
                       "model": ("TEXT", 1, 0), "system_prompt": ("TEXT", 0, 0),
                       "created_at": ("TEXT", 1, 0), "updated_at": ("TEXT", 1, 0),
                       "forked_from": ("TEXT", 0, 0)}
    columns = {row[1]: (row[2], row[3], row[5]) for row in conn.execute("PRAGMA table_info(messages)")}
    assert columns == {"id": ("TEXT", 1, 1), "session_id": ("TEXT", 1, 0), "role": ("TEXT", 1, 0),
                       "content": ("TEXT", 1, 0), "timestamp": ("TEXT", 1, 0),
                       "provider": ("TEXT", 0, 0), "model": ("TEXT", 0, 0),
                       "input_tokens": ("INTEGER", 0, 0), "output_tokens": ("INTEGER", 0, 0),
                       "stop_reason": ("TEXT", 0, 0)}
    # forked_from is plain text: the session it names may be deleted later.
    assert conn.execute("PRAGMA foreign_key_list(sessions)").fetchall() == []
    fks = conn.execute("PRAGMA foreign_key_list(messages)").fetchall()
    assert [(f[2], f[3], f[4], f[6]) for f in fks] == [("sessions", "session_id", "id", "CASCADE")]
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"idx_messages_session", "idx_messages_timestamp", "idx_sessions_updated"} <= indexes
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    assert version == len(synapse.load_migrations())


def test_parse_migrations_numbering_and_statements():
    text = ("-- header\n-- migration: 1 first\nCREATE TABLE a (x);\n"
            "-- migration: 2 second\nCREATE TABLE b (y);\n"
            "CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO b VALUES (new.x); END;\n")
    migrations = synapse.parse_migrations(text)
    assert [(m.number, m.title, len(m.statements)) for m in migrations] == [
        (1, "first", 1), (2, "second", 2)]
    with pytest.raises(synapse.MigrationError):
        synapse.parse_migrations("-- migration: 2 skipped one\nCREATE TABLE a (x);\n")
    with pytest.raises(synapse.MigrationError):
        synapse.parse_migrations("-- migration: 1 a\nCREATE TABLE a (x\n")


def test_shipped_schema_migrations_are_numbered_from_one():
    migrations = synapse.load_migrations()
    assert [m.number for m in migrations] == list(range(1, len(migrations) + 1))
    first = migrations[0]
    assert any("CREATE TABLE IF NOT EXISTS sessions" in s for s in first.statements)


def test_opening_twice_is_a_no_op(tmp_path):
    path = str(tmp_path / "twice.db")
    first = synapse.SqliteStore(path)
    session = make_session(first)
    first.close()
    second = synapse.SqliteStore(path)
    assert second.get_session(session.id) == session
    assert second._conn.execute("PRAGMA user_version").fetchone()[0] == len(synapse.load_migrations())
    second.close()


def test_database_at_migration_one_is_upgraded_without_loss(tmp_path):
    path = str(tmp_path / "old.db")
    migrations = synapse.load_migrations()
    conn = synapse.connect(path)
    assert synapse.apply_migrations(conn, migrations[:1]) == 1
    session_id = str(uuid.uuid4())
    stamp = synapse.format_timestamp(NOW)
    conn.execute("INSERT INTO sessions VALUES (?, 'old', 'echo', 'echo', NULL, ?, ?)",
                 (session_id, stamp, stamp))
    conn.execute("INSERT INTO messages VALUES (?, ?, 'user', 'kept text', ?)",
                 (str(uuid.uuid4()), session_id, stamp))
    later = synapse.parse_migrations(
        "-- migration: 1 base\nSELECT 1;\n"
        "-- migration: 2 add a tag\nALTER TABLE sessions ADD COLUMN tag TEXT;\n"
        "CREATE INDEX IF NOT EXISTS idx_sessions_tag ON sessions(tag);\n")
    extra = synapse.Migration(len(migrations) + 1, "add a tag", later[1].statements)
    assert synapse.apply_migrations(conn, [*migrations, extra]) == extra.number
    assert conn.execute("SELECT id, name, tag FROM sessions").fetchall() == [(session_id, "old", None)]
    assert conn.execute("SELECT content FROM messages").fetchall() == [("kept text",)]
    # Applying again changes nothing.
    assert synapse.apply_migrations(conn, [*migrations, extra]) == extra.number
    conn.close()


def test_a_version_one_database_with_data_migrates_in_place(tmp_path):
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    for statement in synapse.load_migrations()[0].statements:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    sid, stamp = str(uuid.uuid4()), synapse.format_timestamp(NOW)
    conn.execute("INSERT INTO sessions VALUES (?, 'kept', 'openai', 'gpt-4o', 'be brief', ?, ?)",
                 (sid, stamp, stamp))
    rows = [(str(synapse.new_message_id()), sid, role, text, stamp)
            for role, text in (("user", "a question"), ("assistant", "an answer"))]
    conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    with synapse.SqliteStore(str(path)) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] >= 2
        session = store.get_session(uuid.UUID(sid))
        assert (session.name, session.system_prompt, session.forked_from) == ("kept", "be brief", None)
        messages = store.get_messages(session.id)
        assert [(m.role.value, m.content) for m in messages] == [("user", "a question"),
                                                                   ("assistant", "an answer")]
        assert all(m[5:] == (None,) * 5 for m in messages)
        assert [str(m.id) for m in messages] == [r[0] for r in rows]


def test_failed_migration_leaves_the_whole_previous_version(tmp_path):
    path = str(tmp_path / "half.db")
    conn = synapse.connect(path)
    migrations = synapse.load_migrations()
    synapse.apply_migrations(conn, migrations)
    broken = synapse.Migration(len(migrations) + 1, "broken",
                               ("CREATE TABLE extra (x)", "INSERT INTO nowhere VALUES (1)"))
    with pytest.raises(synapse.MigrationError):
        synapse.apply_migrations(conn, [*migrations, broken])
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'extra'").fetchone() == (0,)
    conn.close()


def test_newer_database_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "newer.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE future (x)")
    conn.execute("PRAGMA user_version = 999")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(synapse.MigrationError, match="newer"):
        synapse.SqliteStore(str(path))
    assert path.read_bytes() == before


def test_non_sqlite_file_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"my precious notes, not a database\n" * 100)
    before = path.read_bytes()
    with pytest.raises(synapse.DatabaseError, match="not a SQLite database"):
        synapse.SqliteStore(str(path))
    assert path.read_bytes() == before


def test_database_file_and_folder_modes_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        store = synapse.SqliteStore(str(tmp_path / "private" / "deep" / "s.db"))
        make_session(store)
        folder = tmp_path / "private" / "deep"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "s.db").stat().st_mode) == 0o600
        for extra in ("s.db-wal", "s.db-shm"):
            if (folder / extra).exists():
                assert stat.S_IMODE((folder / extra).stat().st_mode) & 0o077 == 0
        store.close()
    finally:
        os.umask(old)


@pytest.mark.parametrize("url, expected", [
    ("/abs/path.db", "/abs/path.db"),
    ("rel/path.db", "rel/path.db"),
    ("sqlite:/abs/x.db", "/abs/x.db"),
    ("sqlite:rel/x.db", "rel/x.db"),
    ("sqlite://rel/x.db", "rel/x.db"),
    ("sqlite:///abs/x.db", "/abs/x.db"),
    ("sqlite:~/x.db", "/home/u/x.db"),
    ("~/y.db", "/home/u/y.db"),
])
def test_database_url_forms(url, expected, monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    assert synapse.database_path(url, env={"HOME": "/home/u"}) == expected


def test_database_location_precedence():
    env = {"HOME": "/h", "XDG_CONFIG_HOME": "/x"}
    assert synapse.database_path(None, env) == "/x/synapse/sessions.db"
    assert synapse.database_path(None, {"HOME": "/h"}) == "/h/.config/synapse/sessions.db"
    assert synapse.database_path(None, {**env, "SYNAPSE_DATABASE_URL": "/e.db"}) == "/e.db"
    assert synapse.database_path("/c.db", env) == "/c.db"
    # The environment wins over the config file; an explicit URL over both.
    assert synapse.database_path(None, env, configured="/cfg.db") == "/cfg.db"
    assert synapse.database_path(None, {**env, "SYNAPSE_DATABASE_URL": "/e.db"},
                                 configured="/cfg.db") == "/e.db"
    assert synapse.database_path("/arg.db", {**env, "SYNAPSE_DATABASE_URL": "/e.db"},
                                 configured="/cfg.db") == "/arg.db"


def test_synapse_database_url_wins_over_the_config_file(user, tmp_path, monkeypatch):
    from_config, from_env = tmp_path / "from-config.db", tmp_path / "from-env.db"
    user.write_config(f'[session]\ndatabase_url = "{from_config}"\n')
    user.ok("-p", "echo", "where does this go", env={"SYNAPSE_DATABASE_URL": f"sqlite:{from_env}"})
    assert from_env.exists() and not from_config.exists()
    user.ok("-p", "echo", "and this", env={"SYNAPSE_DATABASE_URL": ""})
    assert from_config.exists()
    # create_storage(url) wins over both.
    monkeypatch.setenv("SYNAPSE_DATABASE_URL", str(from_env))
    explicit = tmp_path / "explicit.db"
    synapse.create_storage(str(explicit)).close()
    assert explicit.exists()


def test_postgres_url_is_a_configuration_error():
    with pytest.raises(synapse.ConfigError, match="only SQLite"):
        synapse.database_path("postgres://localhost/db", env={})


# -- cleanup ------------------------------------------------------------------


def aged_sessions(store, ages_in_days):
    sessions = []
    for age in ages_in_days:
        s = make_session(store)
        set_updated(store.path, s.id, NOW - timedelta(days=age))
        sessions.append(s)
    return sessions


def remaining(store):
    return {s.id for s in store.list_sessions()}


def test_cleanup_retention_only(store):
    old1, old2, new = aged_sessions(store, [100, 91, 10])
    result = store.cleanup(synapse.SessionConfig(max_sessions=0, retention_days=90))
    assert result == synapse.CleanupResult(2, 0, 2)
    assert remaining(store) == {new.id}


def test_cleanup_max_only_deletes_least_recently_updated(store):
    sessions = aged_sessions(store, [5, 4, 3, 2, 1])
    result = store.cleanup(synapse.SessionConfig(max_sessions=2, retention_days=0))
    assert result == synapse.CleanupResult(3, 3, 0)
    assert remaining(store) == {sessions[3].id, sessions[4].id}


def test_cleanup_max_ties_go_by_created_at(store):
    stamp = NOW - timedelta(days=1)
    younger = make_session(store, created=NOW - timedelta(days=2), updated=stamp)
    older = make_session(store, created=NOW - timedelta(days=3), updated=stamp)
    result = store.cleanup(synapse.SessionConfig(max_sessions=1, retention_days=0))
    assert result.by_max_limit == 1
    assert remaining(store) == {younger.id}
    assert older.id not in remaining(store)


def test_cleanup_both_counts_no_session_twice(store):
    sessions = aged_sessions(store, [200, 150, 30, 20, 10, 5])
    result = store.cleanup(synapse.SessionConfig(max_sessions=3, retention_days=90))
    assert result == synapse.CleanupResult(3, 1, 2)
    assert remaining(store) == {s.id for s in sessions[3:]}


@pytest.mark.parametrize("bulk", [False, True])
def test_cleanup_protects_the_session_being_continued(store, monkeypatch, bulk):
    sessions = aged_sessions(store, [200, 50, 40, 30])
    protected = sessions[0]
    # Its message is as old as any doomed one: the bulk path's rowid range holds it.
    store._conn.execute(INSERT_MESSAGE + " (?, ?, 'user', 'mine', ?)", (
        str(synapse.new_message_id()), str(protected.id),
        synapse.format_timestamp(NOW - timedelta(days=200))))
    if bulk:
        monkeypatch.setattr(synapse, "BULK_CLEANUP_MIN", 1)
    statements: List[str] = []
    store._conn.set_trace_callback(statements.append)
    result = store.cleanup(synapse.SessionConfig(max_sessions=2, retention_days=90),
                           protect=protected.id)
    store._conn.set_trace_callback(None)
    assert any(s.startswith("DROP INDEX") for s in statements) == bulk
    # The protected one survives retention and still counts toward max_sessions.
    assert result == synapse.CleanupResult(2, 2, 0)
    assert remaining(store) == {protected.id, sessions[3].id}
    assert [m.content for m in store.get_messages(protected.id)] == ["mine"]


def test_cleanup_zero_means_unlimited(store):
    aged_sessions(store, [1000, 500, 1])
    result = store.cleanup(synapse.SessionConfig(max_sessions=0, retention_days=0))
    assert result == synapse.CleanupResult(0, 0, 0)
    assert len(remaining(store)) == 3


def test_cleanup_removes_messages_and_dry_run_removes_nothing(store):
    sessions = aged_sessions(store, [100, 1])
    for s in sessions:
        store.add_message(synapse.StoredMessage.new(s.id, synapse.Role.USER, "x"))
    set_updated(store.path, sessions[0].id, NOW - timedelta(days=100))
    config = synapse.SessionConfig(max_sessions=0, retention_days=90)
    dry, doomed = store.choose_cleanup(config)
    assert dry == synapse.CleanupResult(1, 0, 1) and doomed == [str(sessions[0].id)]
    assert len(remaining(store)) == 2
    assert store.cleanup(config) == dry
    orphans = store._conn.execute("SELECT count(*) FROM messages WHERE session_id NOT IN"
                                  " (SELECT id FROM sessions)").fetchone()[0]
    assert orphans == 0 and len(store.get_messages(sessions[0].id)) == 0


# ---------------------------------------------------------------------------
# Configuration (SPEC §5)
# ---------------------------------------------------------------------------


def write(path: Path, content: str, mode: int = 0o600) -> Path:
    path.write_text(content, encoding="utf-8")
    path.chmod(mode)
    return path


def test_config_defaults_without_a_file(tmp_path):
    config = synapse.load_config(None, env={"HOME": str(tmp_path)})
    assert config.provider == "deepseek" and config.max_tokens == 4096
    assert config.session == synapse.SessionConfig()


def test_config_full_file(tmp_path, capsys):
    (tmp_path / "prompt.md").write_text("From a file.\n")
    path = write(tmp_path / "c.toml", """
provider = "groq"
max_tokens = 100
temperature = 0.2
timeout = 5
system_prompt_file = "prompt.md"

[providers.groq]
kind = "openai"
base_url = "https://api.groq.com/openai/v1"
api_key_env = "GROQ_API_KEY"
model = "llama"

[session]
database_url = "sqlite:~/s.db"
max_sessions = 0
retention_days = 7
auto_cleanup = false
""")
    config = synapse.load_config(str(path), env={})
    assert config.system_prompt == "From a file."
    assert config.session == synapse.SessionConfig(0, 7, False, "sqlite:~/s.db")
    assert config.temperature == 0.2 and config.timeout == 5.0
    provider = synapse.resolve_provider(config, None, None, env={"GROQ_API_KEY": "k"})
    assert (provider.name, provider.kind, provider.model, provider.api_key) == (
        "groq", "openai", "llama", "k")
    assert provider.max_tokens_field == "max_tokens"
    assert capsys.readouterr().err == ""


def test_system_prompt_wins_over_system_prompt_file(tmp_path):
    path = write(tmp_path / "c.toml", 'system_prompt = "inline"\nsystem_prompt_file = "nope.md"\n')
    assert synapse.load_config(str(path), env={}).system_prompt == "inline"


@pytest.mark.parametrize("content, key", [
    ('max_tokens = "many"', "max_tokens"),
    ("max_tokens = true", "max_tokens"),
    ('temperature = "hot"', "temperature"),
    ("provider = 3", "provider"),
    ('[session]\nmax_sessions = "ten"', "session.max_sessions"),
    ('[session]\nauto_cleanup = "yes"', "session.auto_cleanup"),
    ("[session]\nretention_days = 1.5", "session.retention_days"),
    ("[providers.x]\nbase_url = 5", "providers.x.base_url"),
    ('[providers.x]\nkind = "grpc"', "providers.x.kind"),
    ("session = 3", "session"),
])
def test_config_wrong_types_name_file_and_key(tmp_path, content, key):
    path = write(tmp_path / "bad.toml", content + "\n")
    with pytest.raises(synapse.ConfigError) as caught:
        synapse.load_config(str(path), env={})
    assert str(path) in str(caught.value) and key in str(caught.value)


def test_config_syntax_error_and_missing_named_file(tmp_path):
    path = write(tmp_path / "broken.toml", "provider = \n")
    with pytest.raises(synapse.ConfigError, match="not valid TOML"):
        synapse.load_config(str(path), env={})
    with pytest.raises(synapse.ConfigError, match="does not exist"):
        synapse.load_config(str(tmp_path / "absent.toml"), env={})
    with pytest.raises(synapse.ConfigError, match="does not exist"):
        synapse.load_config(None, env={"SYNAPSE_CONFIG": str(tmp_path / "absent.toml")})


def test_config_path_precedence(tmp_path):
    a = write(tmp_path / "a.toml", 'provider = "openai"\n')
    b = write(tmp_path / "b.toml", 'provider = "anthropic"\n')
    (tmp_path / "x" / "synapse").mkdir(parents=True)
    write(tmp_path / "x" / "synapse" / "config.toml", 'provider = "ollama"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "x")}
    assert synapse.load_config(None, env).provider == "ollama"
    assert synapse.load_config(None, {**env, "SYNAPSE_CONFIG": str(b)}).provider == "anthropic"
    assert synapse.load_config(str(a), {**env, "SYNAPSE_CONFIG": str(b)}).provider == "openai"


def test_config_unknown_keys_warn(tmp_path, capsys):
    path = write(tmp_path / "c.toml", 'colour = "blue"\n[session]\nmax_session = 3\n')
    synapse.load_config(str(path), env={})
    warning = capsys.readouterr().err
    assert "unknown key 'colour'" in warning and "unknown key 'session.max_session'" in warning


def test_config_with_key_readable_by_others_warns_once(tmp_path, capsys):
    path = write(tmp_path / "c.toml", f'api_key = "{KEY}"\n[providers.openai]\napi_key = "x1234"\n',
                 mode=0o644)
    synapse.load_config(str(path), env={})
    warning = capsys.readouterr().err
    assert warning.count("warning") == 1 and "chmod 600" in warning and KEY not in warning
    path.chmod(0o600)
    synapse.load_config(str(path), env={})
    assert capsys.readouterr().err == ""


def test_provider_resolution_rules(tmp_path):
    path = write(tmp_path / "c.toml", """
provider = "deepseek"
api_key = "top-key"
base_url = "http://top"
model = "top-model"
[providers.openai]
api_key = "openai-key"
[providers.anthropic]
model = "claude-x"
[providers.local]
kind = "anthropic"
base_url = "http://local"
model = "m"
""")
    config = synapse.load_config(str(path), env={})
    top = synapse.resolve_provider(config, None, None, env={})
    assert (top.base_url, top.model, top.api_key) == ("http://top", "top-model", "top-key")
    # An environment variable wins over the file.
    assert synapse.resolve_provider(config, None, None, {"DEEPSEEK_API_KEY": "env"}).api_key == "env"
    # Top-level values do not leak to other providers.
    other = synapse.resolve_provider(config, "openai", None, env={})
    assert (other.base_url, other.model, other.api_key) == (
        "https://api.openai.com/v1", "gpt-4o-mini", "openai-key")
    assert other.max_tokens_field == "max_completion_tokens"
    assert synapse.resolve_provider(config, "openai", "gpt-5", env={}).model == "gpt-5"
    local = synapse.resolve_provider(config, "local", None, env={})
    assert (local.kind, local.api_key) == ("anthropic", None)
    with pytest.raises(synapse.ConfigError, match="ANTHROPIC_API_KEY"):
        synapse.resolve_provider(config, "anthropic", None, env={})
    with pytest.raises(synapse.ConfigError, match="unknown provider 'nope'"):
        synapse.resolve_provider(config, "nope", None, env={})
    for name, model in (("ollama", "llama3.2"), ("echo", "echo")):
        p = synapse.resolve_provider(synapse.Config(), name, None, env={})
        assert (p.model, p.api_key) == (model, None)


def test_redact_hides_every_known_key():
    config = synapse.Config(api_key="file-secret-1", providers={"g": {"api_key_env": "G_KEY"}})
    secrets = synapse.known_secrets(config, {"G_KEY": "env-secret-2", "OPENAI_API_KEY": "sk-3333"})
    out = synapse.redact("a file-secret-1 b env-secret-2 c sk-3333", secrets)
    assert "secret" not in out and "sk-3333" not in out


# ---------------------------------------------------------------------------
# The command line: version, help, sessions commands, IDs (SPEC §2, §3)
# ---------------------------------------------------------------------------


def test_version_in_a_subprocess(user):
    result = user.spawn("--version")
    assert result.returncode == 0 and text(result) == f"synapse {synapse.__version__}\n"
    assert user.spawn("-V").stdout == result.stdout
    # From a checkout, as python synapse.py, the same.
    checkout = subprocess.run([sys.executable, SYNAPSE, "-V"], capture_output=True, env=user.env)
    assert checkout.returncode == 0 and checkout.stdout == result.stdout


def test_help_follows_the_terminal_width(user):
    def option_lines(columns: str) -> List[str]:
        result = user.run("--help", env={"COLUMNS": columns})
        return [line for line in text(result).splitlines() if line.startswith("  -")]

    assert option_lines("60") and max(map(len, option_lines("60"))) <= 60
    assert max(map(len, option_lines("200"))) > 60
    # Nonsense is ignored, as shutil.get_terminal_size ignores it (no terminal here: 80).
    assert option_lines("0") == option_lines("-3") == option_lines("wide") == option_lines("80")


def test_version_and_listing_import_only_what_they_need(user):
    user.ok("-p", "echo", "one session to list")
    probe = ("import sys\n"
             "before = set(sys.modules)\n"
             "import synapse\n"
             "for argv in (['--version'], ['sessions', 'list']):\n"
             "    try:\n"
             "        synapse.main(argv)\n"
             "    except SystemExit:\n"
             "        pass\n"
             "    print('loaded:', [m for m in ('requests', 'shutil', 'uuid', 'zipfile', 'tempfile',\n"
             "                                  'pathlib', 'typing')\n"
             "                      if m in set(sys.modules) - before])\n")
    # -S: no site-packages, whose .pth files may import shutil before synapse does.
    result = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, env=user.env,
                            cwd=HERE, timeout=60)
    assert "one session to list" in text(result)
    loaded = [line for line in text(result).splitlines() if line.startswith("loaded:")]
    # uuid (which imports platform) waits for the first session ID.
    assert loaded == ["loaded: []", "loaded: ['uuid']"], text(result) + result.stderr.decode()


def test_help_when_no_message_and_stdin_is_a_terminal(user):
    result = user.run(tty="in")
    assert result.returncode == 0 and text(result).startswith("usage: synapse")
    assert "sessions list" in text(result) and "--continue" in text(result)
    assert text(result) == text(user.run("--help"))
    assert not user.db_path.exists()
    # Stdin that is not a terminal is the message instead, even when empty.
    assert_one_error_line(user.run("-p", "echo"), 2, "empty")


def test_sessions_commands_without_requests_installed(user, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "requests.py").write_text("raise ImportError('requests is not installed here')\n")
    env = {"PYTHONPATH": str(blocker)}
    assert user.spawn("-p", "echo", "works without requests", env=env).returncode == 0
    for args in (["--version"], ["--help"], ["sessions", "list"], ["sessions", "search", "x"]):
        assert user.spawn(*args, env=env).returncode == 0, args


@pytest.mark.parametrize("args", [["--bogus"], ["-s"], ["sessions"], ["sessions", "show"],
                                  ["sessions", "list", "--limit", "0"], ["sessions", "nope"],
                                  ["-s", "abcd", "-C", "hi"]])
def test_bad_flags_are_usage_errors(user, args):
    result = user.run(*args)
    assert result.returncode == 2 and "Traceback" not in err(result)
    assert err(result).splitlines()[-1].startswith("synapse: error: ")
    assert not user.db_path.exists()


def test_bad_flags_in_a_subprocess(user):
    result = user.spawn("--bogus", "hi")
    assert result.returncode == 2 and err(result).startswith("usage: synapse")
    assert err(result).splitlines()[-1].startswith("synapse: error: ") and result.stdout == b""


def test_chat_options_in_a_subprocess(user, server):
    """-p, -m, --system, --name, -C, -c, --no-stream as a user types them."""
    config = user.write_config(f'[providers.local]\nbase_url = "{server.url}"\nmodel = "small"\n')
    moved = user.root / "elsewhere.toml"
    config.rename(moved)
    server.queue(Reply(content_type="application/json", chunks=[json.dumps({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole"},
                     "finish_reason": "stop"}]}).encode()]))
    result = user.spawn("-c", str(moved), "-p", "local", "-m", "big", "--system", "Be kind.",
                        "--name", "trip", "--no-stream", "plan it")
    assert result.returncode == 0 and text(result) == "Whole\n", err(result)
    assert server.received[-1].body == {
        "model": "big", "stream": False, "max_tokens": 4096,
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "plan it"}]}
    assert user.rows("SELECT name, provider, model, system_prompt FROM sessions") == [
        ("trip", "local", "big", "Be kind.")]
    result = user.spawn("-c", str(moved), "-C", "-p", "echo", "back to echo")
    assert text(result) == "back to echo\n"
    assert user.rows("SELECT provider, model FROM sessions") == [("echo", "echo")]
    assert [c for _, c in user.messages()] == ["plan it", "Whole", "back to echo", "back to echo"]


def test_sessions_list_empty_and_json(user):
    result = user.run("sessions", "list")
    assert result.returncode == 0 and text(result) == "No sessions found.\n"
    result = user.run("sessions", "list", "--json")
    assert json.loads(text(result)) == []


def test_sessions_list_table_and_json(user):
    for message in ("first chat", "second\nchat with a much longer first message than fits "
                    "in the preview column of the table"):
        assert user.run("-p", "echo", message).returncode == 0
    assert user.run("sessions", "rename", user.session_ids()[0][:8], "My name").returncode == 0
    result = user.run("sessions", "list")
    lines = text(result).splitlines()
    assert lines[0].split() == ["ID", "NAME", "PROVIDER", "MODEL", "CREATED", "MESSAGES", "PREVIEW"]
    first, second = user.session_ids()
    assert lines[1].startswith(second) and lines[2].startswith(first)
    assert "My name" in lines[2] and "echo" in lines[1]
    # The preview column shows the whole preview: 49 characters and the ellipsis.
    assert lines[1].endswith("  second chat with a much longer first message than\u2026")
    created = datetime.fromisoformat(user.rows("SELECT created_at FROM sessions")[0][0])
    assert created.astimezone().strftime("%Y-%m-%d %H:%M") in lines[2]
    data = json.loads(text(user.run("sessions", "list", "--json", "--limit", "1")))
    assert len(data) == 1
    assert set(data[0]) == {"id", "name", "provider", "model", "created_at", "updated_at",
                            "message_count", "preview"}
    assert data[0]["id"] == second and data[0]["message_count"] == 2
    stored = user.rows("SELECT created_at, updated_at FROM sessions WHERE id = ?", (second,))[0]
    assert (data[0]["created_at"], data[0]["updated_at"]) == stored


def test_sessions_list_cuts_cells_by_characters(user):
    store = synapse.SqliteStore(str(user.db_path))
    make_session(store, name="\U0001F600" * 40, model="m" * 60)
    store.close()
    line = text(user.run("sessions", "list")).splitlines()[1]
    assert "\U0001F600" * 19 + "\u2026" in line and "m" * 19 + "\u2026" in line


def test_sessions_show_plain_and_json(user):
    user.ok("-p", "echo", "--system", "Be terse.", "--name", "demo", "hello there")
    (sid,) = user.session_ids()
    result = user.run("sessions", "show", sid)
    assert result.returncode == 0
    out = text(result)
    head, body = out.split("\n\n", 1)
    labels = [line.split(":")[0] for line in head.splitlines()]
    assert labels == ["Session", "Name", "Provider", "Model", "Created", "Updated", "Tokens", "System"]
    assert sid in head and "Be terse." in head and "demo" in head
    # echo counts words as tokens: "Be terse." and "hello there" in, "hello there" out.
    assert "\nTokens:   4 in, 2 out\n" in head + "\n"
    assert body == "[USER]\nhello there\n\n[ASSISTANT]\nhello there\n\n"
    data = json.loads(text(user.run("sessions", "show", sid, "--json")))
    assert data["id"] == sid and data["system_prompt"] == "Be terse."
    assert [(m["role"], m["content"]) for m in data["messages"]] == [
        ("user", "hello there"), ("assistant", "hello there")]
    assert set(data["messages"][0]) == {"id", "role", "content", "timestamp", "provider", "model",
                                        "input_tokens", "output_tokens", "stop_reason"}
    assert data["forked_from"] is None


def test_sessions_delete_several_with_one_unknown(user):
    for i in range(3):
        user.ok("-p", "echo", f"chat {i}")
    a, b, c = user.session_ids()
    unknown = str(uuid.uuid4())
    result = user.run("sessions", "delete", a, unknown, c[:6].upper())
    assert result.returncode == 1
    assert text(result) == f"Deleted session {a}\nDeleted session {c}\n"
    assert_one_error_line(result, 1, unknown, "not found")
    assert user.session_ids() == [b]
    assert user.rows("SELECT count(*) FROM messages WHERE session_id != ?", (b,)) == [(0,)]


def crafted_store(user, ids):
    store = synapse.SqliteStore(str(user.db_path))
    for sid in ids:
        make_session(store, session_id=sid)
    store.close()


def test_session_id_prefixes(user):
    a = "abcd1234-0000-4000-8000-000000000001"
    b = "abcd1234-0000-4000-8000-000000000002"
    c = "abce0000-0000-4000-8000-000000000003"
    crafted_store(user, [a, b, c])
    for prefix in ("abce", "ABCE", "abce0000-0", "abce00000", c, c.replace("-", "").upper()):
        result = user.run("sessions", "show", prefix, "--json")
        assert result.returncode == 0, (prefix, err(result))
        assert json.loads(text(result))["id"] == c
    result = user.run("sessions", "show", "abcd")
    assert result.returncode == 1 and "Traceback" not in err(result)
    assert "ambiguous" in err(result).splitlines()[0]
    assert a in err(result) and b in err(result) and c not in err(result)
    result = user.run("sessions", "show", "abcd12340000-4000-8000-000000000002", "--json")
    assert json.loads(text(result))["id"] == b


@pytest.mark.parametrize("bad", ["abc", "xyz12345", "abcd!", "", "1234567890123456789012345678901234"])
def test_malformed_session_ids_are_usage_errors(user, bad):
    result = user.run("sessions", "show", bad)
    assert_one_error_line(result, 2, "not a session ID")


def test_unknown_session_is_a_runtime_error(user):
    user.ok("-p", "echo", "hi")
    result = user.run("sessions", "show", str(uuid.uuid4()))
    assert_one_error_line(result, 1, "not found")
    assert_one_error_line(user.run("-s", "ffff", "-p", "echo", "hi"), 1, "not found")


def test_sessions_commands_do_not_run_auto_cleanup(user):
    user.write_config("[session]\nretention_days = 1\n")
    store = synapse.SqliteStore(str(user.db_path))
    old = make_session(store)
    store.close()
    set_updated(user.db_path, old.id, NOW - timedelta(days=30))
    for args in (["sessions", "list"], ["sessions", "show", str(old.id)],
                 ["sessions", "search", "x"], ["sessions", "export", str(old.id)],
                 ["sessions", "rename", str(old.id), "kept"]):
        assert user.run(*args).returncode == 0, args
    assert user.session_ids() == [str(old.id)]


def test_bad_config_is_exit_2_for_every_command(user):
    user.write_config("max_tokens = 'lots'\n")
    for args in (["-p", "echo", "hi"], ["sessions", "list"]):
        assert_one_error_line(user.run(*args), 2, "max_tokens", "config.toml")
    assert not user.db_path.exists()


def test_config_option_and_env_in_a_subprocess(user, tmp_path):
    alt = write(tmp_path / "alt.toml", f'[session]\ndatabase_url = "{tmp_path / "alt.db"}"\n')
    assert user.spawn("-c", str(alt), "-p", "echo", "to alt").returncode == 0
    assert (tmp_path / "alt.db").exists() and not user.db_path.exists()
    listing = user.spawn("sessions", "list", "--json", env={"SYNAPSE_CONFIG": str(alt)})
    assert len(json.loads(text(listing))) == 1
    assert len(json.loads(text(user.spawn("-c", str(alt), "sessions", "list", "--json")))) == 1
    assert len(json.loads(text(user.spawn("sessions", "list", "-c", str(alt), "--json")))) == 1
    assert len(json.loads(text(user.spawn("sessions", "-c", str(alt), "list", "--json")))) == 1
    assert_one_error_line(user.spawn("-c", str(tmp_path / "nope.toml"), "sessions", "list"), 2,
                          "does not exist")
    env_db = tmp_path / "env.db"
    assert user.spawn("-p", "echo", "x", env={"SYNAPSE_DATABASE_URL": f"sqlite:{env_db}"}).returncode == 0
    assert env_db.exists()


def test_no_message_on_a_terminal_prints_help(user):
    import pty

    master, slave = pty.openpty()
    try:
        result = subprocess.run([*COMMAND], stdin=slave, capture_output=True,
                                env=user.env, timeout=30)
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 0 and text(result).startswith("usage: synapse")
    assert not user.db_path.exists()


# ---------------------------------------------------------------------------
# Chat against the real local server (SPEC §2 input/output, §5, §6)
# ---------------------------------------------------------------------------


def test_first_chat_list_show_continue_delete(user, server):
    """The five checks a user would do by hand."""
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("Hi", " there")]))
    first = user.spawn("Hello")
    assert first.returncode == 0, err(first)
    assert text(first) == "Hi there\n"
    (sid,) = user.session_ids()
    assert user.messages() == [("user", "Hello"), ("assistant", "Hi there")]
    assert user.rows("SELECT provider, model FROM sessions") == [("deepseek", "deepseek-chat")]

    listing = text(user.spawn("sessions", "list"))
    assert sid in listing and "Hello" in listing

    shown = text(user.spawn("sessions", "show", sid[:8]))
    assert "[USER]\nHello\n\n[ASSISTANT]\nHi there\n" in shown

    server.queue(Reply(chunks=[openai_stream("Sure")]))
    again = user.spawn("-s", sid[:8], "Tell me more")
    assert again.returncode == 0 and text(again) == "Sure\n"
    sent = server.received[-1].body
    assert sent["messages"] == [{"role": "user", "content": "Hello"},
                                {"role": "assistant", "content": "Hi there"},
                                {"role": "user", "content": "Tell me more"}]
    assert user.messages()[2:] == [("user", "Tell me more"), ("assistant", "Sure")]
    assert user.session_ids() == [sid]

    deleted = user.spawn("sessions", "delete", sid)
    assert text(deleted) == f"Deleted session {sid}\n"
    assert user.session_ids() == [] and user.messages() == []


def test_openai_request_shape(user, server):
    user.use_server(server, extra='temperature = 0.3\nmax_tokens = 77\nsystem_prompt = "Be brief."\n')
    server.queue(hello())
    assert user.run("Question").returncode == 0
    request = server.received[-1]
    assert request.path == "/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.body == {"model": "deepseek-chat", "stream": True, "max_tokens": 77,
                            "temperature": 0.3, "stream_options": {"include_usage": True},
                            "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Question"}]}


def test_temperature_is_not_sent_when_absent_and_openai_sends_max_completion_tokens(user, server):
    user.write_config(f'provider = "openai"\n[providers.openai]\nbase_url = "{server.url}/v1"\n')
    server.queue(hello())
    result = user.run("Q", env={"OPENAI_API_KEY": KEY})
    assert result.returncode == 0, err(result)
    body = server.received[-1].body
    assert server.received[-1].path == "/v1/chat/completions"
    assert "temperature" not in body and body["max_completion_tokens"] == 4096
    assert "max_tokens" not in body and body["model"] == "gpt-4o-mini"


def test_ollama_sends_no_authorization(user, server):
    user.write_config(f'provider = "ollama"\nbase_url = "{server.url}/v1"\n')
    server.queue(hello())
    assert user.run("Q").returncode == 0
    assert "Authorization" not in server.received[-1].headers
    assert server.received[-1].body["model"] == "llama3.2"


def test_anthropic_request_shape_and_stream(user, server):
    user.use_server(server, provider="anthropic", extra='system_prompt = "Be brief."\n')
    server.queue(Reply(chunks=[anthropic_stream("Bonjour", " !")]))
    result = user.run("Salut")
    assert result.returncode == 0, err(result)
    assert text(result) == "Bonjour !\n"
    request = server.received[-1]
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in request.headers
    assert request.body == {"model": "claude-sonnet-4-5", "max_tokens": 4096, "stream": True,
                            "system": "Be brief.",
                            "messages": [{"role": "user", "content": "Salut"}]}


def test_anthropic_sends_temperature_and_max_tokens_when_configured(user, server):
    user.use_server(server, provider="anthropic", extra="temperature = 0.2\nmax_tokens = 50\n")
    server.queue(Reply(chunks=[anthropic_stream("ok")]))
    assert user.run("hi").returncode == 0
    body = server.received[-1].body
    assert (body["temperature"], body["max_tokens"]) == (0.2, 50) and "system" not in body
    assert server.received[-1].headers["Accept"] == "text/event-stream"


def test_anthropic_messages_alternate_starting_with_user():
    merged = synapse.anthropic_messages([
        ("assistant", "stray"), ("user", "a"), ("user", "b"), ("assistant", "c"),
        ("assistant", "d"), ("user", "e")])
    assert merged == [{"role": "user", "content": "a\n\nb"},
                      {"role": "assistant", "content": "c\n\nd"},
                      {"role": "user", "content": "e"}]


def test_anthropic_history_after_a_failed_turn_is_merged(user, server):
    user.use_server(server, provider="anthropic")
    # The two that are retried say when: at once.
    server.queue(Reply(status=500, chunks=[b'{"type":"error","error":{"type":"api_error","message":"boom"}}'],
                       content_type="application/json", headers={"retry-after-ms": "0"}),
                 Reply(status=500, chunks=[b"{}"], content_type="application/json",
                       headers={"retry-after-ms": "0"}),
                 Reply(status=500, chunks=[b"{}"], content_type="application/json"))
    first = user.run("one", env={})
    assert first.returncode == 1 and len(server.received) == 3
    sid = user.session_ids()[0]
    server.queue(Reply(chunks=[anthropic_stream("ok")]))
    assert user.run("-s", sid, "two").returncode == 0
    assert server.received[-1].body["messages"] == [{"role": "user", "content": "one\n\ntwo"}]


def test_custom_providers_of_both_kinds(user, server):
    user.write_config(f"""
provider = "mine"
[providers.mine]
kind = "openai"
base_url = "{server.url}/openai/v1"
api_key_env = "MINE_KEY"
model = "small"
[providers.claude-proxy]
kind = "anthropic"
base_url = "{server.url}/proxy"
model = "c"
""")
    server.queue(hello())
    result = user.run("hi", env={"MINE_KEY": KEY})
    assert result.returncode == 0, err(result)
    assert server.received[-1].path == "/openai/v1/chat/completions"
    assert server.received[-1].headers["Authorization"] == f"Bearer {KEY}"
    server.queue(Reply(chunks=[anthropic_stream("proxied")]))
    result = user.run("-p", "claude-proxy", "hi")
    assert text(result) == "proxied\n"
    assert server.received[-1].path == "/proxy/v1/messages"
    assert_one_error_line(user.run("hi"), 2, "MINE_KEY")


def test_system_prompt_flag_overrides_config(user, server):
    user.use_server(server, extra='system_prompt = "from config"\n')
    server.queue(hello())
    user.ok("--system", "from flag", "hi")
    assert server.received[-1].body["messages"][0] == {"role": "system", "content": "from flag"}
    assert user.rows("SELECT system_prompt FROM sessions") == [("from flag",)]


def test_continuing_uses_the_sessions_provider_and_model(user, server):
    user.write_config(f"""
provider = "deepseek"
[providers.deepseek]
base_url = "{server.url}/ds"
api_key = "{KEY}"
[providers.anthropic]
base_url = "{server.url}/an"
api_key = "{KEY}"
""")
    server.queue(Reply(chunks=[anthropic_stream("first")]))
    assert user.run("-p", "anthropic", "-m", "claude-x", "--system", "S", "one").returncode == 0
    (sid,) = user.session_ids()
    server.queue(Reply(chunks=[anthropic_stream("second")]))
    assert text(user.run("-s", sid, "two")) == "second\n"
    request = server.received[-1]
    assert request.path == "/an/v1/messages" and request.body["model"] == "claude-x"
    assert request.body["system"] == "S"
    # -C continues the latest, with -m switching the model of the session.
    server.queue(Reply(chunks=[anthropic_stream("third")]))
    assert text(user.run("-C", "-m", "claude-y", "three")) == "third\n"
    assert server.received[-1].body["model"] == "claude-y"
    assert user.rows("SELECT provider, model FROM sessions") == [("anthropic", "claude-y")]
    # -p without -m: that provider's default model; the session follows.
    server.queue(hello())
    assert text(user.run("-s", sid, "-p", "deepseek", "four")) == "Hello from the server\n"
    request = server.received[-1]
    assert request.path == "/ds/chat/completions" and request.body["model"] == "deepseek-chat"
    assert request.body["messages"][0] == {"role": "system", "content": "S"}
    assert len(request.body["messages"]) == 1 + 7
    assert user.rows("SELECT provider, model FROM sessions") == [("deepseek", "deepseek-chat")]


def test_continue_with_no_sessions(user):
    assert_one_error_line(user.run("-C", "-p", "echo", "hi"), 1, "no session to continue")


def test_missing_api_key_exits_2_and_writes_nothing(user):
    result = user.run("Hello")
    assert_one_error_line(result, 2, "DEEPSEEK_API_KEY", "api_key")
    assert not user.db_path.exists()
    result = user.run("-p", "anthropic", "Hello", input=b"piped")
    assert_one_error_line(result, 2, "ANTHROPIC_API_KEY")
    assert not user.db_path.exists()


def test_unknown_provider_is_exit_2(user):
    assert_one_error_line(user.run("-p", "nope", "hi"), 2, "unknown provider 'nope'")
    assert not user.db_path.exists()


# -- input ---------------------------------------------------------------------


def test_stdin_combinations(user):
    assert text(user.run("-p", "echo", input=b"only piped\n\n")) == "only piped\n"
    assert text(user.run("-p", "echo", "explain", input=b"code here  \n")) == "code here\n\nexplain\n"
    assert text(user.run("-p", "echo", "just arg", input=b"")) == "just arg\n"
    assert text(user.run("-p", "echo", "just arg", input=b"  \n\t\n")) == "just arg\n"
    assert text(user.run("-p", "echo", "two", "words")) == "two words\n"
    contents = [c for r, c in user.messages() if r == "user"]
    assert contents == ["only piped", "code here\n\nexplain", "just arg", "just arg", "two words"]


@pytest.mark.parametrize("args, data", [([], b""), ([], b"  \n\n"), (["   "], None), ([""], b"")])
def test_empty_message_is_a_usage_error_and_stores_nothing(user, args, data):
    result = user.run("-p", "echo", *args, input=data)
    assert_one_error_line(result, 2, "empty")
    assert not user.db_path.exists() or user.session_ids() == []


def test_invalid_utf8_and_nul_bytes_on_stdin(user):
    result = user.run("-p", "echo", input=b"bad \xff\xfe bytes \x00 and nul")
    assert result.returncode == 0, err(result)
    assert user.messages()[0] == ("user", "bad \ufffd\ufffd bytes \x00 and nul")
    assert text(result) == "bad \ufffd\ufffd bytes \x00 and nul\n"


def test_invalid_utf8_in_the_argument(user):
    result = subprocess.run([sys.executable.encode(), SYNAPSE.encode(), b"-p", b"echo", b"caf\xe9"],
                            env=user.env, capture_output=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, err(result)
    assert user.messages()[0] == ("user", "caf\ufffd")


def test_ten_megabyte_message_is_stored_and_sent_as_is(user, server):
    user.use_server(server)
    big = ("line of text \x00 with nul " * 450_000)[:10 * 1024 * 1024]
    server.queue(hello())
    result = user.run("summarise", input=big.encode())
    assert result.returncode == 0, err(result)
    expected = big.rstrip() + "\n\nsummarise"
    assert server.received[-1].body["messages"][-1]["content"] == expected
    assert user.rows("SELECT content FROM messages WHERE role = 'user'") == [(expected,)]


# -- output ----------------------------------------------------------------------


def test_stdout_holds_only_the_reply(user, server, tmp_path):
    user.use_server(server)
    server.queue(hello())
    result = user.spawn("Hello")
    assert result.stdout == b"Hello from the server\n"
    assert "session:" not in err(result)  # stderr is not a terminal here


def _read_or_end(fd: int) -> bytes:
    """What a pseudo-terminal's master has next; b"" once its other side is closed."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def test_session_id_on_stderr_when_it_is_a_terminal(user):
    import pty

    master, slave = pty.openpty()
    try:
        result = subprocess.run([*COMMAND, "-p", "echo", "hi"], env=user.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                                timeout=30)
        os.close(slave)
        seen = b"".join(iter(lambda: _read_or_end(master), b""))
    finally:
        os.close(master)
    (sid,) = user.session_ids()
    assert result.stdout == b"hi\n"
    assert f"session: {sid}" in seen.decode()


def test_openai_stream_oddities(user, server):
    """Azure filter chunks, empty/missing/null content, DeepSeek thinking, usage."""
    user.use_server(server)
    body = sse(
        {"choices": [], "prompt_filter_results": [{"prompt_index": 0}]},
        openai_chunk(None, role="assistant", content=""),
        openai_chunk(None, reasoning_content="secret thoughts"),
        {"choices": [{"index": 0, "delta": {"content": None}}]},
        openai_chunk("Visible"),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
    ) + b"data: [DONE]\n\n"
    server.queue(Reply(chunks=[body]))
    result = user.run("think")
    assert result.returncode == 0 and text(result) == "Visible\n"
    assert user.messages()[-1] == ("assistant", "Visible")
    assert "secret" not in err(result)


def test_no_stream_mode_for_both_protocols(user, server):
    user.use_server(server)
    server.queue(Reply(content_type="application/json", chunks=[json.dumps({
        "id": "x", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole reply"},
                     "finish_reason": "stop"}]}).encode()]))
    result = user.run("--no-stream", "hi")
    assert text(result) == "Whole reply\n" and server.received[-1].body["stream"] is False
    user.use_server(server, provider="anthropic")
    server.queue(Reply(content_type="application/json", chunks=[json.dumps({
        "id": "m", "type": "message", "role": "assistant",
        "content": [{"type": "text", "text": "Claude says"}, {"type": "text", "text": " hi"}]}).encode()]))
    result = user.run("--no-stream", "hi")
    assert text(result) == "Claude says hi\n" and server.received[-1].body["stream"] is False
    assert user.messages()[-1] == ("assistant", "Claude says hi")


# -- HTTP errors, retries ------------------------------------------------------------


def json_error(status: int, payload: dict, **headers: str) -> Reply:
    return Reply(status=status, chunks=[json.dumps(payload).encode()],
                 content_type="application/json", headers=headers)


def test_401_shows_the_providers_message(user, server):
    user.use_server(server, provider="anthropic")
    server.queue(json_error(401, {"type": "error", "error": {"type": "authentication_error",
                                                             "message": "invalid x-api-key"}}))
    result = user.run("hi")
    assert_one_error_line(result, 1, "anthropic returned 401 (authentication_error): invalid x-api-key")
    assert len(server.received) == 1
    assert user.messages() == [("user", "hi")]  # the user message is kept


def test_429_then_retries_exhausted(user, server):
    user.use_server(server)
    for _ in range(3):
        server.queue(json_error(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                                "code": "rate_limit_exceeded"}},
                                **{"retry-after-ms": "10"}))
    result = user.run("hi")
    assert_one_error_line(result, 1, "deepseek returned 429", "Rate limit reached")
    assert len(server.received) == 3  # one try and two retries


# The quota is named by the error's type, its code, or (OpenAI's own) both.
@pytest.mark.parametrize("kind, code", [("insufficient_quota", "insufficient_quota"),
                                        ("requests", "insufficient_quota"),
                                        ("insufficient_quota", None)])
def test_insufficient_quota_and_402_are_not_retried(user, server, kind, code):
    user.use_server(server)
    server.queue(json_error(429, {"error": {"message": "You exceeded your current quota",
                                            "type": kind, "code": code}}))
    assert_one_error_line(user.run("hi"), 1, "429", "quota")
    assert len(server.received) == 1
    # DeepSeek's body, as its users have quoted it.
    server.queue(json_error(402, {"error": {"message": "Insufficient Balance", "type": "unknown_error",
                                            "param": None, "code": "invalid_request_error"}}))
    assert_one_error_line(user.run("hi"), 1, "402", "Insufficient Balance")
    assert len(server.received) == 2


@pytest.mark.parametrize("status", [500, 529])
def test_server_errors_are_retried_then_reported(user, server, status):
    user.use_server(server, provider="anthropic")
    for _ in range(3):
        server.queue(json_error(status, {"type": "error", "error": {"type": "overloaded_error",
                                                                    "message": "Overloaded"}},
                                **{"retry-after-ms": "1"}))
    result = user.run("hi")
    assert_one_error_line(result, 1, f"anthropic returned {status} (overloaded_error): Overloaded")
    assert len(server.received) == 3


def test_two_503s_then_success(user, server):
    user.use_server(server)
    server.queue(Reply(status=503, chunks=[b"busy"], content_type="text/plain",
                       headers={"Retry-After": "0"}),
                 Reply(status=503, chunks=[b""], content_type="text/plain",
                       headers={"retry-after-ms": "5"}),
                 Reply(chunks=[openai_stream("Finally")]))
    result = user.run("hi")
    assert result.returncode == 0 and text(result) == "Finally\n"
    assert len(server.received) == 3
    assert user.messages() == [("user", "hi"), ("assistant", "Finally")]


def test_html_and_empty_error_bodies(user, server):
    user.use_server(server)
    page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    server.queue(Reply(status=404, chunks=[page], content_type="text/html"))
    assert_one_error_line(user.run("hi"), 1, "deepseek returned 404", "HTML")
    server.queue(Reply(status=400, chunks=[], content_type="text/plain"))
    assert_one_error_line(user.run("hi"), 1, "deepseek returned 400", "empty body")


def test_retry_delay_rules():
    assert synapse.retry_delay(0, {}) == 1.0 and synapse.retry_delay(1, {}) == 2.0
    assert synapse.retry_delay(0, {"retry-after-ms": "250"}) == 0.25
    assert synapse.retry_delay(0, {"retry-after": "3"}) == 3.0
    assert synapse.retry_delay(0, {"retry-after-ms": "100", "retry-after": "9"}) == 0.1
    assert synapse.retry_delay(0, {"retry-after": "600"}) == 30.0
    assert synapse.retry_delay(1, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 2.0


def recorded_waits(monkeypatch) -> List[float]:
    """The backoff waits synapse chooses, recorded instead of waited for."""
    waits: List[float] = []
    choose = synapse.retry_delay
    monkeypatch.setattr(synapse, "retry_delay",
                        lambda attempt, headers: waits.append(choose(attempt, headers)) or 0.0)
    return waits


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_connection_refused_is_retried_then_reported(user, monkeypatch):
    waits = recorded_waits(monkeypatch)
    user.write_config(f'provider = "ollama"\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n')
    result = user.run("hi")
    assert_one_error_line(result, 1, "ollama is not reachable", "refused")
    assert waits == [1.0, 2.0]  # two backoff waits: 1 s and 2 s
    assert user.messages() == [("user", "hi")]


# -- broken streams ------------------------------------------------------------


@pytest.mark.parametrize("began", [[], [sse(openai_chunk(None, role="assistant"))]],
                         ids=["after the headers", "after a chunk without text"])
def test_a_connection_dropped_before_any_text_is_retried(user, server, monkeypatch, began):
    waits = recorded_waits(monkeypatch)
    user.use_server(server)
    server.queue(Reply(chunks=began, drop=True), Reply(chunks=[openai_stream("Second", " try")]))
    result = user.run("hi")
    assert result.returncode == 0, err(result)
    assert text(result) == "Second try\n" and len(server.received) == 2 and waits == [1.0]
    assert user.messages() == [("user", "hi"), ("assistant", "Second try")]
    # Dropped three times: the reason is said in words, never as a class name.
    for _ in range(3):
        server.queue(Reply(chunks=began, drop=True))
    result = user.run("hi")
    assert_one_error_line(result, 1, "deepseek broke the connection mid-reply "
                                     "(the reply was cut short)")
    assert len(server.received) == 5


def test_connection_dropped_mid_reply_keeps_the_partial_reply(user, server):
    user.use_server(server)
    partial = openai_stream("Part one", " and two", done=False)
    server.queue(Reply(chunks=[partial], drop=True))
    result = user.run("hi")
    assert_one_error_line(result, 1, "deepseek broke the connection mid-reply",
                          "partial reply was kept")
    assert text(result) == "Part one and two\n"
    assert user.messages() == [("user", "hi"), ("assistant", "Part one and two")]
    assert len(server.received) == 1  # text was printed: no retry


def test_stream_without_end_marker(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("cut", done=False)]))
    result = user.run("hi")
    assert_one_error_line(result, 1, "ended the reply before data: [DONE]")
    assert user.messages()[-1] == ("assistant", "cut")
    user.use_server(server, provider="anthropic")
    server.queue(Reply(chunks=[anthropic_stream("half", stop=False)], chunked=False))
    result = user.run("hi")
    assert_one_error_line(result, 1, "message_stop")
    assert user.messages()[-1] == ("assistant", "half")


def test_error_event_inside_a_200_stream(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[sse(openai_chunk("some"),
                                   {"error": {"message": "context too long", "type": "invalid_request_error"}})]))
    result = user.run("hi")
    assert_one_error_line(result, 1, "invalid_request_error", "context too long")
    assert user.messages()[-1] == ("assistant", "some")
    user.use_server(server, provider="anthropic")
    body = anthropic_stream("x", stop=False) + anthropic_event(
        "error", error={"type": "overloaded_error", "message": "Overloaded"})
    server.queue(Reply(chunks=[body]))
    assert_one_error_line(user.run("hi"), 1, "overloaded_error", "Overloaded")


def test_malformed_streams(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[b'data: {"choices": [{"delta": {"content": "a"\n\n']))
    assert_one_error_line(user.run("hi"), 1, "malformed stream event")
    server.queue(Reply(chunks=[b"this is not json at all"], content_type="application/json"))
    assert_one_error_line(user.run("hi"), 1, "not JSON")
    server.queue(Reply(chunks=[b"<html>login page</html>"], content_type="text/html"))
    assert_one_error_line(user.run("hi"), 1, "HTML")


def test_stream_split_at_every_byte_boundary():
    recorded = (b": keep-alive\r\n\r\n" + openai_stream("Caf\u00e9 ", "\u2028line ", "\U0001F600!")
                .replace(b"\n\n", b"\r\n\r\n", 2))
    whole = synapse.EventStreamParser()
    expected = whole.feed(recorded) + whole.close()
    assert expected[-1].data == "[DONE]"
    for cut in range(len(recorded) + 1):
        parser = synapse.EventStreamParser()
        events = parser.feed(recorded[:cut]) + parser.feed(recorded[cut:]) + parser.close()
        assert events == expected, cut
    parser = synapse.EventStreamParser()
    events = [e for i in range(len(recorded)) for e in parser.feed(recorded[i:i + 1])]
    assert events + parser.close() == expected


def test_event_stream_parser_rules():
    parser = synapse.EventStreamParser()
    stream = (b"event: a\ndata:no space\ndata:  two spaces\n\n"
              b": comment\r\nid: 5\rdata: cr line\r\r"
              b"data: x\r\ndata: y\r\n\r\n"
              b"data: \xe2\x80\xa8 inside \xe2\x80\xa9 and \xc2\x85 too\n\n"
              b"data: last without blank line")
    events = parser.feed(stream) + parser.close()
    assert events == [synapse.ServerEvent("a", "no space\n two spaces"),
                      synapse.ServerEvent("message", "cr line"),
                      synapse.ServerEvent("message", "x\ny"),
                      synapse.ServerEvent("message", "\u2028 inside \u2029 and \x85 too"),
                      synapse.ServerEvent("message", "last without blank line")]
    for cut in range(1, len(stream)):  # a field's name, colon and space split across reads too
        for second in (cut + 1, cut + 7):
            parser = synapse.EventStreamParser()
            pieces = (stream[:cut], stream[cut:second], stream[second:])
            assert [e for p in pieces for e in parser.feed(p)] + parser.close() == events, cut


def test_one_byte_network_writes_and_split_multibyte_characters(user, server):
    user.use_server(server)
    body = openai_stream("na\u00efve ", "\u65e5\u672c\u8a9e ", "\U0001F389")
    server.queue(Reply(chunks=[body[i:i + 1] for i in range(len(body))]))
    result = user.run("hi")
    assert result.returncode == 0, err(result)
    assert text(result) == "na\u00efve \u65e5\u672c\u8a9e \U0001F389\n"


def test_multibyte_character_split_across_two_writes_without_charset(user, server):
    user.write_config(f'provider = "ollama"\nbase_url = "{server.url}/v1"\n')
    body = openai_stream("caf\u00e9 \U0001F600")
    cut = body.index("\U0001F600".encode()) + 2
    server.queue(Reply(chunks=[body[:cut], body[cut:]], delay=0.05, content_type="text/event-stream"))
    result = user.run("hi")
    assert text(result) == "caf\u00e9 \U0001F600\n"
    assert user.messages()[-1] == ("assistant", "caf\u00e9 \U0001F600")


def test_utf8_whatever_the_declared_charset(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("\u00fcber \u2029 \u20ac")],
                       content_type="text/event-stream; charset=iso-8859-1"))
    assert text(user.run("hi")) == "\u00fcber \u2029 \u20ac\n"


def test_read_timeout_between_bytes(user, server):
    user.use_server(server, extra="timeout = 0.4\n")
    server.queue(Reply(chunks=[openai_stream("slow", done=False), b"data: [DONE]\n\n"], delay=3))
    result = user.run("hi")
    assert_one_error_line(result, 1, "deepseek sent nothing for 0.4 s", "raise timeout")
    assert "partial reply" not in err(result)
    assert user.messages() == [("user", "hi")]
    assert len(server.received) == 1  # not retried: the longest wait is `timeout`


def wait_for_output(process: subprocess.Popen, deadline: float = 20) -> bytes:
    """The first bytes the child prints, as soon as they arrive."""
    os.set_blocking(process.stdout.fileno(), False)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        data = process.stdout.read()
        if data:
            return data
        time.sleep(0.01)
    raise AssertionError("no output")


def slow_stream(pieces: int, delay: float) -> Reply:
    body = [sse(openai_chunk(None, role="assistant"))]
    body += [sse(openai_chunk(f"w{i} ")) for i in range(pieces)]
    return Reply(chunks=body + [b"data: [DONE]\n\n"], delay=delay)


def test_first_chunk_reaches_stdout_long_before_a_slow_stream_ends(user, server):
    user.use_server(server)
    server.queue(slow_stream(pieces=6, delay=0.25))
    started = time.monotonic()
    process = user.popen("hi")
    first = wait_for_output(process)
    first_at = time.monotonic() - started
    process.wait(timeout=30)
    total = time.monotonic() - started
    assert first.startswith(b"w0")
    # Generous: 1.25 s of the stream come after its first text.
    assert total - first_at > 0.6, (first_at, total)
    assert process.returncode == 0


def test_sigint_during_a_slow_stream_keeps_the_partial_reply(user, server):
    user.use_server(server)
    server.queue(slow_stream(pieces=50, delay=0.1))
    process = user.popen("hi")
    got = wait_for_output(process)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert b"Traceback" not in stderr
    printed = (got + out).decode()
    assert printed.endswith("\n") and printed.startswith("w0 ")
    messages = user.messages()
    assert messages[0] == ("user", "hi")
    assert messages[1][0] == "assistant" and messages[1][1].startswith("w0 w1")
    assert printed.rstrip("\n") == messages[1][1]


def test_api_key_never_in_any_output(user, server):
    user.use_server(server, extra='\n')
    server.queue(json_error(401, {"error": {"message": f"Incorrect API key provided: {KEY}",
                                            "type": "invalid_request_error"}}))
    outputs = [user.run("hi", env={"SYNAPSE_DEBUG": "1"})]
    server.queue(Reply(chunks=[sse({"error": {"message": f"bad key {KEY}"}})]))
    outputs.append(user.run("hi", env={"SYNAPSE_DEBUG": "1"}))
    outputs.append(user.run("sessions", "list", "--json"))
    outputs.append(user.run("sessions", "export", user.session_ids()[0]))
    for result in outputs:
        assert KEY not in text(result) + err(result)
    assert "[redacted]" in err(outputs[0]) and "Traceback" in err(outputs[0])
    dump = "\n".join(sqlite3.connect(user.db_path).iterdump())
    assert KEY not in dump


# ---------------------------------------------------------------------------
# The rest of the session tools (SPEC §3)
# ---------------------------------------------------------------------------


def test_sessions_commands_in_a_subprocess(user, tmp_path):
    """Each `sessions` command once as a user runs it (the breadth is in-process)."""
    user.write_config("[session]\nmax_sessions = 1\nauto_cleanup = false\n")
    for message in ("first about owls", "second about bats"):
        assert user.spawn("-p", "echo", message).returncode == 0
    first, second = user.session_ids()
    listing = user.spawn("sessions", "list")
    assert listing.returncode == 0 and text(listing).splitlines()[1].startswith(second)
    assert json.loads(text(user.spawn("sessions", "list", "--json")))[1]["id"] == first
    shown = user.spawn("sessions", "show", first[:6])
    assert "[USER]\nfirst about owls\n" in text(shown)
    assert text(user.spawn("sessions", "rename", first, "Owls")).startswith(f"Renamed session {first}")
    found = json.loads(text(user.spawn("sessions", "search", "OWLS", "--json")))
    assert [h["id"] for h in found] == [first] and found[0]["name"] == "Owls"
    out = tmp_path / "owls.md"
    assert user.spawn("sessions", "export", first, "-o", str(out)).returncode == 0
    assert out.read_text().startswith("# Owls\n")
    dry = user.spawn("sessions", "cleanup", "--dry-run")
    assert text(dry).startswith("Would delete 1 sessions") and user.session_ids() == [first, second]
    assert text(user.spawn("sessions", "cleanup")).startswith("Deleted 1 sessions (1 over max_sessions")
    assert user.session_ids() == [second]
    assert text(user.spawn("sessions", "delete", second)) == f"Deleted session {second}\n"
    assert user.session_ids() == []


def test_sessions_rename(user):
    user.ok("-p", "echo", "hi")
    (sid,) = user.session_ids()
    result = user.run("sessions", "rename", sid[:5], "Trip plans \u2708")
    assert result.returncode == 0 and sid in text(result)
    assert user.rows("SELECT name FROM sessions") == [("Trip plans \u2708",)]
    assert_one_error_line(user.run("sessions", "rename", str(uuid.uuid4()), "x"), 1, "not found")


def test_sessions_export_markdown_json_and_file(user, tmp_path):
    user.ok("-p", "echo", "--system", "You are a pirate.", "--name", "Pirate talk", "Ahoy")
    (sid,) = user.session_ids()
    markdown = text(user.run("sessions", "export", sid))
    assert markdown.startswith("# Pirate talk\n")
    assert f"`{sid}`" in markdown and "- Provider: echo" in markdown and "- Model: echo" in markdown
    assert "## System\n\nYou are a pirate.\n" in markdown
    assert markdown.index("## User\n\nAhoy\n") < markdown.index("## Assistant\n\nAhoy\n")
    exported = json.loads(text(user.run("sessions", "export", sid, "--format", "json")))
    assert exported == json.loads(text(user.run("sessions", "show", sid, "--json")))
    target = tmp_path / "out.md"
    result = user.run("sessions", "export", sid[:6], "-o", str(target))
    assert result.returncode == 0 and target.read_text(encoding="utf-8") == markdown
    assert_one_error_line(user.run("sessions", "export", sid, "-o", str(tmp_path / "no" / "x.md")),
                          1, "cannot write")


def test_sessions_search(user):
    user.ok("-p", "echo", "The Quick Brown Fox")
    user.ok("-p", "echo", "nothing to see")
    user.ok("-p", "echo", "100% sure_thing it's \"quoted\"")
    user.ok("-p", "echo", "\u00c4rger mit \u00dcmlauten")
    fox, nothing, percent, umlaut = user.session_ids()
    result = user.run("sessions", "search", "qUICK bROWN")
    assert result.returncode == 0
    assert fox in text(result) and nothing not in text(result)
    assert "Quick Brown Fox" in text(result)
    data = json.loads(text(user.run("sessions", "search", "%", "--json")))
    assert [d["id"] for d in data] == [percent]
    assert "100% sure_thing" in data[0]["snippet"]
    assert [d["id"] for d in json.loads(text(user.run("sessions", "search", "e_t", "--json")))] == [percent]
    assert [d["id"] for d in json.loads(text(user.run("sessions", "search", "it's \"q", "--json")))] == [percent]
    assert [d["id"] for d in json.loads(text(user.run("sessions", "search", "\u00e4RGER", "--json")))] == [umlaut]
    none = user.run("sessions", "search", "zebra")
    assert none.returncode == 0 and "No sessions match" in text(none)
    assert json.loads(text(user.run("sessions", "search", "zebra", "--json"))) == []


def test_sessions_search_order_limit_and_snippet(user):
    for i in range(3):
        user.ok("-p", "echo", f"needle number {i} " + "padding " * 30)
    ids = user.session_ids()
    data = json.loads(text(user.run("sessions", "search", "NEEDLE", "--json", "--limit", "2")))
    assert [d["id"] for d in data] == [ids[2], ids[1]]
    assert len(data[0]["snippet"]) <= 80 and "needle number 2" in data[0]["snippet"]
    assert synapse.make_snippet("x" * 200 + "target" + "y" * 200, "TARGET").count("target") == 1
    # "\u0130".lower() is two characters: the needle is found in the text as it is.
    assert "target" in synapse.make_snippet("\u0130" * 200 + " target " + "y" * 200, "target")


def test_sessions_cleanup_and_dry_run(user):
    user.write_config("[session]\nmax_sessions = 2\nretention_days = 30\nauto_cleanup = false\n")
    for i in range(5):
        user.ok("-p", "echo", f"chat {i}")
    ids = user.session_ids()
    set_updated(user.db_path, ids[0], NOW - timedelta(days=40))
    dry = user.run("sessions", "cleanup", "--dry-run")
    assert dry.returncode == 0
    assert text(dry).splitlines()[0].startswith(
        "Would delete 3 sessions (2 over max_sessions, 1 past retention_days)")
    assert all(sid in text(dry) for sid in ids[:3])
    assert user.session_ids() == ids
    real = user.run("sessions", "cleanup")
    assert text(real) == "Deleted 3 sessions (2 over max_sessions, 1 past retention_days)\n"
    assert user.session_ids() == ids[3:]
    assert user.rows("SELECT count(*) FROM messages") == [(4,)]


def test_auto_cleanup_runs_on_chat_and_protects_the_continued_session(user):
    for i in range(3):
        user.ok("-p", "echo", f"chat {i}")
    ids = user.session_ids()
    set_updated(user.db_path, ids[0], NOW - timedelta(days=400))
    user.write_config("[session]\nmax_sessions = 1\nretention_days = 90\n")
    result = user.run("-p", "echo", "-s", ids[0], "still here")
    assert result.returncode == 0
    assert user.session_ids() == [ids[0]]
    user.write_config("[session]\nmax_sessions = 1\nauto_cleanup = false\n")
    user.ok("-p", "echo", "new one")
    assert len(user.session_ids()) == 2


# ---------------------------------------------------------------------------
# Interactive mode (SPEC §7)
# ---------------------------------------------------------------------------


def test_repl_scripted_turns_in_one_session(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("one")]), Reply(chunks=[openai_stream("two")]))
    result = user.spawn("-r", input=b"first\n\nsecond\n")
    assert result.returncode == 0, err(result)
    assert text(result) == "one\ntwo\n"  # no prompt when stdin is not a terminal
    (sid,) = user.session_ids()
    assert f"session: {sid}" in err(result)
    assert server.received[-1].body["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"}]


def test_repl_commands_new_session_and_exit(user):
    script = "a\n/session\n/new\nb\n/help\n/bogus\n/exit\nnot sent\n"
    result = user.run("-r", "-p", "echo", "--name", "named", input=script.encode())
    assert result.returncode == 0, err(result)
    first, second = user.session_ids()
    out = text(result)
    assert out.startswith(f"a\n{first}\nb\n")
    assert "/new" in out and "/exit" in out  # the help text
    assert "unknown command /bogus" in err(result)
    assert err(result).rstrip().endswith(f"session: {second}")
    assert user.rows("SELECT name FROM sessions") == [("named",), ("named",)]
    assert [c for _, c in user.messages()] == ["a", "a", "b", "b"]
    assert "not sent" not in out


def test_repl_resumes_with_history(user, server):
    user.use_server(server)
    user.ok("-p", "echo", "earlier question")
    (sid,) = user.session_ids()
    server.queue(Reply(chunks=[openai_stream("later answer")]))
    result = user.run("-r", "-s", sid[:4], "-p", "deepseek", input=b"later question\n/quit\n")
    assert result.returncode == 0, err(result)
    assert server.received[-1].body["messages"] == [
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier question"},
        {"role": "user", "content": "later question"}]
    assert user.session_ids() == [sid] and f"session: {sid}" in err(result)


def test_repl_provider_error_keeps_the_loop_going(user, server):
    user.use_server(server)
    server.queue(json_error(400, {"error": {"message": "bad request", "type": "invalid_request_error"}}),
                 Reply(chunks=[openai_stream("recovered")]))
    result = user.run("-r", input=b"one\ntwo\n")
    assert "bad request" in err(result) and text(result) == "recovered\n"
    assert [c for _, c in user.messages()] == ["one", "two", "recovered"]


def test_repl_needs_its_provider_key_before_starting(user):
    result = user.run("-r", input=b"hello\n")
    assert_one_error_line(result, 2, "DEEPSEEK_API_KEY")
    assert not user.db_path.exists()


class Tmux:
    def __init__(self, socket_path: Path, env: dict):
        self.base = ["tmux", "-S", str(socket_path)]
        self.env = env

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True,
                              env=self.env, timeout=30).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "t")

    def wait_for(self, predicate, timeout: float = 20) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"screen never matched:\n{self.screen()}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
def test_repl_in_a_real_terminal(user, server, tmp_path):
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("Streamed", " reply")]), slow_stream(pieces=200, delay=0.1),
                 slow_stream(pieces=200, delay=0.1))
    tmux = Tmux(tmp_path / "tmux.sock", {**user.env, "TERM": "xterm"})
    log = tmp_path / "stderr.log"
    command = (f"{sys.executable} {SYNAPSE} -r 2>{log}; echo EXITED $?; "
               f"{sys.executable} {SYNAPSE} -r -p echo; echo AGAIN $?; sleep 30")
    tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "40", command)
    try:
        tmux.wait_for(lambda s: s.rstrip().endswith(">"))
        tmux("send-keys", "-t", "t", "Hello there", "Enter")
        tmux.wait_for(lambda s: "Streamed reply" in s and s.rstrip().endswith(">"))
        tmux("send-keys", "-t", "t", "Tell me a long story", "Enter")
        tmux.wait_for(lambda s: "w3 " in s)
        tmux("send-keys", "-t", "t", "C-c")
        screen = tmux.wait_for(lambda s: s.rstrip().endswith(">"))
        assert "EXITED" not in screen  # Ctrl-C during a reply returns to the prompt
        (sid,) = user.session_ids()
        messages = user.messages()
        assert messages[:3] == [("user", "Hello there"), ("assistant", "Streamed reply"),
                                ("user", "Tell me a long story")]
        assert messages[3][0] == "assistant" and messages[3][1].startswith("w0 w1 w2 w3")
        assert len(messages[3][1].split()) < 200
        # A stopped /retry keeps the reply it would have replaced, and says so.
        tmux("send-keys", "-t", "t", "/retry", "Enter")
        tmux.wait_for(lambda s: s.count("w3 ") >= 2)
        tmux("send-keys", "-t", "t", "C-c")
        screen = tmux.wait_for(lambda s: s.rstrip().endswith(">") and s.count("w3 ") >= 2)
        assert "EXITED" not in screen
        assert user.messages() == messages
        tmux("send-keys", "-t", "t", "C-d")
        screen = tmux.wait_for(lambda s: "EXITED" in s)
        assert "EXITED 0" in screen
        assert f"session: {sid}" in log.read_text()
        assert "the retry was stopped; the old reply was kept" in log.read_text()
        assert log.read_text().count("what arrived was kept") == 1  # the first Ctrl-C's, only
        history = user.config_dir / "history"
        assert history.exists() and stat.S_IMODE(history.stat().st_mode) == 0o600
        assert "Hello there" in history.read_text()
        # Ctrl-C at the prompt leaves, with the Ctrl-C exit code.
        tmux.wait_for(lambda s: s.rstrip().endswith(">") and "EXITED 0" in s)
        tmux("send-keys", "-t", "t", "C-c")
        assert "AGAIN 130" in tmux.wait_for(lambda s: "AGAIN" in s)
    finally:
        tmux("kill-server")


# ---------------------------------------------------------------------------
# Reliability and security (SPEC §8)
# ---------------------------------------------------------------------------


def write_lock_taken(probe: sqlite3.Connection) -> bool:
    """Whether another connection holds the database's write lock right now
    (``probe`` must have been opened with ``timeout=0``)."""
    try:
        probe.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return True
    probe.execute("ROLLBACK")
    return False


def integrity(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM messages WHERE session_id NOT IN"
                            " (SELECT id FROM sessions)").fetchone() == (0,)
    finally:
        conn.close()


WORKER = """
import subprocess, sys
command, worker, count = sys.argv[1:4], sys.argv[4], int(sys.argv[5])
extra = sys.argv[6:]
failures = 0
for i in range(count):
    r = subprocess.run([*command, "-p", "echo", *extra, f"worker {worker} chat {i}"],
                       capture_output=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0 or r.stdout != f"worker {worker} chat {i}\\n".encode():
        failures += 1
        sys.stderr.buffer.write(r.stderr)
sys.exit(1 if failures else 0)
"""


def run_workers(user: User, tmp_path: Path, workers: int, count: int, *extra: str) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    processes = [subprocess.Popen([sys.executable, str(script), *COMMAND, str(w), str(count), *extra],
                                  env=user.env, stderr=subprocess.PIPE, cwd=user.root)
                 for w in range(workers)]
    for p in processes:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr.decode()
        assert b"locked" not in stderr


@pytest.mark.slow
def test_eight_processes_chatting_into_one_new_database(user, tmp_path):
    run_workers(user, tmp_path, workers=8, count=6)
    assert len(user.session_ids()) == 48
    contents = sorted(c for r, c in user.messages() if r == "user")
    assert contents == sorted(f"worker {w} chat {i}" for w in range(8) for i in range(6))
    assert len(user.messages()) == 96
    integrity(user.db_path)


@pytest.mark.slow
def test_two_processes_appending_to_one_session(user, tmp_path):
    user.ok("-p", "echo", "start")
    (sid,) = user.session_ids()
    run_workers(user, tmp_path, 2, 10, "-s", sid)
    assert user.session_ids() == [sid]
    messages = user.messages()
    assert len(messages) == 42
    assert sorted(c for r, c in messages if r == "user") == sorted(
        ["start"] + [f"worker {w} chat {i}" for w in range(2) for i in range(10)])
    integrity(user.db_path)


@pytest.mark.slow
def test_sigkill_at_random_points_of_a_chat(user, server):
    user.use_server(server)
    rng = random.Random(8)
    started_streaming = []
    for attempt in range(7):
        server.queue(slow_stream(pieces=12, delay=0.05))
        process = user.popen(f"turn {attempt}")
        time.sleep(rng.uniform(0.0, 0.9))
        os.set_blocking(process.stdout.fileno(), False)
        printed = process.stdout.read() or b""
        process.kill()
        process.wait()
        if printed:
            started_streaming.append(f"turn {attempt}")
        if user.db_path.exists():
            integrity(user.db_path)
    stored = {c for r, c in user.messages() if r == "user"}
    assert set(started_streaming) <= stored
    assert started_streaming, "no kill landed mid-stream; the timings need a look"
    assert user.run("sessions", "list").returncode == 0


SLOW_MIGRATION = """
-- migration: {next} a slow one
CREATE TABLE filler (n INTEGER, pad TEXT);
INSERT INTO filler WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 3000000)
  SELECT n, hex(randomblob(16)) FROM c;
"""


@pytest.mark.slow
def test_sigkill_during_a_migration_leaves_a_whole_version(user, tmp_path):
    user.ok("-p", "echo", "before the upgrade")
    version = len(synapse.load_migrations())
    newer = tmp_path / "newer"
    newer.mkdir()
    shutil.copy(SYNAPSE, newer / "synapse.py")
    schema = (HERE / "schema.sql").read_text() + SLOW_MIGRATION.format(next=version + 1)
    (newer / "schema.sql").write_text(schema)
    process = subprocess.Popen([sys.executable, str(newer / "synapse.py"), "sessions", "list"],
                               env=user.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    assert process.poll() is None, "the migration finished before it could be killed"
    process.kill()
    process.wait()
    integrity(user.db_path)
    conn = sqlite3.connect(user.db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == version
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'filler'").fetchone() == (0,)
    conn.close()
    assert "before the upgrade" in text(user.run("sessions", "list"))


OPEN_AT_ONCE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import synapse
open(sys.argv[3] + "." + str(os.getpid()), "w").close()
while not os.path.exists(sys.argv[3]):
    time.sleep(0.0005)
try:
    synapse.SqliteStore(sys.argv[2]).close()
except synapse.SynapseError as exc:
    sys.exit(str(exc))
"""


@pytest.mark.slow
def test_eight_processes_creating_one_database_at_the_same_moment(tmp_path):
    # SQLite refuses the switch to WAL at once, without the busy timeout,
    # while another process makes the same new database.
    for attempt in range(8):
        db, go = tmp_path / f"{attempt}.db", tmp_path / f"go{attempt}"
        processes = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(HERE), str(db), str(go)],
                                      stderr=subprocess.PIPE) for _ in range(8)]
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob(f"go{attempt}.*"))) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        for p in processes:
            _, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr.decode()
        integrity(db)


def fast_id(order: Optional[int] = None) -> str:
    """An ID in UUID form, made without a uuid object (history builders make
    many): random, or led by ``order`` so that IDs sort as they are made, as
    synapse's message IDs do."""
    h = os.urandom(16).hex() if order is None else f"{order:012x}{os.urandom(10).hex()}"
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-8{h[17:20]}-{h[20:]}"


def many_sessions(path: Path, sessions: int, messages_each: int) -> None:
    """A history built fast in one transaction, oldest session first."""
    synapse.SqliteStore(str(path)).close()
    conn = synapse.connect(str(path))
    conn.execute("BEGIN")
    session_rows, message_rows = [], []
    for i in range(sessions):
        sid, stamp = fast_id(), synapse.format_timestamp(NOW - timedelta(minutes=sessions - i))
        session_rows.append((sid, stamp, stamp))
        message_rows += [(fast_id(len(message_rows) + j), sid, f"message {i}.{j} " * 8, stamp)
                         for j in range(messages_each)]
    conn.executemany("INSERT INTO sessions (id, provider, model, created_at, updated_at)"
                     " VALUES (?, 'echo', 'echo', ?, ?)", session_rows)
    # The index of random session IDs is built once at the end, in one sorted pass.
    (index,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'idx_messages_session'").fetchone()
    conn.execute("DROP INDEX idx_messages_session")
    conn.executemany("INSERT INTO messages (id, session_id, role, content, timestamp)"
                     " VALUES (?, ?, 'user', ?, ?)", message_rows)
    conn.execute(index)
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.slow
def test_sigkill_during_a_bulk_cleanup_leaves_all_or_nothing(user, tmp_path):
    base = tmp_path / "base.db"
    many_sessions(base, 20_000, 5)
    user.write_config("[session]\nmax_sessions = 10000\nretention_days = 0\n")

    def attempt(kill_after: Optional[float], from_lock: bool = True) -> tuple:
        """Run a cleanup; kill it ``kill_after`` seconds after it takes the write lock
        (or after it starts); return its exit code, the sessions left, and how long
        it held the lock."""
        for suffix in ("", "-wal", "-shm"):
            Path(f"{user.db_path}{suffix}").unlink(missing_ok=True)
        shutil.copy(base, user.db_path)
        probe = sqlite3.connect(user.db_path, timeout=0, isolation_level=None)
        process = user.popen("sessions", "cleanup")
        if from_lock:
            # The cleanup's one transaction is the only time this command holds
            # the write lock, so it marks where a kill must roll everything back.
            while not write_lock_taken(probe) and process.poll() is None:
                time.sleep(0.001)
        locked = time.monotonic()
        if kill_after is None:
            while write_lock_taken(probe) and process.poll() is None:
                time.sleep(0.001)
        else:
            time.sleep(kill_after)
            process.kill()
        held = time.monotonic() - locked
        process.wait()
        probe.close()
        integrity(user.db_path)
        conn = sqlite3.connect(user.db_path)
        (count,) = conn.execute("SELECT count(*) FROM sessions").fetchone()
        (index,) = conn.execute("SELECT count(*) FROM sqlite_master"
                                " WHERE name = 'idx_messages_session'").fetchone()
        conn.close()
        assert count in (20_000, 10_000) and index == 1
        return process.returncode, count, held

    *whole, held = attempt(None)
    assert whole == [0, 10_000]
    assert held > 0.05, "the cleanup's transaction was not seen"
    rng = random.Random(11)
    # Kills inside the transaction (which drops and rebuilds the indexes), then
    # anywhere in the run: start-up, the transaction, the checkpoint after it.
    outcomes = [attempt(held * rng.uniform(0.02, 0.7))[:2] for _ in range(4)]
    for _ in range(2):
        attempt(held * rng.uniform(0.0, 1.5), from_lock=False)
    assert (-signal.SIGKILL, 20_000) in outcomes, "no kill landed inside the cleanup's transaction"


# -- bad input ---------------------------------------------------------------------


@contextlib.contextmanager
def read_only(path: Path):
    """A file even root cannot write (root ignores mode bits)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available to make a read-only file as root")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o600)


def test_read_only_database(user):
    user.ok("-p", "echo", "kept")
    with read_only(user.db_path):
        result = user.run("-p", "echo", "new")
        assert_one_error_line(result, 1, "read-only")
    assert [c for _, c in user.messages()] == ["kept", "kept"]


def test_directory_where_the_database_should_be(user):
    user.db_path.mkdir(parents=True)
    assert_one_error_line(user.run("-p", "echo", "hi"), 1, "is a directory")
    assert_one_error_line(user.run("sessions", "list"), 1, "is a directory")


def test_corrupt_and_foreign_database_files(user):
    user.config_dir.mkdir(parents=True)
    user.db_path.write_bytes(b"SQLite format 3\x00" + b"\xde\xad" * 3000)
    before = user.db_path.read_bytes()
    assert_one_error_line(user.run("-p", "echo", "hi"), 1, "damaged")
    assert user.db_path.read_bytes() == before
    user.db_path.write_bytes(b"PK\x03\x04 a zip file")
    assert_one_error_line(user.run("sessions", "list"), 1, "not a SQLite database")
    assert user.db_path.read_bytes() == b"PK\x03\x04 a zip file"


def test_newer_database_in_a_subprocess(user):
    user.ok("-p", "echo", "hi")
    conn = sqlite3.connect(user.db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = user.db_path.read_bytes()
    assert_one_error_line(user.spawn("-p", "echo", "hi"), 1, "newer", "upgrade synapse")
    assert_one_error_line(user.spawn("sessions", "list"), 1, "newer")
    assert user.db_path.read_bytes() == before


def test_postgres_url_and_bad_toml_in_a_subprocess(user):
    user.write_config('[session]\ndatabase_url = "postgres://db.example/synapse"\n')
    assert_one_error_line(user.spawn("-p", "echo", "hi"), 2, "only SQLite")
    assert_one_error_line(user.spawn("sessions", "list"), 2, "only SQLite")
    user.write_config("provider = [unclosed\n")
    assert_one_error_line(user.spawn("-p", "echo", "hi"), 2, "config.toml", "not valid TOML")


def test_permissions_under_a_permissive_umask_in_a_subprocess(user):
    result = subprocess.run([*COMMAND, "-p", "echo", "private"], env=user.env,
                            capture_output=True, preexec_fn=lambda: os.umask(0),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0
    assert stat.S_IMODE(user.db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(user.config_dir.stat().st_mode) == 0o700


def test_config_permission_warning_in_a_subprocess(user):
    user.write_config(f'api_key = "{KEY}"\nprovider = "echo"\n', mode=0o644)
    result = user.spawn("hi")
    assert result.returncode == 0
    assert err(result).count("chmod 600") == 1 and KEY not in err(result)


def test_unexpected_exceptions_are_one_line_without_traceback(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError(f"surprise with {KEY}")

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("SYNAPSE_DEBUG", raising=False)
    monkeypatch.setattr(synapse, "load_config", boom)
    assert synapse.main(["sessions", "list"]) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "unexpected RuntimeError" in stderr
    assert KEY not in stderr and "[redacted]" in stderr


# ---------------------------------------------------------------------------
# Hostile replies, terminals, output streams and config (SPEC §3, §6-§8)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_replies_are_decoded(user, server, encoding):
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("Packed", " stream")], encoding=encoding))
    result = user.run("hi")
    assert result.returncode == 0 and text(result) == "Packed stream\n", err(result)
    # A stream asks for no compression; the body came compressed anyway.
    assert server.received[-1].headers["Accept-Encoding"] == "identity"
    whole = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                             "content": "Packed body"}}]})
    server.queue(Reply(content_type="application/json", chunks=[whole.encode()], encoding=encoding))
    result = user.run("--no-stream", "hi")
    assert result.returncode == 0 and text(result) == "Packed body\n", err(result)
    user.use_server(server, provider="anthropic")
    server.queue(json_error(401, {"type": "error", "error": {"type": "authentication_error",
                                                             "message": "invalid x-api-key"}}))
    server.replies.queue[-1].encoding = encoding
    assert_one_error_line(user.run("hi"), 1, "invalid x-api-key")


def test_a_reply_that_does_not_decompress_is_a_provider_error(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[b"not gzip at all"], headers={"Content-Encoding": "gzip"}))
    assert_one_error_line(user.run("hi"), 1, "deepseek sent a gzip reply that does not decompress")


@pytest.mark.parametrize("status", [302, 307])
def test_redirects_are_not_followed(user, server, status):
    elsewhere = FakeProvider()
    try:
        for provider in ("anthropic", "deepseek"):
            user.use_server(server, provider=provider)
            server.queue(Reply(status=status, chunks=[b""],
                               headers={"Location": f"{elsewhere.url}/v1/messages"}))
            result = user.run("hi")
            assert_one_error_line(result, 1, f"{provider} answered {status}",
                                  f"{elsewhere.url}/v1/messages", "set base_url to it")
        assert elsewhere.received == [] and len(server.received) == 2  # no key, no chat went there
    finally:
        elsewhere.close()


def test_a_silent_server_times_out_once(user, server):
    user.use_server(server, extra="timeout = 0.4\n")
    server.queue(Reply(chunks=[openai_stream("late")], head_delay=2.5))
    result = user.run("hi")
    assert_one_error_line(result, 1, "deepseek sent nothing for 0.4 s",
                          "raise timeout in the config")
    assert len(server.received) == 1  # not retried: the longest wait is `timeout`


def test_the_event_stream_parser_is_linear():
    line = b"data: " + b"x" * (20 << 20) + b"\n\n"
    parser = synapse.EventStreamParser()
    started = time.perf_counter()
    events = [e for i in range(0, len(line), 65536) for e in parser.feed(line[i:i + 65536])]
    seconds = time.perf_counter() - started
    assert [len(e.data) for e in events + parser.close()] == [20 << 20]
    assert seconds < 2.0, seconds  # it took quadratic time: 8.6 s for half as much


WRONG_SHAPES = [
    ({"choices": ["x"]}, "a choice that is not an object"),
    ({"choices": [{"index": 0, "finish_reason": "stop"}]}, "without a message object"),
    ({"choices": {}}, "without a list of choices"),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": 42}}]},
     "reply text that is not a string"),
    ({"foo": 1}, "without a list of choices"),
    ({"choices": []}, "without any text"),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": None},
                   "finish_reason": "content_filter"}]}, "without any text (stop reason: content_filter)"),
]


@pytest.mark.parametrize("body, complaint", WRONG_SHAPES)
def test_a_whole_reply_of_the_wrong_shape_is_a_provider_error(user, server, body, complaint):
    user.use_server(server)
    server.queue(Reply(content_type="application/json", chunks=[json.dumps(body).encode()]))
    result = user.run("--no-stream", "hi")
    assert_one_error_line(result, 1, "deepseek sent", complaint)
    assert "unexpected" not in err(result) and result.stdout == b""
    assert user.messages() == [("user", "hi")]  # no empty assistant message


@pytest.mark.parametrize("events, complaint", [
    ([{"choices": {}}], "without a list of choices"),
    ([{"choices": ["x"]}], "a choice that is not an object"),
    ([{"choices": [{"index": 0, "delta": "text"}]}], "without a delta object"),
    ([openai_chunk(None, content=42)], "not a string"),
    ([{"foo": 1}], "without a list of choices"),
    ([openai_chunk(None, role="assistant"),
      {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}],
     "without any text (stop reason: length)"),
])
def test_a_stream_of_the_wrong_shape_is_a_provider_error(user, server, events, complaint):
    user.use_server(server)
    server.queue(Reply(chunks=[sse(*events) + b"data: [DONE]\n\n"]))
    result = user.run("hi")
    assert_one_error_line(result, 1, complaint)
    assert user.messages() == [("user", "hi")]


@pytest.mark.parametrize("body, complaint", [
    ({"type": "message", "content": "text"}, "without a list of content blocks"),
    ({"type": "message", "content": [{"type": "text", "text": 7}]}, "not a string"),
    ({"type": "message", "content": [], "stop_reason": "refusal"}, "without any text (stop reason: refusal)"),
])
def test_an_anthropic_reply_of_the_wrong_shape_is_a_provider_error(user, server, body, complaint):
    user.use_server(server, provider="anthropic")
    server.queue(Reply(content_type="application/json", chunks=[json.dumps(body).encode()]))
    assert_one_error_line(user.run("--no-stream", "hi"), 1, "anthropic sent", complaint)
    server.queue(Reply(chunks=[anthropic_event("message_start", message={"usage": {}})
                               + anthropic_event("content_block_delta", index=0, delta="x")
                               + anthropic_event("message_stop")]))
    assert_one_error_line(user.run("hi"), 1, "anthropic sent a content block that is not an object")


def test_a_failed_turn_leaves_the_repl_at_its_prompt(user, server):
    user.use_server(server)
    server.queue(Reply(content_type="application/json", chunks=[b'{"choices": {}}']),
                 Reply(chunks=[openai_stream("still here")]))
    result = user.run("-r", "--no-stream", input=b"first\nsecond\n")
    assert result.returncode == 0 and text(result) == "still here\n"
    assert "without a list of choices" in err(result)
    assert [c for _, c in user.messages()] == ["first", "second", "still here"]


def test_a_multi_line_block_in_the_repl_is_one_turn(user):
    script = 'before\n"""\nline one\n\n  line three\n  """  \nafter\n"""\nunclosed\n'
    result = user.run("-r", "-p", "echo", input=script.encode())
    assert result.returncode == 0, err(result)
    assert [c for r, c in user.messages() if r == "user"] == [
        "before", "line one\n\n  line three", "after", "unclosed"]


HOSTILE = "x \x1b]0;TITLE\x07\x1b[2J\x1b[H\r\x9b31m\u202egnp.exe\x7f done"
SHOWN = "x \\x1b]0;TITLE\\x07\\x1b[2J\\x1b[H\\x0d\\x9b31m\\u202egnp.exe\\x7f done"


def test_control_characters_reach_a_terminal_as_escapes(user, tmp_path):
    result = user.run("-p", "echo", "--name", HOSTILE, "--system", HOSTILE, HOSTILE, tty="out")
    assert text(result) == SHOWN + "\n"
    (sid,) = user.session_ids()
    assert user.messages() == [("user", HOSTILE), ("assistant", HOSTILE)]  # stored exactly
    shown = text(user.run("sessions", "show", sid, tty="out"))
    assert "\x1b" not in shown and "\x9b" not in shown and "\u202e" not in shown
    assert f"Name:     {SHOWN}" in shown and f"System:   {SHOWN}" in shown
    assert f"[USER]\n{SHOWN}\n" in shown
    for args in (["sessions", "list"], ["sessions", "search", "TITLE"], ["sessions", "export", sid]):
        on_terminal = text(user.run(*args, tty="out"))
        assert "\\x1b" in on_terminal and not re.search(synapse._CONTROLS, on_terminal), args
        assert HOSTILE.split("\r")[0] in text(user.run(*args)) or args[1] == "list", args
    # Piped output, -o FILE and --json keep the text exactly.
    assert HOSTILE in text(user.run("sessions", "show", sid))
    assert HOSTILE in text(user.run("sessions", "export", sid))
    out = tmp_path / "x.md"
    user.ok("sessions", "export", sid, "-o", str(out), tty="out")
    assert HOSTILE in out.read_bytes().decode()
    on_terminal = text(user.run("sessions", "show", sid, "--json", tty="out"))
    assert not re.search(synapse._CONTROLS, on_terminal) and "\\u009b" in on_terminal
    assert json.loads(on_terminal)["messages"][0]["content"] == HOSTILE
    # Error lines on a terminal too.
    result = user.run("sessions", "show", "\x1b[2Jabcd", tty="err")
    assert "\\x1b[2J" in err(result) and "\x1b" not in err(result)


def many_listed_sessions(user: User, count: int, **fields: str) -> None:
    store = synapse.SqliteStore(str(user.db_path))
    for i in range(count):
        session = make_session(store, **fields)
        store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.USER,
                                                    f"preview text of session {i} " * 3))
    store.close()


@pytest.mark.parametrize("columns", [70, 80, 100, 132])
def test_sessions_list_fits_the_terminal(user, columns):
    many_listed_sessions(user, 3, name="\u65e5\u672c\u8a9e\u306e\u540d\u524d\u3067\u3059\u3088",
                         model="a-model-with-a-long-name-v2")
    lines = text(user.run("sessions", "list", tty="out", env={"COLUMNS": str(columns)})).splitlines()
    assert all(synapse.cell_width(line) <= columns for line in lines), lines
    ids = {line.split()[0] for line in lines[1:]}
    assert all(len(i) == 8 for i in ids) == (columns < 132)
    assert all(any(s.startswith(i) for s in user.session_ids()) for i in ids)
    # Piped: full IDs, whatever COLUMNS says.
    piped = text(user.run("sessions", "list", env={"COLUMNS": str(columns)})).splitlines()
    assert {line.split()[0] for line in piped[1:]} == set(user.session_ids())


def test_list_layout_shrinks_preview_first_then_name_and_model_then_the_id():
    rows = [synapse.SessionSummary(uuid.uuid4(), "n" * 30, "echo", "m" * 30, NOW, NOW, 2, "p" * 50)]

    def widths(columns: int) -> List[int]:
        """Each column's width, read off where the headings start."""
        header, row = synapse.list_table(rows, columns).splitlines()
        starts = [header.index(h) for h in synapse.LIST_COLUMNS]
        return [b - a - 2 for a, b in zip(starts, starts[1:])] + [len(row) - starts[-1]]

    natural = [36, 30, 8, 30, 16, 8, 50]
    assert widths(1000) == widths(sum(natural) + 12) == natural
    # Narrower: PREVIEW gives way first, down to 8...
    assert widths(sum(natural) + 12 - 20) == [36, 30, 8, 30, 16, 8, 30]
    assert widths(sum(natural) + 12 - 42) == [36, 30, 8, 30, 16, 8, 8]
    # ...then NAME and MODEL, to no less than 8 each...
    assert widths(sum(natural) + 12 - 52) == [36, 20, 8, 30, 16, 8, 8]
    assert widths(sum(natural) + 12 - 86) == [36, 8, 8, 8, 16, 8, 8]
    # ...then the ID shows its first 8 characters, and the width that frees
    # goes back to PREVIEW.
    assert widths(100) == [8, 8, 8, 8, 16, 8, 100 - 12 - 56]
    assert widths(80) == [8, 8, 8, 8, 16, 8, 12]
    assert synapse.cut("\u65e5\u672c\u8a9e", 4, synapse.cell_width) == "\u65e5\u2026"
    assert synapse.cut("\u65e5\u672c\u8a9e", 6, synapse.cell_width) == "\u65e5\u672c\u8a9e"
    assert synapse.cell_width("e\u0301\u65e5\U0001F600") == 5


def test_sessions_list_on_a_real_pseudo_terminal(user):
    import pty

    many_listed_sessions(user, 2, name="\u5927" * 30)
    master, slave = pty.openpty()
    try:
        import fcntl
        import struct
        import termios
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 80, 0, 0))
        env = {k: v for k, v in user.env.items() if k != "COLUMNS"}
        process = subprocess.Popen([*COMMAND, "sessions", "list"], stdout=slave,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        os.close(slave)
        seen = b"".join(iter(lambda: _read_or_end(master), b""))
        process.wait(timeout=30)
    finally:
        os.close(master)
    lines = seen.decode().replace("\r\n", "\n").splitlines()
    assert process.returncode == 0 and len(lines) == 3
    assert all(synapse.cell_width(line) <= 80 for line in lines), lines
    assert len(lines[1].split()[0]) == 8


def test_closed_full_and_narrow_output_streams(user):
    user.ok("-p", "echo", "caf\u00e9 \u65e5\u672c")
    closed = subprocess.run([*COMMAND, "-p", "echo", "into nowhere"], env=user.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    assert_one_error_line(closed, 1, "standard output is closed")
    assert user.messages()[-2:] == [("user", "into nowhere"), ("assistant", "into ")]
    closed = subprocess.run([*COMMAND, "sessions", "list"], env=user.env,
                            capture_output=True, preexec_fn=lambda: os.close(1))
    assert_one_error_line(closed, 1, "standard output is closed")
    for args in (["-p", "echo", "to a full disk"], ["sessions", "list"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run([*COMMAND, *args], env=user.env, stdout=full,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert_one_error_line(result, 1, "cannot write to standard output", "No space left")
    assert user.messages()[-2:] == [("user", "to a full disk"), ("assistant", "to ")]
    ascii_only = user.spawn("sessions", "show", user.session_ids()[0],
                            env={"PYTHONIOENCODING": "ascii"})
    assert ascii_only.returncode == 0 and "caf? ??" in text(ascii_only)
    no_stderr = subprocess.run([*COMMAND, "-p", "echo", "--system", "x", "-C", "hi"],
                               env=user.env, capture_output=True, stdin=subprocess.DEVNULL,
                               preexec_fn=lambda: os.close(2))
    # The warning about --system had nowhere to go: the chat still succeeds, stdout clean.
    assert no_stderr.returncode == 0 and no_stderr.stdout == b"hi\n"


def test_a_reader_that_goes_away_ends_every_listing_alike(user):
    many_sessions(user.db_path, 3000, 1)
    for args in (["sessions", "list"], ["sessions", "list", "--json"]):
        pipeline = subprocess.run(
            f"{sys.executable} {SYNAPSE} {' '.join(args)} | head -1 >/dev/null; "
            f"echo ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash", env=user.env,
            capture_output=True)
        assert pipeline.stdout == b"1\n", (args, pipeline)
        assert pipeline.stderr == b"", (args, pipeline.stderr)  # no message for a broken pipe


@pytest.mark.parametrize("setting, key", [
    ("timeout = nan", "timeout"), ("timeout = inf", "timeout"), ("timeout = 1e300", "timeout"),
    ("timeout = 86401", "timeout"), ("temperature = nan", "temperature"),
    ("temperature = 2.5", "temperature"), ("temperature = -0.1", "temperature"),
    ("max_tokens = 0", "max_tokens"), ("[session]\nretention_days = 3000000", "session.retention_days"),
    ("[session]\nmax_sessions = -1", "session.max_sessions"),
])
def test_config_numbers_out_of_range_are_config_errors(user, setting, key):
    user.write_config(f'provider = "echo"\n{setting}\n')
    assert_one_error_line(user.run("hi"), 2, f"'{key}' must be")
    assert not user.db_path.exists()


@pytest.mark.parametrize("url", ["localhost/v1", "ftp://host/v1", "http://", "https://:80/x",
                                 "http://host:99999/"])
def test_a_base_url_that_is_not_an_http_url_is_a_config_error(user, url):
    user.write_config(f'provider = "ollama"\nbase_url = "{url}"\n')
    assert_one_error_line(user.run("hi"), 2, "base_url of ollama", "http:// or https://")
    assert not user.db_path.exists()


def test_credentials_in_base_url_and_bad_keys(user, monkeypatch):
    recorded_waits(monkeypatch)
    user.write_config(f'provider = "ollama"\nbase_url = "http://me:hunter2secret@127.0.0.1:{free_port()}/v1"\n')
    result = user.run("hi")
    assert_one_error_line(result, 1, "ollama is not reachable")
    assert "hunter2secret" not in err(result) and "[redacted]" in err(result)
    for key, complaint in ((KEY + "\n", "whitespace"), ("sk-\u00e9t\u00e9", "HTTP header")):
        result = user.run("-p", "openai", "hi", env={"OPENAI_API_KEY": key})
        assert_one_error_line(result, 2, "API key for openai (OPENAI_API_KEY)", complaint)
    user.write_config(f'[providers.openai]\napi_key = "{KEY} "\n')
    assert_one_error_line(user.run("-p", "openai", "hi"), 2, "api_key in", "pasted newline")


@pytest.mark.parametrize("url", ["file:{tmp}/x.db", "mysql:foo", "jdbc:sqlite:x.db"])
def test_database_urls_with_other_schemes_are_config_errors(user, tmp_path, url):
    url = url.format(tmp=tmp_path)
    user.write_config(f'[session]\ndatabase_url = "{url}"\n')
    assert_one_error_line(user.run("-p", "echo", "hi"), 2, "only SQLite")
    assert sorted(p.name for p in user.root.iterdir()) == ["home", "xdg"]  # no stray file or folder


def test_a_zero_byte_database_file_is_initialised_private(user):
    user.config_dir.mkdir(parents=True)
    user.db_path.touch(mode=0o644)
    user.db_path.chmod(0o644)
    user.ok("-p", "echo", "hi")
    assert stat.S_IMODE(user.db_path.stat().st_mode) == 0o600 and len(user.session_ids()) == 1


def test_a_new_session_and_its_first_message_are_one_transaction(user):
    user.ok("-p", "echo", "first")
    conn = sqlite3.connect(user.db_path)
    conn.execute("CREATE TRIGGER full BEFORE INSERT ON messages BEGIN"
                 " SELECT RAISE(ABORT, 'database or disk is full'); END")
    conn.commit()
    conn.close()
    for _ in range(3):
        assert_one_error_line(user.run("-p", "echo", "lost to a full disk"), 1, "full")
    assert len(user.session_ids()) == 1  # no empty sessions left behind


def test_integer_options_beyond_sqlite_are_usage_errors(user):
    result = user.run("sessions", "list", "--limit", "99999999999999999999999")
    assert_one_error_line(result, 2, "--limit", "9223372036854775807")
    assert user.run("sessions", "list", "--limit", str(2 ** 63 - 1)).returncode == 0


def test_a_message_that_starts_with_a_dash_must_follow_two_dashes(user):
    result = user.run("-p", "echo", "-hello")
    assert_one_error_line(result, 2, 'synapse -- "-hello"')
    assert not user.db_path.exists()
    assert text(user.run("-p", "echo", "--", "-hello")) == "-hello\n"


def test_export_to_stdout_with_a_dash_and_private_files(user, tmp_path):
    user.ok("-p", "echo", "secret plans")
    (sid,) = user.session_ids()
    result = user.run("sessions", "export", sid, "-o", "-")
    assert text(result).startswith("# Session ") and not (user.root / "-").exists()
    new = tmp_path / "new.md"
    old = os.umask(0o022)
    try:
        user.ok("sessions", "export", sid, "-o", str(new))
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    shared = tmp_path / "shared.json"
    shared.write_text("old")
    shared.chmod(0o644)
    user.ok("sessions", "export", sid, "--format", "json", "-o", str(shared))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert json.loads(shared.read_text())["id"] == sid


def test_chat_without_requests_says_how_to_install_it(user, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "requests.py").write_text("raise ImportError('No module named requests')\n")
    user.write_config(f'provider = "ollama"\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n')
    result = user.spawn("hi", env={"PYTHONPATH": str(blocker)})
    assert_one_error_line(result, 1, "needs the requests package", "pip install requests")
    assert "unexpected" not in err(result)


def test_help_as_a_newcomer_reads_it(user):
    chat = text(user.run("--help", env={"COLUMNS": "60"}))
    description = chat.split("\n\n")[1]
    assert len(description.splitlines()) > 1 and all(len(l) <= 60 for l in description.splitlines())
    for name in ("DEEPSEEK_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "SYNAPSE_DATABASE_URL",
                 "SYNAPSE_DEBUG", "sessions.db", "SYNAPSE_CONFIG", "143"):
        assert name in chat, name
    for command, words in (("show", ["ID  ", "unique prefix"]), ("rename", ["NAME", "clears"]),
                           ("search", ["TEXT", "literal substring"]), ("export", ["--format", "markdown"]),
                           ("cleanup", ["retention_days", "max_sessions"])):
        shown = text(user.run("sessions", command, "--help", env={"COLUMNS": "100"}))
        assert all(w in shown for w in words), (command, shown)
    assert "(any case)" not in text(user.run("sessions", "--help"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_mid_reply_keep_the_partial_reply(user, server, signum):
    user.use_server(server)
    server.queue(slow_stream(pieces=50, delay=0.1))
    process = user.popen("hi")
    got = wait_for_output(process)
    time.sleep(0.3)
    process.send_signal(signum)
    out, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signum, stderr
    assert b"Traceback" not in stderr
    messages = user.messages()
    assert messages[0] == ("user", "hi")
    assert messages[1][0] == "assistant" and messages[1][1].startswith("w0 w1")
    assert (got + out).decode().rstrip("\n") == messages[1][1]


# ---------------------------------------------------------------------------
# Tokens, cost and who answered; filters; models (SPEC §3, §6, §11)
#
# The replies below are real wire shapes, byte for byte: OpenAI's from the
# envoyproxy/ai-gateway cassettes (api.openai.com, 2025) and openai-python's
# snapshots, DeepSeek's from a recorded deepseek-reasoner stream, Anthropic's
# from anthropic-sdk-python's fixtures and a 2025 claude-sonnet-4-5 capture.
# ---------------------------------------------------------------------------

OPENAI_2025_LENGTH = (
    b'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk",'
    b'"created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default",'
    b'"system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":"",'
    b'"refusal":null},"finish_reason":null}],"usage":null,"obfuscation":"WuQNX"}\n\n'
    b'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk",'
    b'"created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default",'
    b'"system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"Once upon a"},'
    b'"finish_reason":null}],"usage":null,"obfuscation":"Vx"}\n\n'
    b'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk",'
    b'"created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default",'
    b'"system_fingerprint":null,"choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
    b'"usage":null,"obfuscation":"IPio8PDeczEmdPr"}\n\n'
    b'data: {"id":"chatcmpl-C4Hq5a6K3RaPMymUv70btQNYv6SvY","object":"chat.completion.chunk",'
    b'"created":1755137921,"model":"gpt-5-nano-2025-08-07","service_tier":"default",'
    b'"system_fingerprint":null,"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":100,'
    b'"total_tokens":112,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":100,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"t9"}\n\n'
    b'data: [DONE]\n\n')

OPENAI_2024_STOP = (
    b'data: {"id":"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL","object":"chat.completion.chunk",'
    b'"created":1727346168,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL","object":"chat.completion.chunk",'
    b'"created":1727346168,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd",'
    b'"choices":[{"index":0,"delta":{"content":"Sunny"},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL","object":"chat.completion.chunk",'
    b'"created":1727346168,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"chatcmpl-ABfw031mOJeYCSHe4yI2ZjOA6kMJL","object":"chat.completion.chunk",'
    b'"created":1727346168,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_5050236cbd",'
    b'"choices":[],"usage":{"prompt_tokens":14,"completion_tokens":30,"total_tokens":44,'
    b'"completion_tokens_details":{"reasoning_tokens":0}}}\n\n'
    b'data: [DONE]\n\n')

DEEPSEEK_REASONER = (
    b'data: {"id":"f802c271-d4da-4773-b8b3-b1e4dfbf14f3","object":"chat.completion.chunk",'
    b'"created":1759299469,"model":"deepseek-reasoner","system_fingerprint":'
    b'"fp_ffc7281d48_prod0820_fp8_kvcache","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":null,"reasoning_content":""},"logprobs":null,"finish_reason":null}]}\n\n'
    b': keep-alive\n\n'
    b'data: {"id":"f802c271-d4da-4773-b8b3-b1e4dfbf14f3","object":"chat.completion.chunk",'
    b'"created":1759299469,"model":"deepseek-reasoner","system_fingerprint":'
    b'"fp_ffc7281d48_prod0820_fp8_kvcache","choices":[{"index":0,"delta":{"content":null,'
    b'"reasoning_content":"Hmm, the user just said \\"Hello!\\" with an exclamation mark."},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"f802c271-d4da-4773-b8b3-b1e4dfbf14f3","object":"chat.completion.chunk",'
    b'"created":1759299469,"model":"deepseek-reasoner","system_fingerprint":'
    b'"fp_ffc7281d48_prod0820_fp8_kvcache","choices":[{"index":0,"delta":{"content":"Hello",'
    b'"reasoning_content":null},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"f802c271-d4da-4773-b8b3-b1e4dfbf14f3","object":"chat.completion.chunk",'
    b'"created":1759299469,"model":"deepseek-reasoner","system_fingerprint":'
    b'"fp_ffc7281d48_prod0820_fp8_kvcache","choices":[{"index":0,"delta":{"content":"!",'
    b'"reasoning_content":null},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"f802c271-d4da-4773-b8b3-b1e4dfbf14f3","object":"chat.completion.chunk",'
    b'"created":1759299469,"model":"deepseek-reasoner","system_fingerprint":'
    b'"fp_ffc7281d48_prod0820_fp8_kvcache","choices":[{"index":0,"delta":{"content":"",'
    b'"reasoning_content":null},"logprobs":null,"finish_reason":"stop"}],"usage":{'
    b'"prompt_tokens":6,"completion_tokens":169,"total_tokens":175,"prompt_tokens_details":'
    b'{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":117},'
    b'"prompt_cache_hit_tokens":1,"prompt_cache_miss_tokens":5}}\n\n'
    b'data: [DONE]\n\n')

ANTHROPIC_2025 = (
    b'event: message_start\ndata: {"type":"message_start","message":{"model":'
    b'"claude-sonnet-4-5-20250929","id":"msg_01Syufym9DZKGgeEtT3BDEAF","type":"message",'
    b'"role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"usage":'
    b'{"input_tokens":4,"cache_creation_input_tokens":15463,"cache_read_input_tokens":5432,'
    b'"cache_creation":{"ephemeral_5m_input_tokens":15463,"ephemeral_1h_input_tokens":0},'
    b'"output_tokens":1,"service_tier":"standard"}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hey"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    b'"stop_sequence":null},"usage":{"input_tokens":4,"cache_creation_input_tokens":15463,'
    b'"cache_read_input_tokens":5432,"output_tokens":3}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')

OPENAI_BODY_2025 = b"""{
  "id": "chatcmpl-C4Gm9xikLXbgE8He0BHWeoM03aa72",
  "object": "chat.completion",
  "created": 1755133833,
  "model": "gpt-5-nano-2025-08-07",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Hi there! How can I help you today?",
        "refusal": null,
        "annotations": []
      },
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 8,
    "completion_tokens": 377,
    "total_tokens": 385,
    "prompt_tokens_details": {
      "cached_tokens": 0,
      "audio_tokens": 0
    },
    "completion_tokens_details": {
      "reasoning_tokens": 320,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": null
}"""

ANTHROPIC_BODY = (
    b'{"id":"msg_01FwErskQLwz9RvaaHYxUA67","type":"message","role":"assistant","model":'
    b'"claude-opus-4-20250514","content":[{"type":"text","text":"Hello! Welcome to our '
    b'conversation."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":10,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":35,'
    b'"service_tier":"standard"}}')


def reply_record(user: User) -> tuple:
    return user.rows("SELECT content, provider, model, input_tokens, output_tokens, stop_reason"
                     " FROM messages WHERE role = 'assistant' ORDER BY rowid DESC LIMIT 1")[0]


def test_openai_usage_chunk_and_a_cut_off_reply(user, server):
    user.write_config(f'provider = "openai"\nmax_tokens = 100\n'
                      f'[providers.openai]\nbase_url = "{server.url}/v1"\napi_key = "{KEY}"\n')
    server.queue(Reply(chunks=[OPENAI_2025_LENGTH]), Reply(chunks=[OPENAI_2024_STOP]))
    result = user.run("-m", "gpt-5-nano", "tell me a story")
    assert result.returncode == 0 and text(result) == "Once upon a\n"
    assert server.received[-1].body["stream_options"] == {"include_usage": True}
    assert reply_record(user) == ("Once upon a", "openai", "gpt-5-nano", 12, 100, "length")
    assert err(result) == ("synapse: warning: the reply was cut off at max_tokens (100); "
                           "raise max_tokens in the config\n")
    result = user.run("-C", "-m", "gpt-4o", "weather?")
    assert result.returncode == 0 and err(result) == ""
    assert reply_record(user) == ("Sunny", "openai", "gpt-4o", 14, 30, "stop")


def test_deepseek_usage_keeps_prompt_tokens_and_drops_the_thinking(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[DEEPSEEK_REASONER[i:i + 97] for i in range(0, len(DEEPSEEK_REASONER), 97)]))
    result = user.run("-m", "deepseek-reasoner", "Hello!")
    assert result.returncode == 0 and text(result) == "Hello!\n"
    assert "exclamation" not in text(result) + err(result)
    assert reply_record(user) == ("Hello!", "deepseek", "deepseek-reasoner", 6, 169, "stop")


def test_anthropic_usage_counts_cache_tokens_as_input(user, server):
    user.use_server(server, provider="anthropic")
    server.queue(Reply(chunks=[ANTHROPIC_2025]), Reply(chunks=[anthropic_stream("Hi", " there")]))
    assert text(user.run("hi")) == "Hey\n"
    assert reply_record(user) == ("Hey", "anthropic", "claude-sonnet-4-5", 4 + 15463 + 5432, 3,
                                  "end_turn")
    assert "stream_options" not in server.received[-1].body
    assert text(user.run("-C", "again")) == "Hi there\n"
    assert reply_record(user)[3:] == (None, 3, "end_turn")  # message_start reported no usage


@pytest.mark.parametrize("provider, body, record", [
    ("deepseek", OPENAI_BODY_2025, ("Hi there! How can I help you today?", 8, 377, "stop")),
    ("anthropic", ANTHROPIC_BODY, ("Hello! Welcome to our conversation.", 10, 35, "end_turn")),
])
def test_usage_of_whole_replies(user, server, provider, body, record):
    user.use_server(server, provider=provider)
    server.queue(Reply(content_type="application/json", chunks=[body]))
    assert user.run("--no-stream", "hi").returncode == 0
    content, _, _, *counts = reply_record(user)
    assert (content, *counts) == record
    assert "stream_options" not in server.received[-1].body  # only streamed requests ask


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": None, "completion_tokens": None}, {}, {"prompt_tokens": "many"},
    {"prompt_tokens": -1, "completion_tokens": True}, None,
])
def test_odd_usage_chunks_leave_the_counts_null(user, server, usage):
    user.use_server(server)
    body = sse(openai_chunk("fine"), {"choices": [], "usage": usage}) + b"data: [DONE]\n\n"
    server.queue(Reply(chunks=[body]))
    assert user.run("hi").returncode == 0
    assert reply_record(user)[3:5] == (None, None)


def test_a_stream_that_ends_before_its_usage_chunk(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[sse(openai_chunk("all here"), {"choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"data: [DONE]\n\n"]))
    assert user.run("hi").returncode == 0
    assert reply_record(user) == ("all here", "deepseek", "deepseek-chat", None, None, "stop")


def test_a_server_that_refuses_stream_options(user, server):
    azure = {"error": {"code": None, "message": "Unrecognized request argument supplied: stream_options",
                       "param": None, "type": "invalid_request_error"}}
    user.use_server(server, provider="openai")
    user.write_config(f'provider = "openai"\n[providers.openai]\nbase_url = "{server.url}"\n'
                      f'api_key = "{KEY}"\n')
    server.queue(json_error(400, azure))
    result = user.run("hi")
    assert_one_error_line(result, 1, "stream_options", "set stream_usage = false",
                          "[providers.openai]")
    user.write_config(f'provider = "openai"\n[providers.openai]\nbase_url = "{server.url}"\n'
                      f'api_key = "{KEY}"\nstream_usage = false\n')
    server.queue(hello())
    assert user.run("hi").returncode == 0
    assert "stream_options" not in server.received[-1].body


def test_stream_usage_defaults_off_for_other_compatible_servers(user, server):
    user.write_config(f'provider = "groq"\n[providers.groq]\nbase_url = "{server.url}"\nmodel = "m"\n'
                      f'[providers.vllm]\nbase_url = "{server.url}"\nmodel = "m"\nstream_usage = true\n')
    server.queue(hello(), hello())
    user.ok("hi")
    assert "stream_options" not in server.received[-1].body
    user.ok("-p", "vllm", "hi")
    assert server.received[-1].body["stream_options"] == {"include_usage": True}
    user.write_config('[providers.deepseek]\nstream_usage = "yes"\n')
    assert_one_error_line(user.run("sessions", "list"), 2, "providers.deepseek.stream_usage")


def test_partial_replies_record_why_they_ended(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("Part", done=False)], drop=True))
    assert user.run("hi").returncode == 1
    assert reply_record(user) == ("Part", "deepseek", "deepseek-chat", None, None, "error")
    assert user.rows("SELECT provider, model, stop_reason FROM messages WHERE role = 'user'") == [
        (None, None, None)]


@pytest.mark.parametrize("reason", ["", 7, ["end_turn"]])
def test_a_stop_reason_that_is_not_a_name_is_not_stored(user, server, reason):
    user.use_server(server, provider="anthropic")
    server.queue(Reply(chunks=[
        anthropic_event("message_start", message={"usage": {"input_tokens": 3}})
        + anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        + anthropic_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"})
        + anthropic_event("message_delta", delta={"stop_reason": reason}, usage={"output_tokens": 2})
        + anthropic_event("message_stop")]))
    user.ok("hi")
    assert user.rows("SELECT content, stop_reason FROM messages WHERE role = 'assistant'") == [("Hi", None)]
    assert "Hi" in text(user.run("sessions", "show", user.session_ids()[0]))


def test_a_cut_off_reply_without_text_is_an_error_then_the_warning(user, server):
    user.use_server(server, provider="anthropic", extra="max_tokens = 16\n")
    body = (anthropic_event("message_start", message={"usage": {"input_tokens": 9}})
            + anthropic_event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""})
            + anthropic_event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hmm"})
            + anthropic_event("message_delta", delta={"stop_reason": "max_tokens"}, usage={"output_tokens": 16})
            + anthropic_event("message_stop"))
    server.queue(Reply(chunks=[body]))
    result = user.run("hi")
    assert_one_error_line(result, 1, "anthropic sent a reply without any text (stop reason: max_tokens)")
    assert err(result).splitlines()[1] == ("synapse: warning: the reply was cut off at max_tokens "
                                           "(16); raise max_tokens in the config")
    assert user.messages() == [("user", "hi")]


def test_show_and_exports_say_who_answered_and_what_it_cost(user, server, tmp_path):
    user.use_server(server, provider="anthropic")
    server.queue(Reply(chunks=[ANTHROPIC_2025]))
    user.ok("--name", "n", "hi")
    user.write_config(f'provider = "anthropic"\nbase_url = "{server.url}"\napi_key = "{KEY}"\n'
                      f'[providers.deepseek]\nbase_url = "{server.url}"\napi_key = "{KEY}"\n')
    server.queue(Reply(chunks=[DEEPSEEK_REASONER]))
    user.ok("-C", "-p", "deepseek", "-m", "deepseek-reasoner", "and you?")
    (sid,) = user.session_ids()
    shown = text(user.run("sessions", "show", sid))
    assert f"\nTokens:   {4 + 15463 + 5432 + 6} in, {3 + 169} out\n" in shown
    data = json.loads(text(user.run("sessions", "show", sid, "--json")))
    assert [(m["provider"], m["model"], m["input_tokens"], m["output_tokens"], m["stop_reason"])
            for m in data["messages"]] == [
        (None, None, None, None, None), ("anthropic", "claude-sonnet-4-5", 20899, 3, "end_turn"),
        (None, None, None, None, None), ("deepseek", "deepseek-reasoner", 6, 169, "stop")]
    assert json.loads(text(user.run("sessions", "export", sid, "--format", "json"))) == data
    markdown = text(user.run("sessions", "export", sid))
    # The session now runs deepseek-reasoner: the earlier reply names its model.
    assert "## Assistant\n\n*claude-sonnet-4-5*\n\nHey\n" in markdown
    assert "## Assistant\n\nHello!\n" in markdown


def priced_history(user: User) -> Dict[str, str]:
    """Replies of three models over three days, one without counts, in a
    store whose clock is fixed: what `usage` has to sum."""
    store = synapse.SqliteStore(str(user.db_path))
    ids = {}
    day = datetime(2026, 11, 20, 23, 30, tzinfo=timezone.utc)
    for name, provider, model, replies in (
            ("alpha", "deepseek", "deepseek-chat", [(1000, 200, 0), (3000, 100, 1), (None, None, 1)]),
            ("beta", "openai", "gpt-4o", [(400, 60, 2)]),
            ("gamma", "ollama", "llama3.2", [(100, 10, 0), (100, 20, 0)])):
        session = make_session(store, provider=provider, model=model, name=name)
        ids[name] = str(session.id)
        for tokens_in, tokens_out, days in replies:
            when = day + timedelta(days=days)
            store.add_message(synapse.StoredMessage(uuid.uuid4(), session.id, synapse.Role.USER, "q", when))
            store.add_message(synapse.StoredMessage(uuid.uuid4(), session.id, synapse.Role.ASSISTANT, "a",
                                                    when, provider, model, tokens_in, tokens_out, "stop"))
    store.close()
    user.write_config('[prices."deepseek-chat"]\ninput = 0.27\noutput = 1.10\n'
                      '[prices."gpt-4o"]\ninput = 2.5\noutput = 10\n')
    return ids


def usage_table(result: subprocess.CompletedProcess) -> List[List[str]]:
    assert result.returncode == 0, err(result)
    return [line.split() for line in text(result).splitlines()]


def test_usage_by_model_with_prices(user):
    priced_history(user)
    rows = usage_table(user.run("usage"))
    assert rows == [
        ["MODEL", "REPLIES", "UNCOUNTED", "INPUT", "OUTPUT", "COST"],
        ["gpt-4o", "1", "0", "400", "60", "0.0016"],       # 400 * 2.5 / 1e6 + 60 * 10 / 1e6
        ["deepseek-chat", "3", "1", "4000", "300", "0.0014"],  # 4000 * .27 + 300 * 1.1, / 1e6
        ["llama3.2", "2", "0", "200", "30", "-"],
        ["TOTAL", "6", "1", "4600", "390", "0.0030+"]]
    data = json.loads(text(user.run("usage", "--json")))
    assert data[1] == {"group": "deepseek-chat", "replies": 3, "uncounted": 1, "input_tokens": 4000,
                       "output_tokens": 300, "cost": pytest.approx(0.00141)}
    assert data[2]["cost"] is None and len(data) == 3  # no total in JSON


def test_usage_groups_filters_and_empty_ranges(user):
    ids = priced_history(user)
    rows = usage_table(user.run("usage", "--by", "provider"))
    assert [r[0] for r in rows[1:]] == ["openai", "deepseek", "ollama", "TOTAL"]
    rows = usage_table(user.run("usage", "--by", "session"))
    assert rows[0] == ["SESSION", "NAME", "REPLIES", "UNCOUNTED", "INPUT", "OUTPUT", "COST"]
    assert rows[1][:2] == [ids["beta"], "beta"]
    assert json.loads(text(user.run("usage", "--by", "session", "--json")))[0]["group"] == ids["beta"]
    # Only priced models: no "+"; only unpriced: "-"; no replies without counts: no column.
    rows = usage_table(user.run("usage", "--model", "gpt-4o"))
    assert rows[0] == ["MODEL", "REPLIES", "INPUT", "OUTPUT", "COST"] and rows[-1][-1] == "0.0016"
    assert usage_table(user.run("usage", "--provider", "ollama"))[-1] == ["TOTAL", "2", "200", "30", "-"]
    rows = usage_table(user.run("usage", "--since", "2026-11-22T12:00Z", "--until", "2026-11-23T00:00Z"))
    assert rows[1][:2] == ["gpt-4o", "1"] and len(rows) == 3
    assert text(user.run("usage", "--since", "2027-01-01")) == "No replies found.\n"
    assert json.loads(text(user.run("usage", "--since", "2027-01-01", "--json"))) == []


@pytest.mark.parametrize("zone, days", [
    ("UTC", ["2026-11-22", "2026-11-21", "2026-11-20"]),
    ("Asia/Tokyo", ["2026-11-23", "2026-11-22", "2026-11-21"]),  # 23:30 UTC is the next morning
])
def test_usage_by_local_day_and_month(user, zone, days):
    priced_history(user)
    rows = usage_table(user.run("usage", "--by", "day", env={"TZ": zone}))
    assert [r[0] for r in rows[1:-1]] == days  # newest first
    assert [r[1] for r in rows[1:-1]] == ["1", "2", "3"]
    rows = usage_table(user.run("usage", "--by", "month", env={"TZ": zone}))
    assert [r[0] for r in rows[1:]] == ["2026-11", "TOTAL"]


def test_usage_in_a_subprocess_with_a_fixed_zone(user):
    priced_history(user)
    result = user.spawn("usage", "--by", "day", "--json", env={"TZ": "America/Los_Angeles"})
    assert [g["group"] for g in json.loads(text(result))] == ["2026-11-22", "2026-11-21", "2026-11-20"]


@pytest.mark.parametrize("when", ["yesterday", "7x", "-3d", "2026-13-01", "0d", "3 d", ""])
def test_a_bad_when_is_a_usage_error_naming_the_forms(user, when):
    for args in (["usage"], ["sessions", "list"], ["sessions", "search", "x"]):
        result = user.run(*args, "--since", when)
        assert_one_error_line(result, 2, "--since", "2026-12-01", "7d", "ISO 8601")


def test_when_forms():
    now = synapse.utc_now()
    assert abs((now - synapse.parse_when("90m")) - timedelta(minutes=90)) < timedelta(seconds=5)
    assert abs((now - synapse.parse_when("2w")) - timedelta(weeks=2)) < timedelta(seconds=5)
    assert synapse.parse_when("2026-12-01T09:30Z") == datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc)
    assert synapse.parse_when("2026-12-01T09:30:15+02:00") == datetime(2026, 12, 1, 7, 30, 15,
                                                                       tzinfo=timezone.utc)
    local_midnight = datetime(2026, 12, 1).astimezone()
    assert synapse.parse_when("2026-12-01") == local_midnight.astimezone(timezone.utc)
    # Forms that Python 3.9's fromisoformat refuses, and ChatGPT-style exports use:
    assert synapse.parse_when("2026-12-01T09:30:15+0530") == datetime(2026, 12, 1, 4, 0, 15,
                                                                      tzinfo=timezone.utc)
    assert synapse.parse_when("2026-12-01T09:30:15.5Z") == datetime(2026, 12, 1, 9, 30, 15, 500000,
                                                                    tzinfo=timezone.utc)
    assert synapse.iso_datetime("2026-12-01 09:30:15.1234567") == datetime(
        2026, 12, 1, 9, 30, 15, 123456, tzinfo=timezone.utc)


def test_bad_usage_options_and_prices(user):
    assert_one_error_line(user.run("usage", "--by", "week"), 2, "--by", "invalid choice")
    for price, complaint in (("input = 'cheap'\noutput = 1", "must be an integer or a number"),
                             ("input = -1\noutput = 1", "from 0 to 1000000"),
                             ("input = nan\noutput = 1", "from 0 to 1000000"),
                             ("input = 1.7e308\noutput = 1", "from 0 to 1000000"),
                             ("output = 1", "needs input")):
        user.write_config(f'[prices."gpt-4o"]\n{price}\n')
        assert_one_error_line(user.run("usage"), 2, 'prices."gpt-4o"', complaint)


def test_list_and_search_filters(user):
    store = synapse.SqliteStore(str(user.db_path))
    old = make_session(store, provider="openai", model="gpt-4o", name="old")
    new = make_session(store, provider="deepseek", model="deepseek-chat", name="new")
    for session in (old, new):
        store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.USER, "find the owl"))
        store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.ASSISTANT, "an owl reply"))
    store.close()
    set_updated(user.db_path, old.id, NOW - timedelta(days=10))

    def listed(*args: str) -> List[str]:
        return [d["name"] for d in json.loads(text(user.run("sessions", "list", "--json", *args)))]

    def found(*args: str) -> List[str]:
        return [d["name"] for d in json.loads(text(user.run("sessions", "search", "owl", "--json", *args)))]

    assert listed() == ["new", "old"] and listed("--since", "7d") == ["new"]
    assert listed("--until", "7d") == ["old"] and listed("--provider", "openai") == ["old"]
    assert listed("--model", "deepseek-chat", "--since", "1d") == ["new"]
    assert listed("--model", "gpt-4o", "--since", "1d") == []
    assert listed("--limit", "1", "--provider", "openai") == ["old"]  # the limit applies after
    assert found() == ["new", "old"] and found("--since", "7d") == ["new"]
    assert found("--role", "assistant", "--provider", "openai") == ["old"]
    assert json.loads(text(user.run("sessions", "search", "find", "--json", "--role", "assistant"))) == []
    assert found("--role", "user", "--until", "1d", "--limit", "1") == ["old"]
    assert_one_error_line(user.run("sessions", "search", "owl", "--role", "system"), 2, "--role")
    result = user.spawn("sessions", "list", "--since", "7d")
    assert result.returncode == 0 and "new" in text(result) and "old" not in text(result)


def test_filtered_queries_use_their_indexes(tmp_path):
    store = populated_store(tmp_path)
    since = synapse.SessionFilter(since=NOW - timedelta(days=1), provider="echo")
    (plan,) = query_plans(store, store.list_sessions, 20, since)
    assert "idx_sessions_updated (updated_at>?)" in plan and no_full_scan_of_messages(plan)
    walk = query_plans(store, store.search_sessions, "needle", 3, since._replace(role="user"))
    assert "idx_sessions_updated (updated_at>?)" in walk[0] and no_full_scan_of_messages(walk[0])
    (plan,) = query_plans(store, store.usage, "model", synapse.SessionFilter(since=NOW))
    assert "idx_messages_timestamp (timestamp>?)" in plan, plan
    store.close()


MODELS_OPENAI = (b'{\n  "object": "list",\n  "data": [\n    {\n      "id": "gpt-4o-mini",\n'
                 b'      "object": "model",\n      "created": 1686935002,\n      "owned_by": "system"\n'
                 b'    },\n    {\n      "id": "gpt-4o",\n      "object": "model",\n'
                 b'      "created": 1686935002,\n      "owned_by": "system"\n    }\n  ]\n}')


def test_models_of_an_openai_compatible_server(user, server):
    user.write_config(f'provider = "openai"\n[providers.openai]\nbase_url = "{server.url}/v1"\n'
                      f'api_key = "{KEY}"\n')
    server.queue(Reply(content_type="application/json", chunks=[MODELS_OPENAI]))
    result = user.run("models")
    assert result.returncode == 0 and text(result) == "gpt-4o\ngpt-4o-mini *\n"
    request = server.received[-1]
    assert (request.method, request.path, request.headers["Authorization"]) == (
        "GET", "/v1/models", f"Bearer {KEY}")
    server.queue(Reply(content_type="application/json", chunks=[MODELS_OPENAI]))
    assert json.loads(text(user.run("models", "--json"))) == [
        {"id": "gpt-4o", "default": False}, {"id": "gpt-4o-mini", "default": True}]


def test_models_of_anthropic_page_by_page(user, server):
    user.use_server(server, provider="anthropic", extra='model = "claude-3-5-haiku-20241022"\n')
    first = {"data": [{"type": "model", "id": "claude-sonnet-4-5-20250929", "display_name": "Claude Sonnet 4.5",
                       "created_at": "2025-09-29T00:00:00Z"}],
             "has_more": True, "first_id": "claude-sonnet-4-5-20250929", "last_id": "claude-sonnet-4-5-20250929"}
    second = {"data": [{"type": "model", "id": "claude-3-5-haiku-20241022", "display_name": "Claude Haiku 3.5",
                        "created_at": "2024-10-22T00:00:00Z"}],
              "has_more": False, "first_id": "claude-3-5-haiku-20241022", "last_id": "claude-3-5-haiku-20241022"}
    server.queue(*(Reply(content_type="application/json", chunks=[json.dumps(p, separators=(",", ":")).encode()])
                   for p in (first, second)))
    result = user.run("models")
    assert text(result) == "claude-3-5-haiku-20241022 *\nclaude-sonnet-4-5-20250929\n", err(result)
    assert [r.path for r in server.received] == [
        "/v1/models?limit=1000", "/v1/models?limit=1000&after_id=claude-sonnet-4-5-20250929"]
    assert server.received[0].headers["x-api-key"] == KEY
    assert server.received[0].headers["anthropic-version"] == "2023-06-01"


def test_models_failures_and_echo(user, server, monkeypatch):
    recorded_waits(monkeypatch)
    assert text(user.run("models", "-p", "echo")) == "echo *\n"
    user.use_server(server)
    server.queue(Reply(content_type="text/html", chunks=[b"<html>a login page</html>"]))
    assert_one_error_line(user.run("models"), 1, "deepseek answered with an HTML page")
    server.queue(json_error(401, {"error": {"message": "Authentication Fails", "type": "authentication_error"}}))
    assert_one_error_line(user.run("models"), 1, "deepseek returned 401", "Authentication Fails")
    server.queue(json_error(200, {"object": "list", "data": []}),
                 json_error(200, {"object": "list", "data": None}))
    assert text(user.run("models")) == "No models listed by deepseek.\n"
    assert json.loads(text(user.run("models", "--json"))) == []
    server.queue(json_error(200, {"object": "list"}))
    assert_one_error_line(user.run("models"), 1, "without a list of models")
    for _ in range(3):
        server.queue(json_error(503, {"error": {"message": "busy"}}))
    assert_one_error_line(user.run("models"), 1, "deepseek returned 503")
    assert_one_error_line(user.run("models", "-p", "anthropic"), 2, "ANTHROPIC_API_KEY")
    result = user.spawn("models", "-p", "echo")
    assert result.returncode == 0 and text(result) == "echo *\n"


def test_a_message_named_like_a_command_follows_two_dashes(user):
    for word in ("models", "usage", "sessions"):
        assert text(user.run("-p", "echo", "--", word)) == f"{word}\n"
    assert [c for r, c in user.messages() if r == "user"] == ["models", "usage", "sessions"]


# ---------------------------------------------------------------------------
# Shaping a conversation: retry, undo, fork, no-save, files, editor, roles (SPEC §10)
# ---------------------------------------------------------------------------


def chat_session(user: User, *exchanges: str, provider: str = "echo") -> str:
    """A stored session of echo exchanges; its ID."""
    first, *rest = exchanges
    user.ok("-p", provider, first)
    sid = user.session_ids()[-1]
    for text_ in rest:
        user.ok("-s", sid, text_)
    return sid


def contents(user: User) -> List[tuple]:
    return [(r, c) for r, c in user.messages()]


def test_retry_replaces_the_reply_only_when_the_new_one_is_complete(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("first answer")]),
                 Reply(chunks=[openai_stream("second answer")]))
    user.ok("q1")
    (sid,) = user.session_ids()
    user.ok("-s", sid, "q2")
    server.queue(Reply(chunks=[openai_stream("better", " second")]))
    result = user.spawn("-s", sid[:6], "--retry")
    assert result.returncode == 0 and text(result) == "better second\n", err(result)
    # What was sent: the history up to and including the last user message.
    assert [m["content"] for m in server.received[-1].body["messages"]] == ["q1", "first answer", "q2"]
    assert contents(user) == [("user", "q1"), ("assistant", "first answer"), ("user", "q2"),
                              ("assistant", "better second")]
    # A failure mid-reply keeps the old reply, drops the partial new one, and says so.
    server.queue(Reply(chunks=[openai_stream("half", done=False)], drop=True))
    result = user.run("-C", "--retry")
    assert_one_error_line(result, 1, "the old reply was kept")
    assert contents(user)[-1] == ("assistant", "better second") and len(user.messages()) == 4
    # An error before any text too.
    server.queue(json_error(400, {"error": {"message": "nope"}}))
    assert_one_error_line(user.run("-C", "--retry"), 1, "nope")
    assert len(user.messages()) == 4


def test_retry_of_an_unanswered_message_stores_the_reply_as_any(user, server):
    user.use_server(server)
    server.queue(json_error(400, {"error": {"message": "down"}}))
    assert user.run("lonely question").returncode == 1
    server.queue(Reply(chunks=[openai_stream("a partial", done=False)], drop=True))
    assert_one_error_line(user.run("-C", "--retry"), 1, "the partial reply was kept")
    assert contents(user) == [("user", "lonely question"), ("assistant", "a partial")]
    assert user.rows("SELECT stop_reason FROM messages WHERE role = 'assistant'") == [("error",)]
    server.queue(Reply(chunks=[openai_stream("whole")]))
    assert text(user.run("-C", "--retry")) == "whole\n"
    assert contents(user) == [("user", "lonely question"), ("assistant", "whole")]


def test_retry_with_another_model_and_without_saving(user, server):
    sid = chat_session(user, "what is 2+2?")
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("4")]), Reply(chunks=[openai_stream("four")]))
    user.ok("-s", sid, "--retry", "-p", "deepseek", "-m", "deepseek-reasoner")
    assert server.received[-1].body["model"] == "deepseek-reasoner"
    assert user.rows("SELECT provider, model FROM sessions") == [("deepseek", "deepseek-reasoner")]
    assert reply_record(user)[:3] == ("4", "deepseek", "deepseek-reasoner")
    before = user.db_path.read_bytes()
    assert text(user.run("-s", sid, "--retry", "-n")) == "four\n"
    assert contents(user)[-1] == ("assistant", "4") and user.db_path.read_bytes() == before


@pytest.mark.parametrize("args, data, complaint", [
    (["-C", "--retry", "new words"], None, "no MESSAGE"),
    (["-C", "--retry"], b"piped words", "piped text"),
    (["-C", "--retry", "-f", "x.txt"], None, "-f"),
    (["-C", "--retry", "-e"], None, "-e"),
    (["--retry"], None, "give -s ID or -C"),
])
def test_retry_usage_errors(user, args, data, complaint):
    chat_session(user, "hi")
    (user.root / "x.txt").write_text("x")
    before = contents(user)
    assert_one_error_line(user.run("-p", "echo", *args, input=data), 2, "--retry", complaint)
    assert contents(user) == before


def test_retry_of_a_session_without_a_user_message(user):
    store = synapse.SqliteStore(str(user.db_path))
    session = make_session(store)
    store.add_message(synapse.StoredMessage.new(session.id, synapse.Role.SYSTEM, "rules"))
    store.close()
    assert_one_error_line(user.run("-s", str(session.id), "--retry"), 1, "nothing to retry")
    assert_one_error_line(user.run("-s", "ffff", "--retry"), 1, "not found")


def test_undo_removes_exchanges_and_lists_them(user):
    store = synapse.SqliteStore(str(user.db_path))
    session = make_session(store)
    for role, content in (("system", "kept always"), ("user", "first question"),
                          ("assistant", "first answer"), ("user", "second  question\nwith lines"),
                          ("assistant", "second answer"), ("assistant", "and more"),
                          ("user", "x" * 80)):
        store.add_message(synapse.StoredMessage.new(session.id, synapse.Role(role), content))
    store.close()
    sid = str(session.id)
    set_updated(user.db_path, sid, NOW - timedelta(days=5))
    result = user.run("sessions", "undo", sid[:8])
    assert text(result) == f"Removed 1 message from session {sid}\n[USER] {'x' * 49}\u2026\n"
    assert user.rows("SELECT updated_at > ? FROM sessions", (synapse.format_timestamp(NOW),)) == [(1,)]
    result = user.spawn("sessions", "undo", sid, "--count", "1")
    assert text(result) == (f"Removed 3 messages from session {sid}\n[USER] second question with lines\n"
                            f"[ASSISTANT] second answer\n[ASSISTANT] and more\n")
    assert text(user.run("sessions", "undo", sid, "--count", "9")).startswith("Removed 2 messages")
    assert contents(user) == [("system", "kept always")]
    result = user.run("sessions", "undo", sid)
    assert result.returncode == 0 and text(result) == f"Removed 0 messages from session {sid}\n"


@pytest.mark.parametrize("args, code", [
    (["sessions", "undo", "ID", "--count", "0"], 2), (["sessions", "undo", "ID", "--count", "-2"], 2),
    (["sessions", "fork", "ID", "--undo", "-1"], 2), (["sessions", "undo", "zz!"], 2),
    (["sessions", "fork", "zz!"], 2), (["sessions", "undo", str(uuid.UUID(int=5))], 1),
    (["sessions", "fork", str(uuid.UUID(int=5))], 1), (["sessions", "undo", "abcd"], 1),
    (["sessions", "fork", "abcd"], 1),
])
def test_undo_and_fork_refuse_bad_input(user, args, code):
    crafted_store(user, ["abcd1234-0000-4000-8000-000000000001", "abcd1234-0000-4000-8000-000000000002"])
    sid = chat_session(user, "keep me")
    args = [sid if a == "ID" else a for a in args]
    result = user.run(*args)
    assert_one_error_line(result, code)
    if args[-1] == "abcd":
        assert "ambiguous" in err(result)
    assert len(user.session_ids()) == 3 and len(user.messages()) == 2


def test_fork_copies_all_but_the_last_exchanges(user):
    sid = chat_session(user, "one", "two", "three")
    user.ok("sessions", "rename", sid, "Planning")
    source_before = user.rows("SELECT * FROM sessions WHERE id = ?", (sid,))
    set_updated(user.db_path, sid, NOW - timedelta(days=3))
    source_before = user.rows("SELECT * FROM sessions WHERE id = ?", (sid,))
    result = user.spawn("sessions", "fork", sid[:8], "--undo", "1")
    fork_id = text(result).strip()
    assert result.returncode == 0 and text(result) == f"{fork_id}\n" and uuid.UUID(fork_id)
    fork = json.loads(text(user.run("sessions", "show", fork_id, "--json")))
    source = json.loads(text(user.run("sessions", "show", sid, "--json")))
    assert fork["forked_from"] == sid and fork["name"] == "Planning (fork)"
    assert (fork["provider"], fork["model"], fork["system_prompt"]) == (
        source["provider"], source["model"], source["system_prompt"])
    assert [(m["role"], m["content"]) for m in fork["messages"]] == [
        ("user", "one"), ("assistant", "one"), ("user", "two"), ("assistant", "two")]
    for copy, original in zip(fork["messages"], source["messages"]):
        assert copy["id"] != original["id"]
        assert {k: v for k, v in copy.items() if k != "id"} == {k: v for k, v in original.items() if k != "id"}
    assert fork["created_at"] == fork["updated_at"] > synapse.format_timestamp(NOW)
    assert user.rows("SELECT * FROM sessions WHERE id = ?", (sid,)) == source_before  # untouched
    assert f"Forked from: {sid}" in text(user.run("sessions", "show", fork_id))
    # Continue in the fork, as the README shows.
    assert text(user.run("-s", fork_id, "try this instead")) == "try this instead\n"
    assert len(json.loads(text(user.run("sessions", "show", sid, "--json")))["messages"]) == 6


def test_fork_names(user):
    unnamed = chat_session(user, "a   very long first question " * 3)
    named = text(user.run("sessions", "fork", unnamed, "--name", "mine")).strip()
    preview = text(user.run("sessions", "fork", unnamed)).strip()
    store = synapse.SqliteStore(str(user.db_path))
    empty = make_session(store)
    store.close()
    bare = text(user.run("sessions", "fork", str(empty.id))).strip()
    names = dict(user.rows("SELECT id, name FROM sessions"))
    assert names[named] == "mine"
    assert names[preview] == synapse.shorten("a   very long first question " * 3, 50) + " (fork)"
    assert names[bare] == f"fork of {str(empty.id)[:8]}"


def test_the_repl_can_retry_undo_fork_and_name(user):
    script = "\n".join(["/name Planned", "one", "two", "/retry", "/undo", "/undo 5", "/undo",
                        "/retry", "three", "/fork", "four", "/bogus words", "/session", ""])
    result = user.run("-r", "-p", "echo", input=script.encode())
    assert result.returncode == 0, err(result)
    original, fork = user.session_ids()
    assert user.rows("SELECT name, forked_from FROM sessions ORDER BY rowid") == [
        ("Planned", None), ("Planned (fork)", original)]
    assert [c for s_, c in user.rows("SELECT session_id, content FROM messages WHERE role = 'user'"
                                     " ORDER BY rowid") if s_ == original] == ["three"]
    assert [c for s_, c in user.rows("SELECT session_id, content FROM messages WHERE role = 'user'"
                                     " ORDER BY rowid") if s_ == fork] == ["three", "four"]
    stderr = err(result)
    assert "Removed 2 messages" in stderr and "Removed 2 messages" in stderr.split("Removed 2 messages", 1)[1]
    assert stderr.count("synapse: error: nothing to undo") == 1
    assert "synapse: error: nothing to retry" in stderr
    assert f"session: {fork} (a fork" in stderr and "unknown command /bogus" in stderr
    assert "/retry" in stderr.split("unknown command /bogus", 1)[1]  # the list of commands
    assert text(result).endswith(f"{fork}\n") and "bogus" not in text(result)
    assert stderr.rstrip().endswith(f"session: {fork}")


def test_no_save_writes_nothing(user, server):
    result = user.spawn("-n", "-p", "echo", "ask and forget")
    assert result.returncode == 0 and text(result) == "ask and forget\n"
    assert not user.xdg.exists()  # not even the folder
    sid = chat_session(user, "remember this")
    user.use_server(server)
    folder = sorted(os.listdir(user.config_dir))
    before = user.db_path.read_bytes()
    server.queue(Reply(chunks=[openai_stream("sure")]))
    result = user.run("-n", "-s", sid, "-p", "deepseek", "and this?", tty="err")
    assert result.returncode == 0 and "session:" not in err(result)
    assert [m["content"] for m in server.received[-1].body["messages"]] == [
        "remember this", "remember this", "and this?"]
    assert user.db_path.read_bytes() == before and sorted(os.listdir(user.config_dir)) == folder
    result = user.run("-n", "-r", "-s", sid, "-p", "echo", input=b"one\n/undo\n/fork\ntwo\n/name x\n")
    assert text(result) == "one\ntwo\n" and "session:" not in err(result).split("(a fork")[1]
    assert user.db_path.read_bytes() == before and sorted(os.listdir(user.config_dir)) == folder
    assert_one_error_line(user.run("-n", "-C", "-p", "echo", "x", env={
        "SYNAPSE_DATABASE_URL": str(user.root / "none.db")}), 1, "no session to continue")
    assert not (user.root / "none.db").exists()


def test_files_are_fenced_into_the_message(user):
    (user.root / "app.py").write_text("print('hi')")
    (user.root / "notes.md").write_text("intro\n```python\ncode\n```\n````\nmore\n")
    result = user.run("-p", "echo", "-f", "app.py", "-f", "notes.md", "explain", input=b"piped\n")
    expected = ("app.py\n```\nprint('hi')\n```\n\n"
                "notes.md\n`````\nintro\n```python\ncode\n```\n````\nmore\n`````\n\n"
                "piped\n\nexplain")
    assert result.returncode == 0 and contents(user)[0] == ("user", expected)
    # -f alone is a message, even with a terminal on stdin.
    result = user.run("-p", "echo", "-f", "app.py", tty="in")
    assert contents(user)[2] == ("user", "app.py\n```\nprint('hi')\n```")
    result = user.spawn("-p", "echo", "-f", str(user.root / "app.py"), "and?")
    assert text(result).endswith("```\n\nand?\n")


@pytest.mark.parametrize("make, complaint", [
    (lambda p: p.mkdir(), "is a directory"), (lambda p: None, "cannot be read"),
    (lambda p: p.write_bytes(b"text\x00more"), "looks binary"),
    (lambda p: p.write_bytes(b"caf\xe9"), "looks binary"),
])
def test_files_that_cannot_be_attached(user, make, complaint):
    target = user.root / "thing"
    make(target)
    assert_one_error_line(user.run("-p", "echo", "-f", "thing", "hi"), 2, "thing", complaint)
    assert not user.db_path.exists()


def test_a_ten_megabyte_file(user):
    (user.root / "big.txt").write_text("line of text\n" * 800_000)
    assert user.run("-p", "echo", "-f", "big.txt", "summarise").returncode == 0
    assert len(contents(user)[0][1]) > 10_000_000


FAKE_EDITOR = """
import json, os, stat, sys, time
path = sys.argv[-1]
with open(os.environ["EDITOR_LOG"], "w") as log:
    json.dump({"argv": sys.argv[1:], "mode": stat.S_IMODE(os.stat(path).st_mode), "path": path,
               "before": open(path).read(), "terminal": os.isatty(0) and os.isatty(1)}, log)
action = os.environ.get("EDITOR_ACTION", "write")
if action == "fail":
    sys.exit(3)
if action == "sleep":
    time.sleep(30)
with open(path, "w") as draft:
    draft.write(os.environ.get("EDITOR_TEXT", "written in the editor\\n\\n"))
"""


def on_a_terminal(user: User, *args: str, env: Optional[dict] = None, stdin: Optional[bytes] = None,
                  interrupt_after: Optional[float] = None) -> subprocess.CompletedProcess:
    """``synapse ARGS`` with a pseudo-terminal of its own as controlling terminal
    (its /dev/tty); stdin is that terminal unless bytes are piped."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def take_the_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    process = subprocess.Popen([*COMMAND, *args], env={**user.env, **(env or {})},
                               stdin=slave if stdin is None else subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=user.root,
                               preexec_fn=take_the_terminal, pass_fds=(slave,))
    os.close(slave)
    drain = threading.Thread(target=lambda: [None for _ in iter(lambda: _read_or_end(master), b"")],
                             daemon=True)
    drain.start()
    try:
        if interrupt_after is not None:
            time.sleep(interrupt_after)
            process.send_signal(signal.SIGINT)
        out, error = process.communicate(input=stdin, timeout=60)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(args, process.returncode, out, error)




@pytest.fixture
def editor(user, tmp_path):
    script = tmp_path / "fake editor.py"
    script.write_text(FAKE_EDITOR)
    log = tmp_path / "editor.json"
    user.env.update(EDITOR=f"'{sys.executable}' '{script}' --wait", EDITOR_LOG=str(log))
    user.env.pop("VISUAL", None)
    return log


def test_the_editor_writes_the_message(user, editor):
    (user.root / "a.txt").write_text("file text")
    result = on_a_terminal(user, "-p", "echo", "-e", "-f", "a.txt", "draft", stdin=b"piped")
    assert result.returncode == 0, err(result)
    seen = json.loads(editor.read_text())
    assert seen["argv"][0] == "--wait" and seen["mode"] == 0o600 and seen["path"].endswith(".md")
    assert seen["before"] == "a.txt\n```\nfile text\n```\n\npiped\n\ndraft"
    assert seen["terminal"]  # stdin was piped: the editor got /dev/tty
    assert not os.path.exists(seen["path"])
    assert contents(user) == [("user", "written in the editor"), ("assistant", "written in the editor")]
    # VISUAL wins over EDITOR.
    result = on_a_terminal(user, "-p", "echo", "-e", env={"VISUAL": "/nonexistent/editor"})
    assert_one_error_line(result, 2, "/nonexistent/editor", "VISUAL or EDITOR")


@pytest.mark.parametrize("action, code, complaint", [
    ("fail", 1, "the editor exited with status 3; nothing was sent"),
    ("empty", 2, "the message is empty"),
])
def test_an_editor_that_fails_sends_nothing(user, editor, action, code, complaint):
    result = on_a_terminal(user, "-p", "echo", "-e", env={"EDITOR_ACTION": action, "EDITOR_TEXT": " \n"})
    assert_one_error_line(result, code, complaint)
    assert not os.path.exists(json.loads(editor.read_text())["path"])
    assert not user.db_path.exists()


@pytest.mark.slow
def test_ctrl_c_in_the_editor(user, editor):
    result = on_a_terminal(user, "-p", "echo", "-e", env={"EDITOR_ACTION": "sleep"}, interrupt_after=0.6)
    assert result.returncode == 130 and b"Traceback" not in result.stderr
    assert not os.path.exists(json.loads(editor.read_text())["path"])
    assert not user.db_path.exists()


def test_edit_without_a_terminal_and_missing_editors(user, editor):
    result = subprocess.run([*COMMAND, "-p", "echo", "-e", "hi"], env=user.env,
                            capture_output=True, stdin=subprocess.DEVNULL, start_new_session=True)
    assert_one_error_line(result, 2, "--edit needs a terminal")
    result = on_a_terminal(user, "-p", "echo", "-e", env={"EDITOR": "no-such-editor-here"})
    assert_one_error_line(result, 2, "no-such-editor-here")
    assert not user.db_path.exists()


def test_roles_shape_a_new_session(user, server):
    (user.config_dir).mkdir(parents=True)
    (user.config_dir / "review.md").write_text("  You review code. Be blunt.\n\n")
    user.write_config(f"""
provider = "deepseek"
base_url = "{server.url}"
api_key = "{KEY}"
temperature = 0.7
[providers.anthropic]
base_url = "{server.url}"
api_key = "{KEY}"
[roles.reviewer]
system_prompt_file = "review.md"
provider = "anthropic"
model = "claude-opus-4"
temperature = 0.1
[roles.plain]
system_prompt = "Be plain."
""")
    server.queue(Reply(chunks=[anthropic_stream("LGTM")]))
    result = user.spawn("--role", "reviewer", "look at this")
    assert text(result) == "LGTM\n", err(result)
    body = server.received[-1].body
    assert (body["model"], body["system"], body["temperature"]) == (
        "claude-opus-4", "You review code. Be blunt.", 0.1)
    # --system, -p and -m win; -p without -m takes that provider's model.
    server.queue(hello(), hello())
    user.ok("--role", "reviewer", "--system", "Mine.", "-p", "deepseek", "x")
    body = server.received[-1].body
    assert (body["model"], body["messages"][0]["content"], body["temperature"]) == (
        "deepseek-chat", "Mine.", 0.1)
    user.ok("--role", "plain", "y")
    body = server.received[-1].body
    assert body["messages"][0]["content"] == "Be plain." and body["temperature"] == 0.7
    assert_one_error_line(user.run("--role", "critic", "z"), 2, "unknown role 'critic'", "plain, reviewer")
    assert_one_error_line(user.run("--role", "plain", "-C", "z"), 2, "--role", "-s or -C")
    assert len(user.session_ids()) == 3


@pytest.mark.slow
def test_two_processes_retrying_one_session_at_once(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[openai_stream("original")]))
    user.ok("question")
    (sid,) = user.session_ids()
    server.queue(slow_stream(pieces=10, delay=0.05), slow_stream(pieces=10, delay=0.05))
    first, second = user.popen("-s", sid, "--retry"), user.popen("-s", sid, "--retry")
    for process in (first, second):
        assert process.wait(timeout=60) == 0, process.stderr.read()
    assert len(server.received) == 3
    messages = contents(user)
    assert messages[0] == ("user", "question") and len(messages) == 2  # one reply, not two
    assert messages[1][1].startswith("w0 ") and messages[1][1].endswith("w9 ")
    integrity(user.db_path)


@pytest.mark.slow
def test_two_processes_undoing_one_session_at_once(user, tmp_path):
    sid = chat_session(user, *[f"exchange {i}" for i in range(6)])
    processes = [user.popen("sessions", "undo", sid, "--count", "2") for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0].decode() for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert sorted(o.splitlines()[0] for o in outputs) == [f"Removed 4 messages from session {sid}"] * 2
    assert [c for r, c in contents(user) if r == "user"] == ["exchange 0", "exchange 1"]
    integrity(user.db_path)


# ---------------------------------------------------------------------------
# What a second adversarial trial found (each case once broke synapse)
# ---------------------------------------------------------------------------


def test_token_counts_beyond_sqlite_are_null_and_the_reply_is_kept(user, server):
    user.use_server(server)
    server.queue(Reply(chunks=[sse(openai_chunk("kept"), {"choices": [], "usage": {
        "prompt_tokens": 10 ** 23, "completion_tokens": 2 ** 63}}) + b"data: [DONE]\n\n"]))
    assert user.run("hi").returncode == 0
    assert reply_record(user)[0] == "kept" and reply_record(user)[3:5] == (None, None)


@pytest.mark.parametrize("where", ["event", "body", "error", "models"])
def test_json_nested_too_deep_is_a_provider_error(user, server, where):
    deep = b"[" * 100_000 + b"]" * 100_000
    user.use_server(server)
    reply = {"event": Reply(chunks=[b"data: " + deep + b"\n\n"]),
             "body": Reply(content_type="application/json", chunks=[deep]),
             "error": Reply(status=400, content_type="application/json", chunks=[deep]),
             "models": Reply(content_type="application/json", chunks=[deep])}[where]
    server.queue(reply)
    result = user.run("models" if where == "models" else "hi")
    assert_one_error_line(result, 1, "deepseek")
    assert "unexpected" not in err(result)


def test_odd_replies_are_never_called_unexpected(user, server):
    user.use_server(server)
    for body in (b"data: 42\n\n", b'data: [1, 2]\n\n', b'data: "text"\n\n'):
        server.queue(Reply(chunks=[body]))
        result = user.run("hi")
        assert_one_error_line(result, 1, "not a JSON object")
        assert "unexpected" not in err(result)
    server.queue(Reply(chunks=[sse({"error": None, **openai_chunk("fine")}) + b"data: [DONE]\n\n"]))
    assert text(user.run("hi")) == "fine\n"  # "error": null beside a delta is no error
    server.queue(json_error(400, {"error": {"type": ["a"], "message": {"nested": [1, 2]}}}))
    assert_one_error_line(user.run("hi"), 1, 'returned 400: {"nested": [1, 2]}')


def test_a_retry_after_that_is_not_a_number_falls_back_to_backoff(user, server, monkeypatch):
    waits = recorded_waits(monkeypatch)
    user.use_server(server)
    server.queue(json_error(429, {"error": {"message": "slow down"}}, **{"retry-after-ms": "NaN"}),
                 json_error(429, {"error": {"message": "slow down"}}, **{"Retry-After": "nan"}), hello())
    assert user.run("hi").returncode == 0 and waits == [1.0, 2.0]


@pytest.mark.parametrize("config, key", [
    ('provider = "ollama"\nbase_url = "http://[::1"\n', "base_url of ollama"),
    ('provider = "echo"\nsystem_prompt_file = "a\\u0000b"\n', "system_prompt_file"),
    ('provider = "echo"\n[session]\ndatabase_url = "x\\u0000.db"\n', "NUL"),
    ('provider = "echo"\n[session]\ndatabase_url = ":memory:"\n', "names no file"),
])
def test_config_values_that_once_crashed(user, config, key):
    user.write_config(config)
    result = user.run("hi")
    assert_one_error_line(result, 2, key)
    assert "unexpected" not in err(result) and not user.db_path.exists()


def test_a_config_with_a_byte_order_mark_is_read(user):
    user.config_dir.mkdir(parents=True)
    (user.config_dir / "config.toml").write_bytes(b'\xef\xbb\xbfprovider = "echo"\n')
    assert text(user.run("hi")) == "hi\n"


@pytest.mark.parametrize("args", [["sessions", "list", "--since", "999999d"],
                                  ["usage", "--since", "999999999w"],
                                  ["sessions", "list", "--limit", "1_0"],
                                  ["sessions", "list", "--limit", "\u0663"],
                                  ["-s", "", "-p", "echo", "hi"], ["-p", "", "hi"],
                                  ["-p", "echo", "-m", " ", "hi"]])
def test_arguments_that_once_slipped_through(user, args):
    result = user.run(*args)
    assert_one_error_line(result, 2)
    assert "unexpected" not in err(result) and not user.db_path.exists()


def test_undecodable_bytes_in_any_text_argument(user):
    user.ok("-p", "echo", "seed")
    for argv in ([b"-p", b"echo", b"-m", b"\xff", b"hi"], [b"sessions", b"list", b"--model", b"\xfe"],
                 [b"usage", b"--provider", b"\xff"], [b"sessions", b"search", b"--provider", b"\xff", b"x"],
                 [b"-p", b"echo", b"--name", b"n\xff", b"--system", b"s\xfe", b"hi \xff"],
                 [b"sessions", b"search", b"\xff"]):
        result = subprocess.run([os.fsencode(a) for a in COMMAND] + argv, env=user.env,
                                capture_output=True, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, (argv, err(result))
    assert user.rows("SELECT model FROM sessions ORDER BY rowid")[-2] == ("\ufffd",)
    assert user.rows("SELECT name, system_prompt FROM sessions ORDER BY rowid")[-1] == ("n\ufffd", "s\ufffd")
    assert user.messages()[-2] == ("user", "hi \ufffd")
    # A path keeps its bytes: the file is the one the user named.
    backup = os.fsencode(user.root) + b"/copy-\xff.db"
    result = subprocess.run([os.fsencode(a) for a in COMMAND] + [b"sessions", b"backup", backup],
                            env=user.env, capture_output=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, err(result)
    assert os.path.isfile(backup) and not os.path.exists(os.fsencode(user.root) + b"/copy-\xef\xbf\xbd.db")


def test_foreign_and_odd_database_files_are_refused_untouched(user, tmp_path):
    foreign = tmp_path / "other.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    result = user.run("-p", "echo", "hi", env={"SYNAPSE_DATABASE_URL": str(foreign)})
    assert_one_error_line(result, 1, "another program's SQLite database", "notes")
    assert foreign.read_bytes() == before
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        result = user.spawn("sessions", "list", env={"SYNAPSE_DATABASE_URL": str(path)}, timeout=20)
        assert_one_error_line(result, 1, "not a regular file")
    assert user.run("-p", "echo", "x", env={"SYNAPSE_DATABASE_URL": "  "}).returncode == 0
    assert not (user.root / "  ").exists() and user.db_path.exists()  # blank: the default place


def test_text_where_another_program_stored_a_blob(user):
    sid = chat_session(user, "fine")
    conn = sqlite3.connect(user.db_path)
    conn.execute("UPDATE messages SET content = ? WHERE role = 'user'", (b"\x00binary",))
    conn.commit()
    conn.close()
    for args in (["sessions", "show", sid], ["sessions", "list"], ["sessions", "export", sid]):
        assert_one_error_line(user.run(*args), 1, "bytes where text belongs")


def test_token_counts_where_another_program_stored_text(user):
    sid = chat_session(user, "fine")
    conn = sqlite3.connect(user.db_path)
    conn.execute("UPDATE messages SET input_tokens = 'many' WHERE role = 'assistant'")
    conn.commit()
    conn.close()
    for args in (["sessions", "show", sid], ["sessions", "export", sid, "--format", "json"]):
        assert_one_error_line(user.run(*args), 1, "token counts that are not numbers")


def test_a_failing_stderr_never_changes_the_exit_status(user):
    user.ok("-p", "echo", "seed")
    for args, code in ((["-p", "echo", "--system", "ignored", "-C", "hi"], 0), (["-p", "nosuch", "hi"], 2)):
        with open("/dev/full", "w") as full:
            result = subprocess.run([*COMMAND, *args], env=user.env, stdout=subprocess.PIPE,
                                    stderr=full, stdin=subprocess.DEVNULL)
        assert result.returncode == code, args


def test_repl_lines_are_utf8_whatever_the_locale_says(user):
    for encoding in ("ascii", "latin-1"):
        result = user.spawn("-r", "-p", "echo", input="h\u00e9llo\n".encode(),
                            env={"PYTHONIOENCODING": encoding})
        assert result.returncode == 0
    assert [c for r, c in user.messages() if r == "user"] == ["h\u00e9llo", "h\u00e9llo"]


def test_a_model_list_that_pages_in_a_circle(user, server):
    user.use_server(server, provider="anthropic")
    page = {"data": [{"type": "model", "id": "claude-x"}], "has_more": True, "last_id": "claude-x"}
    server.queue(*(json_error(200, page) for _ in range(2)))
    assert_one_error_line(user.run("models"), 1, "the same page of models twice")


EDITOR_SCRIPTS = {
    "remove": "import os, sys; os.unlink(sys.argv[-1])",
    "directory": "import os, sys; os.unlink(sys.argv[-1]); os.mkdir(sys.argv[-1])",
    "killed": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
}


@pytest.mark.parametrize("kind, complaint", [("remove", "left no file"), ("directory", "left no file"),
                                             ("killed", "was ended by signal 9")])
def test_editors_that_misbehave(user, tmp_path, kind, complaint):
    script = tmp_path / "ed.py"
    script.write_text(EDITOR_SCRIPTS[kind])
    result = on_a_terminal(user, "-p", "echo", "-e", env={
        "VISUAL": "   ", "EDITOR": f"{sys.executable} {script}", "TMPDIR": str(tmp_path)})
    assert_one_error_line(result, 1, complaint)
    assert not list(tmp_path.glob("synapse-*")) and not user.db_path.exists()


@pytest.mark.slow
def test_signals_in_a_burst_still_keep_the_partial_reply(user, server):
    user.use_server(server)
    for attempt in range(3):
        server.queue(slow_stream(pieces=40, delay=0.1))
        process = user.popen(f"burst {attempt}")
        wait_for_output(process)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            process.send_signal(signum)
        process.communicate(timeout=30)
        # Pending at once, they are handled by number: SIGHUP may come first.
        assert process.returncode in (129, 143), attempt
        assert user.messages()[-1][0] == "assistant", attempt
        assert user.messages()[-1][1].startswith("w0 ")
    integrity(user.db_path)


# -- the parser against anything ---------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

DATA_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@st.composite
def event_streams(draw):
    """(bytes of a valid stream, the events it must parse into)."""
    events = draw(st.lists(st.tuples(st.sampled_from(["", "message", "delta"]),
                                     st.lists(DATA_TEXT, min_size=1, max_size=3)), max_size=6))
    # One line ending per stream: "\r" then "\n" would be one CRLF.
    ending = draw(st.sampled_from(["\n", "\r", "\r\n"]))
    out, expected = [], []
    for name, lines in events:
        lines = [line.replace("\r", " ").replace("\n", " ") for line in lines]
        if draw(st.booleans()):
            out.append(": keep-alive" + ending)
        if name:
            out.append(f"event: {name}" + ending)
        for line in lines:
            # One space after "data:" is dropped: a value that starts with a
            # space keeps it only when written after "data: ".
            space = " " if line.startswith(" ") else draw(st.sampled_from(["", " "]))
            out.append("data:" + space + line + ending)
        out.append(ending)
        expected.append(synapse.ServerEvent(name or "message", "\n".join(lines)))
    return "".join(out).encode("utf-8"), expected


def reference_events(raw: bytes):
    parser = synapse.EventStreamParser()
    return parser.feed(raw) + parser.close()


@settings(max_examples=300, deadline=None)
@given(event_streams(), st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_parser_never_loses_text_at_any_split(stream, cuts):
    raw, expected = stream
    whole = reference_events(raw)
    assert whole == expected
    points = sorted({c % (len(raw) + 1) for c in cuts})
    parser = synapse.EventStreamParser()
    got, start = [], 0
    for point in points + [len(raw)]:
        got += parser.feed(raw[start:point])
        start = point
    assert got + parser.close() == whole


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=5))
def test_junk_raises_only_provider_errors(junk, cuts):
    for interpret in (synapse.openai_texts, synapse.anthropic_texts):
        parser = synapse.EventStreamParser()
        events, start = [], 0
        for point in sorted(c % (len(junk) + 1) for c in cuts) + [len(junk)]:
            events += parser.feed(junk[start:point])
            start = point
        events += parser.close()
        try:
            list(interpret(events))
        except synapse.ProviderFault:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=8))
def test_openai_texts_keep_every_piece(pieces):
    raw = openai_stream(*pieces)
    parser = synapse.EventStreamParser()
    events = [e for i in range(0, len(raw), 7) for e in parser.feed(raw[i:i + 7])] + parser.close()
    assert "".join(synapse.openai_texts(events)) == "".join(pieces)


# ---------------------------------------------------------------------------
# -- the bulk path of a large cleanup ------------------------------------------
# It drops idx_messages_session, finds the messages by time and rebuilds the
# index; it must leave exactly what the row-by-row path leaves.


def varied_history(path: Path, sessions: int = 40, seed: int = 3) -> Dict[str, str]:
    """Sessions of 0-6 messages over 200 days, with the awkward cases named."""
    rng = random.Random(seed)
    store = synapse.SqliteStore(str(path))
    named = {}
    for i in range(sessions):
        created = NOW - timedelta(days=rng.uniform(1, 200))
        updated = created + (NOW - created) * rng.random()
        session = make_session(store, created=created, updated=updated)
        stamps = sorted(created + (updated - created) * rng.random() for _ in range(rng.randint(0, 6)))
        for j, stamp in enumerate(stamps):
            store._conn.execute(INSERT_MESSAGE + " (?, ?, ?, ?, ?)", (
                str(synapse.new_message_id()), str(session.id), "user" if j % 2 == 0 else "assistant",
                f"message {i}.{j}", synapse.format_timestamp(stamp)))
        set_updated(path, session.id, updated)
    # The oldest session, doomed by every config below, holds a message
    # stamped after its updated_at: the time range misses it, the cascade not.
    straggler = make_session(store, created=NOW - timedelta(days=300), updated=NOW - timedelta(days=299))
    store.add_message(synapse.StoredMessage.new(straggler.id, synapse.Role.USER, "from the future"))
    set_updated(path, straggler.id, NOW - timedelta(days=299))
    # A session kept by every config whose messages are as old as the doomed ones.
    survivor = make_session(store, created=NOW - timedelta(days=250), updated=NOW)
    for j in range(3):
        store._conn.execute(INSERT_MESSAGE + " (?, ?, 'user', ?, ?)", (
            str(synapse.new_message_id()), str(survivor.id), f"old but kept {j}",
            synapse.format_timestamp(NOW - timedelta(days=250 - j))))
    store.close()
    named.update(straggler=str(straggler.id), survivor=str(survivor.id))
    return named


def table_contents(path: Path):
    conn = sqlite3.connect(path)
    try:
        return (sorted(conn.execute("SELECT * FROM sessions")),
                sorted(conn.execute("SELECT * FROM messages")),
                sorted(conn.execute("SELECT type, name, sql FROM sqlite_master")))
    finally:
        conn.close()


def traced_cleanup(path: Path, config, dry_run=False):
    statements: List[str] = []
    with synapse.SqliteStore(str(path)) as store:
        store._conn.set_trace_callback(statements.append)
        result = store.choose_cleanup(config) if dry_run else store.cleanup(config)
        assert store._conn.execute("PRAGMA cache_size").fetchone()[0] == -2000
        assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # off only inside
    return result, any(s.startswith("DROP INDEX") for s in statements)


@pytest.mark.parametrize("config", [
    synapse.SessionConfig(max_sessions=10, retention_days=0),
    synapse.SessionConfig(max_sessions=0, retention_days=60),
    synapse.SessionConfig(max_sessions=15, retention_days=100),
])
def test_bulk_cleanup_leaves_what_the_row_by_row_path_leaves(tmp_path, monkeypatch, config):
    row_by_row, bulk, cascade = tmp_path / "row.db", tmp_path / "bulk.db", tmp_path / "cascade.db"
    named = varied_history(row_by_row)
    shutil.copy(row_by_row, bulk)
    shutil.copy(row_by_row, cascade)
    # The oracle: the same sessions deleted one by one, by the foreign key's cascade.
    with synapse.SqliteStore(str(cascade)) as store:
        assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        oracle, doomed = store.choose_cleanup(config)
        assert all(store.delete_session(session_id) for session_id in doomed)
    expected, dropped = traced_cleanup(row_by_row, config)
    assert not dropped and expected == oracle
    monkeypatch.setattr(synapse, "BULK_CLEANUP_MIN", 1)
    result, dropped = traced_cleanup(bulk, config)
    assert dropped and result == expected and result.sessions_deleted >= 10
    assert table_contents(bulk) == table_contents(row_by_row) == table_contents(cascade)
    sessions, messages, _ = table_contents(bulk)
    assert named["straggler"] not in {s[0] for s in sessions}
    assert sum(m[3].startswith("old but kept") for m in messages) == 3
    integrity(bulk)


@pytest.mark.parametrize("doomed, total, bulk", [(10, 50, True), (9, 50, False), (10, 51, False)])
def test_bulk_path_only_for_a_large_share_of_sessions(tmp_path, monkeypatch, doomed, total, bulk):
    monkeypatch.setattr(synapse, "BULK_CLEANUP_MIN", 10)
    with synapse.SqliteStore(str(tmp_path / "s.db")) as store:
        aged_sessions(store, range(total, 0, -1))
    result, dropped = traced_cleanup(tmp_path / "s.db",
                                     synapse.SessionConfig(max_sessions=total - doomed, retention_days=0))
    assert result.sessions_deleted == doomed and dropped == bulk


def test_dry_run_only_chooses_and_chooses_what_the_cleanup_deletes(tmp_path, monkeypatch):
    path = tmp_path / "h.db"
    varied_history(path)
    before = table_contents(path)
    monkeypatch.setattr(synapse, "BULK_CLEANUP_MIN", 1)
    config = synapse.SessionConfig(max_sessions=10, retention_days=100)
    statements: List[str] = []
    with synapse.SqliteStore(str(path)) as store:
        store._conn.set_trace_callback(statements.append)
        result, ids = store.choose_cleanup(config)
        store._conn.set_trace_callback(None)
        # It only reads: no transaction, so no write lock and nothing to roll back.
        assert all(s.lstrip().upper().startswith("SELECT") for s in statements), statements
        assert result.sessions_deleted == len(ids) == len(set(ids)) >= 30
        assert result.by_retention > 0 and result.by_max_limit > 0
        assert table_contents(path) == before
        survivors = {str(s.id) for s in store.list_sessions()} - set(ids)
        assert store.cleanup(config) == result
        assert {str(s.id) for s in store.list_sessions()} == survivors


@pytest.mark.parametrize("missing", ["idx_messages_session", "idx_messages_timestamp"])
def test_cleanup_without_the_bulk_paths_indexes_deletes_row_by_row(tmp_path, monkeypatch, missing):
    path = tmp_path / "h.db"
    varied_history(path)
    conn = sqlite3.connect(path)
    conn.execute(f"DROP INDEX {missing}")
    conn.close()
    monkeypatch.setattr(synapse, "BULK_CLEANUP_MIN", 1)
    result, dropped = traced_cleanup(path, synapse.SessionConfig(max_sessions=10))
    assert not dropped and result.sessions_deleted >= 30
    assert len(table_contents(path)[0]) == 10
    integrity(path)


def test_bulk_cleanup_failing_after_the_index_is_dropped_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "h.db"
    varied_history(path)
    before = table_contents(path)
    monkeypatch.setattr(synapse, "BULK_CLEANUP_MIN", 1)
    statements: List[str] = []
    with synapse.SqliteStore(str(path)) as store:
        store._conn.set_trace_callback(statements.append)
        # Interrupt the delete that runs while the message indexes are gone.
        store._conn.set_progress_handler(lambda: "NOT INDEXED" in statements[-1], 1)
        with pytest.raises(synapse.DatabaseError):
            store.cleanup(synapse.SessionConfig(max_sessions=10))
        store._conn.set_progress_handler(None, 0)
        assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert [s for s in statements if s.startswith("DROP INDEX")] == [
        "DROP INDEX idx_messages_session", "DROP INDEX idx_messages_timestamp"]
    assert table_contents(path) == before
    integrity(path)


# Queries use their indexes (SPEC §9)
# ---------------------------------------------------------------------------


def populated_store(tmp_path, sessions=60):
    store = synapse.SqliteStore(str(tmp_path / "plans.db"))
    for i in range(sessions):
        s = make_session(store)
        for j in range(4):
            word = "needle" if (i % 7 == 0 and j == 2) else "hay"
            store.add_message(synapse.StoredMessage.new(s.id, synapse.Role.USER, f"{word} {i} {j}"))
    store._conn.execute("ANALYZE")
    return store


def query_plans(store, method, *args):
    """EXPLAIN QUERY PLAN of every statement ``method`` runs."""
    statements = []
    store._conn.set_trace_callback(statements.append)
    try:
        method(*args)
    finally:
        store._conn.set_trace_callback(None)
    plans = []
    for sql in statements:
        if sql.lstrip().upper().startswith(("SELECT", "DELETE", "INSERT")):
            plans.append("\n".join(r[3] for r in store._conn.execute("EXPLAIN QUERY PLAN " + sql)))
    return plans


# A full scan of the messages table, as SQLite builds print it: "SCAN m" or
# "SCAN messages" (3.36 on), "SCAN TABLE messages AS m" (before); an index
# named after USING is not a scan of the table.
FULL_SCAN_OF_MESSAGES = re.compile(r"SCAN (TABLE )?(messages|m)( AS m)?$")


def full_scans_of_messages(plan: str) -> int:
    return sum(bool(FULL_SCAN_OF_MESSAGES.match(line.strip())) for line in plan.splitlines())


def no_full_scan_of_messages(plan: str) -> bool:
    return full_scans_of_messages(plan) == 0


def test_the_full_scan_check_knows_every_spelling():
    for line in ("SCAN m", "SCAN messages", "SCAN TABLE messages AS m", "SCAN TABLE messages"):
        assert not no_full_scan_of_messages(f"QUERY PLAN\n  {line}\n")
    for line in ("SEARCH m USING INDEX idx_messages_session (session_id=?)",
                 "SCAN s USING INDEX idx_sessions_updated", "SCAN m USING COVERING INDEX x"):
        assert no_full_scan_of_messages(line)


def test_list_and_show_plans_use_indexes(tmp_path):
    store = populated_store(tmp_path)
    (plan,) = query_plans(store, store.list_sessions, 20)
    assert "idx_sessions_updated" in plan and "TEMP B-TREE" not in plan
    assert "idx_messages_session" in plan and no_full_scan_of_messages(plan)
    session_id = store.list_sessions(1)[0].id
    plans = query_plans(store, store.get_messages, session_id)
    assert "idx_messages_session" in plans[0] and "TEMP B-TREE" not in plans[0]
    assert "sqlite_autoindex_sessions_1" in query_plans(store, store.get_session, session_id)[0]
    store.close()


def test_search_plans_and_both_strategies_agree(tmp_path, monkeypatch):
    store = populated_store(tmp_path)
    walk = query_plans(store, store.search_sessions, "needle", 3)
    assert len(walk) == 1 and "idx_sessions_updated" in walk[0]
    assert "idx_messages_session" in walk[0] and no_full_scan_of_messages(walk[0])
    expected = [h.session.id for h in store.search_sessions("NEEDLE", 3)]
    everything = [h.session.id for h in store.search_sessions("needle")]
    assert len(everything) == 9 and expected == everything[:3]
    # A walk over budget falls back to one scan of the messages: same answer.
    monkeypatch.setattr(synapse, "SEARCH_WALK_BUDGET", 0)
    assert [h.session.id for h in store.search_sessions("needle", 3)] == expected
    assert [h.session.id for h in store.search_sessions("needle", 20)] == everything
    scan = query_plans(store, store.search_sessions, "needle", 20)
    # The fallback reads the messages once, in one pass, as a list subquery
    # (no index can answer a substring match; FTS costs cleanup five times).
    assert len(scan) == 2 and "LIST SUBQUERY" in scan[1]
    assert full_scans_of_messages(scan[1]) == 1
    store.close()


def test_cleanup_plans_use_indexes(tmp_path):
    store = populated_store(tmp_path)
    plans = query_plans(store, store.cleanup, synapse.SessionConfig(max_sessions=10, retention_days=30))
    deletes = [p for p in plans if "messages" in p or "m USING" in p]
    assert plans and all(no_full_scan_of_messages(p) for p in plans), plans
    assert any("idx_messages_session" in p for p in deletes)
    assert any("idx_sessions_updated" in p for p in plans)
    assert len(store.list_sessions()) == 10
    store.close()


def test_bulk_cleanup_plans_use_indexes(tmp_path, monkeypatch):
    store = populated_store(tmp_path)
    monkeypatch.setattr(synapse, "BULK_CLEANUP_MIN", 1)
    plans = query_plans(store, store.cleanup, synapse.SessionConfig(max_sessions=10, retention_days=30))
    assert plans and all(no_full_scan_of_messages(p) for p in plans), plans
    assert any("idx_messages_timestamp (timestamp<?)" in p for p in plans), plans
    assert any("SEARCH messages USING INTEGER PRIMARY KEY (rowid<?)" in p for p in plans), plans
    assert len(store.list_sessions()) == 10
    store.close()


def test_system_and_name_are_for_new_sessions_only(user):
    user.ok("-p", "echo", "--system", "original", "--name", "first", "hi")
    (sid,) = user.session_ids()
    result = user.run("-s", sid, "--system", "replacement", "--name", "second", "again")
    assert result.returncode == 0 and "apply to new sessions" in err(result)
    assert user.rows("SELECT name, system_prompt FROM sessions") == [("first", "original")]


# ---------------------------------------------------------------------------
# Import, export, backup (SPEC §12)
# ---------------------------------------------------------------------------


FIXTURES = HERE / "fixtures"
SHARED_FIXTURES = HERE.parent / "shared" / "fixtures"
CHATGPT_FILES = ["conversations.json", "chatgpt-export.zip", "chatgpt-export-split.zip"]
LLM_DATABASES = ["logs-0.36", "logs-0.31.1", "logs-0.13", "logs-0.13-upgraded-to-0.36"]
# What a test's config needs to import old history: the guard has its own tests.
NO_CLEANUP = "[session]\nauto_cleanup = false\n"


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="../shared/fixtures is not beside this checkout")
def test_the_fixtures_are_byte_for_byte_the_shared_ones():
    copies = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file())
    assert len(copies) == 14
    for relative in copies:
        assert (FIXTURES / relative).read_bytes() == (SHARED_FIXTURES / relative).read_bytes(), relative


def stored(db_path: Path) -> Dict[str, dict]:
    """Every session as the database holds it, with its messages in order."""
    conn = sqlite3.connect(db_path)
    try:
        sessions = {}
        for row in conn.execute(f"SELECT {synapse._SESSION_COLUMNS} FROM sessions ORDER BY rowid"):
            session = dict(zip(synapse.SESSION_FIELDS, row))
            session["messages"] = [dict(zip(synapse.MESSAGE_FIELDS, m)) for m in conn.execute(
                f"SELECT {', '.join(synapse.MESSAGE_FIELDS)} FROM messages WHERE session_id = ?"
                " ORDER BY rowid", (row[0],))]
            sessions[row[0]] = session
        return sessions
    finally:
        conn.close()


def assert_fields(got: dict, want: dict, where: str) -> None:
    """Field by field, so that a failure names what differs."""
    for key, value in want.items():
        assert got[key] == value, f"{where}: {key}: got {got[key]!r}, want {value!r}"


def iso_from_epoch(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds")


def imported_line(label: str, created: int, messages: int, unchanged: int, verb: str = "Imported") -> str:
    def plural(n: int, noun: str) -> str:
        return f"{n} {noun}" + ("" if n == 1 else "s")
    return (f"{label}: {verb} {plural(created, 'session')} ({plural(messages, 'message')}); "
            f"{plural(unchanged, 'session')} already up to date\n")


@pytest.mark.parametrize("name", CHATGPT_FILES)
def test_chatgpt_fixtures_import_as_expected(user, name):
    user.write_config(NO_CLEANUP)
    expected = json.loads((FIXTURES / "chatgpt" / "expected.json").read_text(encoding="utf-8"))
    path = str(FIXTURES / "chatgpt" / name)
    result = user.run("sessions", "import", path)
    assert result.returncode == 0, err(result)
    assert text(result) == imported_line(path, 6, 26, 0)
    got = stored(user.db_path)
    assert sorted(got) == sorted(e["id"] for e in expected)
    for e in expected:
        session = got[e["id"]]
        assert_fields(session, {"name": e["name"], "provider": "openai", "model": e["model"],
                                "system_prompt": e["system_prompt"], "created_at": e["created_at_iso"],
                                "updated_at": e["updated_at_iso"], "forked_from": None}, e["id"])
        assert e["created_at_iso"] == iso_from_epoch(e["created_at"])
        assert [m["id"] for m in session["messages"]] == [m["id"] for m in e["messages"]], e["id"]
        for m, em in zip(session["messages"], e["messages"]):
            assistant = em["role"] == "assistant"
            assert_fields(m, {"role": em["role"], "content": em["content"],
                              "timestamp": em["timestamp_iso"],
                              "provider": "openai" if assistant else None,
                              "model": em["model_slug"] if assistant else None,
                              "input_tokens": None, "output_tokens": None, "stop_reason": None},
                          f"{e['id']} {em['node_id']}")
            assert em["timestamp_iso"] == iso_from_epoch(em["timestamp"])
    # Again, in any of the three forms: nothing to add.
    for again in CHATGPT_FILES:
        again_path = str(FIXTURES / "chatgpt" / again)
        assert text(user.ok("sessions", "import", again_path)) == imported_line(again_path, 0, 0, 6)
    assert stored(user.db_path) == got


@pytest.mark.parametrize("name", LLM_DATABASES)
def test_llm_fixtures_import_as_expected(user, name):
    # The provider of a model no rule names is the configured one.
    user.write_config('provider = "ollama"\n' + NO_CLEANUP)
    path = FIXTURES / "llm" / f"{name}.db"
    before = path.read_bytes()
    expected = json.loads((FIXTURES / "llm" / "expected" / f"{name}.json").read_text(
        encoding="utf-8"))["synapse_sessions"]

    def provider(value: Optional[str]) -> Optional[str]:
        return "ollama" if value == "<default provider>" else value

    result = user.ok("sessions", "import", str(path))
    assert text(result) == imported_line(str(path), len(expected),
                                         sum(len(e["messages"]) for e in expected), 0)
    got = stored(user.db_path)
    assert list(got) == [e["id"] for e in expected]
    for e in expected:
        session = got[e["id"]]
        assert_fields(session, {"name": e["name"], "provider": provider(e["provider"]),
                                "model": e["model"], "system_prompt": e["system_prompt"],
                                "created_at": e["created_at"], "updated_at": e["updated_at"],
                                "forked_from": None}, e["llm_conversation_id"])
        assert [m["id"] for m in session["messages"]] == [m["id"] for m in e["messages"]]
        for m, em in zip(session["messages"], e["messages"]):
            want = {"provider": None, "model": None, "input_tokens": None, "output_tokens": None,
                    "stop_reason": None, **em}
            assert_fields(m, {**want, "provider": provider(want["provider"])},
                          f"{e['llm_conversation_id']} {em['id']}")
    assert text(user.ok("sessions", "import", str(path))) == imported_line(str(path), 0, 0, len(expected))
    assert path.read_bytes() == before, "the llm database was written to"


def test_llm_provider_rule():
    cases = {"gpt-4o": "openai", "o1-mini": "openai", "o3": "openai", "o4-mini": "openai",
             "chatgpt-4o-latest": "openai", "claude-3.5-haiku": "anthropic",
             "anthropic/claude-sonnet-4": "anthropic", "deepseek-chat": "deepseek",
             "DeepSeek-R1": "deepseek", "llama3.2": "mine", "gpt4all-x": "mine"}
    assert {m: synapse.llm_provider(m, "mine") for m in cases} == cases


def chatted(user: User, *messages: str) -> List[str]:
    """One echo session per message; their IDs, oldest first."""
    for message in messages:
        user.ok("-p", "echo", message)
    return user.session_ids()


def test_export_all_is_json_lines_of_show_json_oldest_first(user, tmp_path):
    assert user.ok("sessions", "export", "--all").stdout == b""  # no sessions, no output
    user.write_config(NO_CLEANUP)
    first, second = chatted(user, "one", "two")
    store = synapse.SqliteStore(str(user.db_path))
    store.add_message(synapse.StoredMessage.new(uuid.UUID(second), synapse.Role.ASSISTANT, "more",
                                                provider="echo", model="echo", input_tokens=3,
                                                output_tokens=4, stop_reason="stop"))
    store.close()
    # Created first, updated last: the order is created_at's.
    set_updated(user.db_path, first, NOW + timedelta(minutes=5))
    lines = text(user.ok("sessions", "export", "--all")).split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert [json.loads(line) for line in lines[:2]] == [
        json.loads(text(user.ok("sessions", "show", sid, "--json"))) for sid in (first, second)]
    assert all('": ' not in line and '", "' not in line for line in lines)  # compact
    single = text(user.ok("sessions", "export", second, "--format", "jsonl"))
    assert single == lines[1] + "\n"
    out = tmp_path / "all.jsonl"
    result = user.ok("sessions", "export", "--all", "-o", str(out))
    assert text(result) == f"Exported 2 sessions to {out}\n"
    assert out.read_text(encoding="utf-8") == "\n".join(lines)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    empty = tmp_path / "none.jsonl"
    user.ok("sessions", "delete", first, second)
    assert text(user.ok("sessions", "export", "--all", "-o", str(empty))) == f"Exported 0 sessions to {empty}\n"
    assert empty.read_bytes() == b""


def test_export_all_lines_are_safe_on_a_terminal_and_exact(user):
    nasty = "esc\x1b[2J del\x7f c1\x85\x9b bidi\u202e lines\u2028\u2029 nul\x00 tab\t end"
    user.ok("-p", "echo", nasty)
    raw = user.ok("sessions", "export", "--all", tty="out").stdout
    assert raw.count(b"\n") == 1
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]", raw.decode()[:-1])
    assert json.loads(raw)["messages"][0]["content"] == nasty


@pytest.mark.parametrize("args", [["--all", "--format", "markdown"], ["--all", "--format", "json"],
                                  ["--all", "ID"], []])
def test_export_all_usage_errors(user, args):
    (sid,) = chatted(user, "hi")
    result = user.run("sessions", "export", *[sid if a == "ID" else a for a in args])
    assert_one_error_line(result, 2)


def synapse_file(tmp_path: Path, sessions: List[dict], layout: str = "jsonl", name: str = "in.json") -> str:
    path = tmp_path / name
    if layout == "jsonl":
        data = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sessions)
    elif layout == "array":
        data = json.dumps(sessions, indent=1)
    else:
        (session,) = sessions
        data = json.dumps(session, indent=2)
    path.write_text(data, encoding="utf-8")
    return str(path)


def synapse_session(*contents: str, **fields: object) -> dict:
    """A show --json object of an older version (no §11 fields, no forked_from)."""
    session = {"id": str(uuid.uuid4()), "name": "imported", "provider": "echo", "model": "echo",
               "system_prompt": None, "created_at": "2026-11-24T09:30:00.123456+00:00",
               "updated_at": "2026-11-24T09:31:00+00:00",
               "messages": [{"id": str(uuid.uuid4()), "role": "user" if i % 2 == 0 else "assistant",
                             "content": c, "timestamp": "2026-11-24T09:30:00.123456+00:00"}
                            for i, c in enumerate(contents)]}
    session.update(fields)
    return session


@pytest.mark.parametrize("layout", ["object", "array", "jsonl"])
def test_synapse_files_of_every_layout_keep_their_ids(user, tmp_path, layout):
    user.write_config(NO_CLEANUP)
    sessions = [synapse_session("hi", "hello")] + ([synapse_session("x")] if layout != "object" else [])
    path = synapse_file(tmp_path, sessions, layout)
    result = user.ok("sessions", "import", path)
    assert text(result) == imported_line(path, len(sessions), len(sessions) + 1, 0)
    got = stored(user.db_path)
    assert list(got) == [s["id"] for s in sessions]
    first = got[sessions[0]["id"]]
    assert_fields(first, {"name": "imported", "created_at": "2026-11-24T09:30:00.123456+00:00",
                          "updated_at": "2026-11-24T09:31:00.000000+00:00", "forked_from": None}, "session")
    assert [(m["id"], m["role"], m["content"], m["provider"], m["input_tokens"], m["stop_reason"])
            for m in first["messages"]] == [(m["id"], m["role"], m["content"], None, None, None)
                                            for m in sessions[0]["messages"]]


def test_export_import_round_trip_is_exact(user, tmp_path):
    user.write_config(NO_CLEANUP)
    chatted(user, "caf\u00e9 \U0001f600 \x1b[31m\x00", "second")
    store = synapse.SqliteStore(str(user.db_path))
    source = store.list_sessions()[0].id
    fork = synapse.Session.new("anthropic", "claude", "Be brief.", "fork")._replace(forked_from=source)
    store.create_session(fork, [synapse.StoredMessage.new(fork.id, synapse.Role.ASSISTANT, "x" * 5000,
                                                          provider="anthropic", model="claude-x",
                                                          input_tokens=10, output_tokens=2 ** 40,
                                                          stop_reason="max_tokens")])
    store.close()
    exported = user.ok("sessions", "export", "--all").stdout
    path = tmp_path / "all.jsonl"
    path.write_bytes(exported)
    other = machine(tmp_path, "other")
    assert text(other.ok("sessions", "import", str(path))) == imported_line(str(path), 3, 5, 0)
    assert other.ok("sessions", "export", "--all").stdout == exported
    assert stored(other.db_path) == stored(user.db_path)


def test_a_stored_session_gains_only_what_it_lacks_and_keeps_its_fields(user, tmp_path):
    user.write_config(NO_CLEANUP)
    (sid,) = chatted(user, "mine")
    user.ok("sessions", "rename", sid, "my name")
    ours = json.loads(text(user.ok("sessions", "show", sid, "--json")))
    theirs = dict(ours, name="their name", model="other", system_prompt="other prompt",
                  created_at="2020-01-01T00:00:00+00:00", updated_at="2020-01-01T00:00:00+00:00")
    theirs["messages"] = ours["messages"][:1] + [
        {"id": str(uuid.uuid4()), "role": "user", "content": f"theirs {i}",
         "timestamp": "2020-01-01T00:00:00+00:00"} for i in (1, 2)]
    path = synapse_file(tmp_path, [theirs])
    assert text(user.ok("sessions", "import", path)) == imported_line(path, 1, 2, 0)
    [session] = stored(user.db_path).values()
    assert_fields(session, {k: ours[k] for k in ("name", "model", "system_prompt", "created_at",
                                                  "updated_at")}, "kept")  # ours is later
    assert [m["content"] for m in session["messages"]] == ["mine", "mine", "theirs 1", "theirs 2"]
    # A later updated_at in the file is taken; nothing else changes.
    later = dict(theirs, updated_at="2099-01-01T00:00:00+00:00")
    path = synapse_file(tmp_path, [later], name="later.json")
    assert text(user.ok("sessions", "import", path)) == imported_line(path, 0, 0, 1)
    [session] = stored(user.db_path).values()
    assert session["updated_at"] == "2099-01-01T00:00:00.000000+00:00" and session["name"] == "my name"


def test_dry_run_says_what_the_import_would_and_writes_nothing(user, tmp_path):
    user.write_config(NO_CLEANUP)
    (kept,) = chatted(user, "kept")
    known = json.loads(text(user.ok("sessions", "show", kept, "--json")))
    grown = dict(known, messages=known["messages"] + [synapse_session("new one")["messages"][0]])
    one, two = synapse_session("a", "b"), synapse_session("c")
    first = synapse_file(tmp_path, [one, grown], name="first.jsonl")
    # The second file overlaps the first: its counts are after the first's.
    second = synapse_file(tmp_path, [one, two], name="second.jsonl")
    before = stored(user.db_path)
    dry = user.ok("sessions", "import", "--dry-run", first, second)
    assert stored(user.db_path) == before
    assert text(dry) == (imported_line(first, 2, 3, 0, "Would import")
                         + imported_line(second, 1, 1, 1, "Would import"))
    real = user.ok("sessions", "import", first, second)
    assert text(real) == text(dry).replace("Would import", "Imported")
    assert text(user.ok("sessions", "import", "--dry-run", first)) == imported_line(
        first, 0, 0, 2, "Would import")


def test_singular_counts(user, tmp_path):
    user.write_config(NO_CLEANUP)
    path = synapse_file(tmp_path, [synapse_session("only")])
    assert text(user.ok("sessions", "import", path)).endswith(
        "Imported 1 session (1 message); 0 sessions already up to date\n")
    assert text(user.ok("sessions", "import", path)).endswith(
        "Imported 0 sessions (0 messages); 1 session already up to date\n")


def test_a_message_twice_in_the_files_is_stored_once_where_it_came_first(user, tmp_path):
    user.write_config(NO_CLEANUP)
    one = synapse_session("a", "b")
    other = synapse_session("c", messages=[one["messages"][1]])
    path = synapse_file(tmp_path, [one, other, one])
    assert text(user.ok("sessions", "import", path)) == imported_line(path, 2, 2, 0)
    assert [(m["content"], len(s["messages"])) for s in stored(user.db_path).values() for m in s["messages"]] == [
        ("a", 2), ("b", 2)]


def test_empty_and_whitespace_files_import_no_sessions(user, tmp_path):
    for data in (b"", b"\n  \n", b"[]", b"\xef\xbb\xbf[ ]\n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(data)
        assert text(user.ok("sessions", "import", str(path))) == imported_line(str(path), 0, 0, 0)


def machine(tmp_path: Path, name: str) -> User:
    (tmp_path / name).mkdir()
    other = User(tmp_path / name)
    other.write_config(NO_CLEANUP)
    return other


def exchange(source: User, target: User, folder: Path) -> None:
    """``export --all`` on one machine, ``import`` on the other, through a file."""
    path = folder / "sync.jsonl"
    source.ok("sessions", "export", "--all", "-o", str(path))
    target.ok("sessions", "import", str(path))


def test_two_machines_converge_through_export_and_import(tmp_path):
    a, b = machine(tmp_path, "a"), machine(tmp_path, "b")
    shared, only_a = chatted(a, "question", "only on a")
    exchange(a, b, tmp_path)
    # Both go on in the shared session, b after undoing what it had of it;
    # b deletes a session and starts one; a renames the shared one.
    a.ok("-s", shared, "-p", "echo", "a adds")
    b.ok("sessions", "undo", shared)
    b.ok("-s", shared, "-p", "echo", "b adds")
    b.ok("sessions", "delete", only_a)
    b.ok("-p", "echo", "only on b")
    a.ok("sessions", "rename", shared, "named on a")
    exchange(a, b, tmp_path)
    exchange(b, a, tmp_path)
    on_a, on_b = stored(a.db_path), stored(b.db_path)
    assert sorted(on_a) == sorted(on_b) and len(on_a) == 3
    for sid in on_a:
        ids = [m["id"] for m in on_a[sid]["messages"]]
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(m["id"] for m in on_b[sid]["messages"])
    # Each keeps its own messages first, then the other's; what b undid, and
    # the session it deleted, came back from a, which still had them.
    assert [m["content"] for m in on_a[shared]["messages"]] == [
        "question", "question", "a adds", "a adds", "b adds", "b adds"]
    assert [m["content"] for m in on_b[shared]["messages"]] == [
        "b adds", "b adds", "question", "question", "a adds", "a adds"]
    assert len(on_b[only_a]["messages"]) == 2
    # Only additions travel: the name stays where it was given.
    assert on_a[shared]["name"] == "named on a" and on_b[shared]["name"] is None
    path = tmp_path / "again.jsonl"
    a.ok("sessions", "export", "--all", "-o", str(path))
    assert text(b.ok("sessions", "import", str(path))) == imported_line(str(path), 0, 0, 3)


def aged_import(tmp_path: Path, days_ago: Dict[str, float], name: str = "aged.jsonl") -> str:
    """A Synapse file of one-message sessions, each updated ``days_ago`` days ago."""
    sessions = []
    for label, days in days_ago.items():
        stamp = synapse.format_timestamp(NOW - timedelta(days=days))
        sessions.append(synapse_session(label, created_at=stamp, updated_at=stamp))
    return synapse_file(tmp_path, sessions, name=name)


def test_the_cleanup_guard_refuses_imports_the_next_chat_would_delete(user, tmp_path):
    user.write_config("[session]\nretention_days = 30\nmax_sessions = 0\n")
    fresh = aged_import(tmp_path, {"fresh": 29.9}, "fresh.jsonl")
    old = aged_import(tmp_path, {"old": 30.1, "older": 400, "new": 1}, "old.jsonl")
    result = user.run("sessions", "import", fresh, old)
    assert_one_error_line(result, 2, "2 imported sessions", "retention_days = 30", "max_sessions",
                          "[session]", "--allow-cleanup", str(user.config_dir / "config.toml"))
    assert text(result) == "" and user.session_ids() == []  # the fresh file neither
    dry = user.run("sessions", "import", "--dry-run", old)
    assert_one_error_line(dry, 2, "2 imported sessions")
    assert text(dry) == imported_line(old, 3, 3, 0, "Would import") and user.session_ids() == []
    assert text(user.ok("sessions", "import", fresh)) == imported_line(fresh, 1, 1, 0)
    result = user.ok("sessions", "import", "--allow-cleanup", old)
    assert text(result) == imported_line(old, 3, 3, 0) and len(user.session_ids()) == 4
    # auto_cleanup off: no guard.
    user.write_config("[session]\nretention_days = 30\nauto_cleanup = false\n")
    other = aged_import(tmp_path, {"ancient": 900}, "ancient.jsonl")
    assert user.ok("sessions", "import", other).returncode == 0


def test_the_guard_counts_max_sessions_over_the_stored_and_imported_sessions(user, tmp_path):
    user.write_config(NO_CLEANUP)
    (mine,) = chatted(user, "mine")
    created = user.rows("SELECT created_at FROM sessions")[0][0]
    set_updated(user.db_path, mine, NOW - timedelta(days=2))
    user.write_config("[session]\nmax_sessions = 1\nretention_days = 0\n")
    # Older than the stored session: the next chat would delete the import.
    older = aged_import(tmp_path, {"older": 3}, "older.jsonl")
    assert_one_error_line(user.run("sessions", "import", older), 2, "1 imported session",
                          "over max_sessions = 1")
    # Newer: the stored session would go, not the import (that is the limit's business).
    newer = aged_import(tmp_path, {"newer": 1}, "newer.jsonl")
    assert user.ok("sessions", "import", "--dry-run", newer).returncode == 0
    # A tie on updated_at goes by created_at, then by which was stored first.
    stamp = synapse.format_timestamp(NOW - timedelta(days=2))
    tie_later = synapse_file(tmp_path, [synapse_session("tie", updated_at=stamp, created_at=created)],
                             name="tie.jsonl")
    assert user.ok("sessions", "import", "--dry-run", tie_later).returncode == 0
    tie_earlier = synapse_file(tmp_path, [synapse_session("tie", updated_at=stamp,
                                                          created_at="2000-01-01T00:00:00+00:00")],
                               name="tie-earlier.jsonl")
    assert_one_error_line(user.run("sessions", "import", tie_earlier), 2, "over max_sessions")


def test_the_guard_and_a_stored_session_the_import_merges_into(user, tmp_path):
    user.write_config(NO_CLEANUP)
    (mine,) = chatted(user, "mine")
    set_updated(user.db_path, mine, NOW - timedelta(days=60))
    ours = json.loads(text(user.ok("sessions", "show", mine, "--json")))
    user.write_config("[session]\nretention_days = 30\n")
    same = synapse_file(tmp_path, [ours], name="same.jsonl")
    # Nothing to add to it: not imported, so not the guard's business.
    assert text(user.ok("sessions", "import", same)) == imported_line(same, 0, 0, 1)
    grown = dict(ours, messages=ours["messages"] + [synapse_session("more")["messages"][0]])
    path = synapse_file(tmp_path, [grown], name="grown.jsonl")
    assert_one_error_line(user.run("sessions", "import", path), 2, "1 imported session")
    # Its later updated_at in the file saves it.
    fresh = dict(grown, updated_at=synapse.format_timestamp(NOW))
    path = synapse_file(tmp_path, [fresh], name="fresh.jsonl")
    assert text(user.ok("sessions", "import", path)) == imported_line(path, 1, 1, 0)


def test_bad_files_change_nothing_and_the_others_are_imported(user, tmp_path):
    user.write_config(NO_CLEANUP)
    good = synapse_file(tmp_path, [synapse_session("good")], name="good.jsonl")
    lines = [json.dumps(synapse_session(f"s{i}")) for i in range(4)]
    lines[2] = lines[2][:-20]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = user.run("sessions", "import", str(bad), good, str(tmp_path / "missing.json"))
    assert result.returncode == 1 and "Traceback" not in err(result)
    assert text(result) == imported_line(good, 1, 1, 0)
    errors = err(result).splitlines()
    assert errors[0].startswith(f"synapse: error: {bad}: line 3: invalid JSON")
    assert errors[1] == f"synapse: error: {tmp_path / 'missing.json'}: no such file; nothing was imported from it"
    assert [c for _, c in user.messages()] == ["good"]


def write_bytes(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


CHATGPT_JSON = (FIXTURES / "chatgpt" / "conversations.json")


@pytest.mark.parametrize("data, complaint", [
    (CHATGPT_JSON.read_bytes()[:20000], "item 3: truncated: the file ends inside it"),
    (CHATGPT_JSON.read_bytes()[:20000] + b"\n", "item 3: truncated"),
    (CHATGPT_JSON.read_bytes()[:-1], "truncated: the JSON array ends after item 6"),
    (b'[{"id": "x"}]', "item 1: neither a Synapse session nor a ChatGPT conversation"),
    (b'{"title": "no mapping"}', "line 1: neither"),
    (b"[1, 2]", "item 1: neither"),
    (b'{"id": "x", "messages": "no"}', "line 1: 'provider' is missing"),
    (json.dumps(synapse_session(messages="no")).encode(), "line 1: 'messages' must be an array"),
    (json.dumps(synapse_session("x", provider=5)).encode(), "line 1: 'provider' must be a string"),
    (json.dumps(synapse_session("x", created_at="yesterday")).encode(), "'created_at': 'yesterday' is not an ISO"),
    (json.dumps(synapse_session(messages=[{"id": "m", "role": "user", "content": "x",
                                           "timestamp": "2026-01-01T00:00:00"}])).encode(),
     "line 1: message 1: 'id': 'm' is not a UUID"),
    (json.dumps(synapse_session(messages=[{"id": str(uuid.uuid4()), "role": "tool", "content": "x",
                                           "timestamp": "2026-01-01T00:00:00"}])).encode(),
     "message 1: 'role' must be user, assistant or system"),
    (json.dumps(synapse_session(messages=[{"id": str(uuid.uuid4()), "role": "user", "content": "x",
                                           "timestamp": "2026-01-01T00:00:00", "input_tokens": True}])).encode(),
     "'input_tokens' must be an integer"),
    (json.dumps(synapse_session(messages=[{"id": str(uuid.uuid4()), "role": "user", "content": "x",
                                           "timestamp": "2026-01-01T00:00:00", "output_tokens": 2 ** 64}])).encode(),
     "'output_tokens' must be a count"),
    (json.dumps([synapse_session("a\ud800b")]).encode(), "item 1: a string holds an unpaired UTF-16 surrogate"),
    (b'[' + b'[' * 900 + b'"\\udc00"' + b']' * 900 + b']', "item 1: a string holds an unpaired"),
    (b'[{"messages": "\xff"}]', "not valid UTF-8"),
    (b"[" * 100000, "item 1: invalid JSON"),
    (b"[] []", "unexpected data after the JSON array"),
    (b"hello", "not a Synapse, ChatGPT or llm file"),
    (b"\x1f\x8b\x08\x00 gzip", "not a Synapse, ChatGPT or llm file"),
])
def test_malformed_and_foreign_files_are_one_error_line(user, tmp_path, data, complaint):
    path = write_bytes(tmp_path, "in.json", data)
    result = user.run("sessions", "import", path)
    assert_one_error_line(result, 1, f"{path}: ", complaint, "nothing was imported from it")
    assert not user.rows("SELECT * FROM sessions")


def chatgpt_conversation(nodes: list, current: str, cid: str = "c1") -> dict:
    """A conversation from [(node id, parent, message or None)]."""
    return {"id": cid, "conversation_id": cid, "title": "t", "create_time": 1700000000.0,
            "update_time": 1700000060.0, "current_node": current,
            "mapping": {n: {"id": n, "parent": p, "message": m, "children": []} for n, p, m in nodes}}


def chatgpt_message(role: str, content: dict, **extra: object) -> dict:
    return {"author": {"role": role}, "content": content, "create_time": extra.pop("create_time", None),
            "metadata": extra.pop("metadata", {}), "recipient": extra.pop("recipient", "all"), **extra}


def chatgpt_text(*parts: object) -> dict:
    return {"content_type": "text", "parts": list(parts)}


def test_chatgpt_rules_the_fixtures_leave_out(user, tmp_path):
    """Code addressed to all is a fenced block; other skips and the time rule."""
    user.write_config(NO_CLEANUP)
    nodes = [("r", None, None),
             ("s", "r", chatgpt_message("system", chatgpt_text("Be kind."), create_time=1700000001.0)),
             ("u", "s", chatgpt_message("user", {"content_type": "multimodal_text", "parts": [
                 {"content_type": "image_asset_pointer"}, "", "look"]})),
             ("t", "u", chatgpt_message("tool", chatgpt_text("tool output"), create_time=1700000003.0)),
             ("c", "t", chatgpt_message("assistant", {"content_type": "code", "language": "python",
                                                      "text": "print(1)"}, create_time=1700000004.0,
                                        metadata={"model_slug": "gpt-4o"})),
             ("k", "c", chatgpt_message("assistant", {"content_type": "code", "language": "unknown",
                                                      "text": "x"}, metadata={"model_slug": "o3"})),
             ("h", "k", chatgpt_message("user", chatgpt_text("hidden"),
                                        metadata={"is_visually_hidden_from_conversation": True})),
             ("b", "h", chatgpt_message("assistant", chatgpt_text("search"), recipient="browser")),
             ("e", "b", chatgpt_message("assistant", chatgpt_text("  "))),
             ("x", "e", chatgpt_message("assistant", {"content_type": "thoughts", "thoughts": []}))]
    empty = chatgpt_conversation([("r", None, None), ("s", "r", chatgpt_message("system", chatgpt_text("")))],
                                 "s", cid="empty")
    path = write_bytes(tmp_path, "c.json", json.dumps([chatgpt_conversation(nodes, "x"), empty]).encode())
    assert text(user.ok("sessions", "import", path)) == imported_line(path, 1, 3, 0)
    [session] = stored(user.db_path).values()
    assert session["system_prompt"] == "Be kind." and session["model"] == "o3"
    assert [(m["role"], m["content"], m["timestamp"][:19], m["model"]) for m in session["messages"]] == [
        ("user", "[image]\n\nlook", "2023-11-14T22:13:21", None),  # no time: the system message's
        ("assistant", "```python\nprint(1)\n```", "2023-11-14T22:13:24", "gpt-4o"),
        ("assistant", "```\nx\n```", "2023-11-14T22:13:24", "o3")]


@pytest.mark.parametrize("conversation, complaint", [
    (chatgpt_conversation([("a", "b", None), ("b", "a", None)], "a"), "parent links form a cycle"),
    (chatgpt_conversation([("a", "gone", None)], "a"), "node gone is missing"),
    (chatgpt_conversation([("a", None, None)], "zzz"), "node zzz is missing"),
    (chatgpt_conversation([("a", 5, None)], "a"), "'parent' must be a string"),
    (chatgpt_conversation([("a", None, chatgpt_message("user", "text"))], "a"), "'content' must be an object"),
    (chatgpt_conversation([("a", None, chatgpt_message("user", chatgpt_text("x"), create_time=1e300))], "a"),
     "not a valid time"),
    ({"id": "c", "mapping": [], "current_node": "a", "create_time": 1}, "'mapping' must be an object"),
])
def test_hostile_chatgpt_conversations_name_the_conversation(user, tmp_path, conversation, complaint):
    ok = chatgpt_conversation([("r", None, None), ("u", "r", chatgpt_message("user", chatgpt_text("hi")))],
                              "u", cid="fine")
    path = write_bytes(tmp_path, "c.json", json.dumps([ok, conversation]).encode())
    assert_one_error_line(user.run("sessions", "import", path), 1, "item 2 (conversation c", complaint)
    assert not user.rows("SELECT * FROM sessions")


def zip_file(tmp_path: Path, members: Dict[str, bytes], name: str = "export.zip") -> str:
    import zipfile
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return str(path)


def test_zips_without_conversations_or_damaged(user, tmp_path):
    path = zip_file(tmp_path, {"user.json": b"{}", "chat.html": b"<html>",
                               "inner/conversations.json": b"[]"})
    assert_one_error_line(user.run("sessions", "import", path), 1, "without conversations.json")
    data = (FIXTURES / "chatgpt" / "chatgpt-export.zip").read_bytes()
    for cut in (100, len(data) // 2, len(data) - 30):
        damaged = write_bytes(tmp_path, f"cut{cut}.zip", data[:cut])
        assert_one_error_line(user.run("sessions", "import", damaged), 1, f"cut{cut}.zip: ")
    assert not user.rows("SELECT * FROM sessions")


def test_split_conversation_files_are_read_in_numeric_order(user, tmp_path):
    user.write_config(NO_CLEANUP)

    def conversation(cid: str) -> bytes:
        return json.dumps([chatgpt_conversation(
            [("r", None, None), ("u", "r", chatgpt_message("user", chatgpt_text(cid)))], "u", cid=cid)]).encode()

    path = zip_file(tmp_path, {"conversations-10.json": conversation("c10"),
                               "conversations-2.json": conversation("c2"),
                               "conversations-x.json": b"junk"})
    user.ok("sessions", "import", path)
    assert [c for _, c in user.messages()] == ["c2", "c10"]


@pytest.mark.parametrize("declared", ["over 1 GiB", "over 200 to 1"])
def test_zip_bombs_are_refused_before_unpacking(user, tmp_path, monkeypatch, declared):
    import zipfile
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("conversations.json", b"[]" + b" " * 5000)
        info = archive.infolist()[-1]
        # The directory written on close declares what the test wants, as a
        # crafted archive would: 1.5 GiB from 10 MiB, or 201 times its size.
        if declared == "over 1 GiB":
            info.file_size, info.compress_size = 3 << 29, 10 << 20
        else:
            info.file_size = info.compress_size * 201
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("a member was unpacked"))
    assert_one_error_line(user.run("sessions", "import", str(path)), 1, "conversations.json: refused")


def test_sqlite_files_that_are_not_llm_databases(user, tmp_path):
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE responses (id TEXT)")
    conn.execute("CREATE VIEW conversations AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1"
                 " FROM n) SELECT x AS id FROM n")  # a view is not an llm table (nor run)
    conn.commit()
    conn.close()
    assert_one_error_line(user.run("sessions", "import", str(foreign)), 1,
                          "a SQLite database but not an llm logs database")
    half = write_bytes(tmp_path, "half.db", (FIXTURES / "llm" / "logs-0.13.db").read_bytes()[:20000])
    assert_one_error_line(user.run("sessions", "import", half), 1, "half.db: ")


def test_synapse_databases_are_refused_as_input(user, tmp_path):
    chatted(user, "mine")
    assert_one_error_line(user.run("sessions", "import", str(user.db_path)), 1,
                          "synapse's own database")
    link = tmp_path / "link.db"
    link.symlink_to(user.db_path)
    assert_one_error_line(user.run("sessions", "import", str(link)), 1, "synapse's own database")
    copy = tmp_path / "copy.db"
    user.ok("sessions", "backup", str(copy))
    assert_one_error_line(user.run("sessions", "import", str(copy)), 1, "a Synapse database",
                          "export --all")
    assert len(user.session_ids()) == 1


LLM_NATIVE = """CREATE TABLE threads(id TEXT PRIMARY KEY, name TEXT, tip_message_hash TEXT);
CREATE TABLE turns(id TEXT PRIMARY KEY, thread_id TEXT, parent_message_hash TEXT, tip_message_hash TEXT,
                   model TEXT, input_tokens INTEGER, output_tokens INTEGER, datetime_utc TEXT);
CREATE TABLE messages(hash TEXT PRIMARY KEY, parent_hash TEXT, role TEXT);
CREATE TABLE parts(id INTEGER PRIMARY KEY, message_hash TEXT, position INTEGER, type TEXT, tool_name TEXT,
                   text TEXT, payload TEXT);
CREATE TABLE fragments(id INTEGER PRIMARY KEY, content TEXT);
CREATE TABLE attachments(id TEXT PRIMARY KEY, type TEXT);
INSERT INTO threads VALUES ('t1', 'thread', 'b');
INSERT INTO parts(message_hash, position, type, text) VALUES ('a', 0, 'text', 'q'), ('b', 0, 'text', 'r');
"""
LLM_TURN = "INSERT INTO turns VALUES ('u1', 't1', 'a', 'b', 'm', 1, 2, '2026-01-01T00:00:00+00:00');"


@pytest.mark.parametrize("sql, complaint", [
    ("INSERT INTO messages VALUES ('a', 'b', 'user'), ('b', 'a', 'assistant');" + LLM_TURN, "loops"),
    ("INSERT INTO messages VALUES ('b', 'a', 'assistant');" + LLM_TURN, "is missing"),
    ("INSERT INTO messages VALUES ('a', NULL, 'user'), ('b', NULL, 'assistant');" + LLM_TURN,
     "does not follow from its parent"),
    ("INSERT INTO messages VALUES ('a', NULL, 'user'), ('b', 'a', 'assistant');"
     + LLM_TURN.replace("1, 2", "'many', 2"), "turn u1: 'input_tokens' must be an integer"),
    ("INSERT INTO messages VALUES ('a', NULL, 'user'), ('b', 'a', 'assistant');"
     "UPDATE parts SET text = NULL, payload = '{\"text_ref\": [{\"fragment\": 9}]}' WHERE message_hash = 'a';"
     + LLM_TURN, "does not resolve"),
    ("INSERT INTO messages VALUES ('a', NULL, 'user'), ('b', 'a', 'assistant');"
     + LLM_TURN.replace("2026-01-01T00:00:00+00:00", "soon"), "turn u1: datetime_utc"),
])
def test_hostile_llm_databases(user, tmp_path, sql, complaint):
    path = tmp_path / "logs.db"
    conn = sqlite3.connect(path)
    conn.executescript(LLM_NATIVE + sql)
    conn.close()
    assert_one_error_line(user.run("sessions", "import", str(path)), 1, "logs.db: ", complaint)


def test_stdin_json_zip_and_database_with_private_temporary_copies(user, tmp_path, monkeypatch):
    import tempfile
    user.write_config(NO_CLEANUP)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    copies = []
    for name in ("llm_sessions", "chatgpt_zip_sessions"):
        def spy(path, *args, _real=getattr(synapse, name)):
            copies.append((path, stat.S_IMODE(os.stat(path).st_mode),
                           stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)))
            return _real(path, *args)
        monkeypatch.setattr(synapse, name, spy)
    line = json.dumps(synapse_session("piped")).encode()
    assert text(user.ok("sessions", "import", "-", input=line)) == imported_line("stdin", 1, 1, 0)
    zipped = (FIXTURES / "chatgpt" / "chatgpt-export.zip").read_bytes()
    assert text(user.ok("sessions", "import", "-", input=zipped)) == imported_line("stdin", 6, 26, 0)
    database = (FIXTURES / "llm" / "logs-0.31.1.db").read_bytes()
    assert text(user.ok("sessions", "import", "-", input=database)) == imported_line("stdin", 6, 16, 0)
    assert [(mode, folder) for _, mode, folder in copies] == [(0o600, 0o700)] * 2
    assert all(path.startswith(str(tmp_path / "tmp")) for path, _, _ in copies)
    assert list((tmp_path / "tmp").iterdir()) == []  # removed afterwards
    result = user.run("sessions", "import", "-", input=zipped[:5000])
    assert_one_error_line(result, 1, "stdin: ")
    assert list((tmp_path / "tmp").iterdir()) == []  # also after a failure


def test_reading_and_checking_hold_no_write_lock(user, tmp_path, monkeypatch):
    user.write_config(NO_CLEANUP)
    path = synapse_file(tmp_path, [synapse_session(f"s{i}") for i in range(3)])
    probe = sqlite3.connect(user.db_path, timeout=0, isolation_level=None)
    seen = []
    real = synapse.read_import

    def watched(*args):
        for session in real(*args):
            seen.append(write_lock_taken(probe))
            yield session

    monkeypatch.setattr(synapse, "read_import", watched)
    user.ok("sessions", "import", path)
    probe.close()
    assert seen == [False] * 3


def test_read_only_database_dry_run_reads_import_fails(user, tmp_path):
    user.write_config(NO_CLEANUP)
    chatted(user, "kept")
    path = synapse_file(tmp_path, [synapse_session("new")])
    with read_only(user.db_path):
        dry = user.ok("sessions", "import", "--dry-run", path)
        assert text(dry) == imported_line(path, 1, 1, 0, "Would import")
        assert_one_error_line(user.run("sessions", "import", path), 1, "read-only")
    assert [c for _, c in user.messages()] == ["kept", "kept"]


def test_backup_is_a_private_consistent_database(user, tmp_path):
    chatted(user, "one", "two")
    copy = tmp_path / "backup.db"
    old = os.umask(0o022)
    try:
        result = user.ok("sessions", "backup", str(copy))
    finally:
        os.umask(old)
    assert text(result) == f"Backed up {user.db_path} to {copy}\n"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("backup")) == ["backup.db"]
    integrity(copy)
    assert stored(copy) == stored(user.db_path)
    store = synapse.SqliteStore(str(copy))  # opens as it is
    assert len(store.list_sessions()) == 2
    store.close()


def test_backup_refuses_an_existing_file_or_a_directory(user, tmp_path):
    chatted(user, "one")
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"precious")
    existing.chmod(0o644)
    assert_one_error_line(user.run("sessions", "backup", str(existing)), 1, "already exists")
    assert existing.read_bytes() == b"precious" and stat.S_IMODE(existing.stat().st_mode) == 0o644
    assert_one_error_line(user.run("sessions", "backup", str(tmp_path)), 1, "is a directory")
    assert_one_error_line(user.run("sessions", "backup", str(tmp_path / "no" / "x.db")), 1, "cannot create")


def test_new_commands_in_help(user):
    epilog = text(user.run("--help"))
    for line in ("sessions export --all", "sessions import FILE...", "sessions backup FILE"):
        assert line in epilog
    help_text = text(user.ok("sessions", "import", "--help"))
    assert "--dry-run" in help_text and "--allow-cleanup" in help_text and "ChatGPT" in help_text
    assert "--all" in text(user.ok("sessions", "export", "--help"))
    assert "consistent" in text(user.ok("sessions", "backup", "--help"))


def big_export(path: Path, sessions: int, messages_each: int) -> None:
    """A Synapse JSON Lines file, written fast."""
    stamp = synapse.format_timestamp(NOW)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(sessions):
            out.write(json.dumps({
                "id": fast_id(), "name": None, "provider": "echo", "model": "echo", "system_prompt": None,
                "created_at": stamp, "updated_at": stamp,
                "messages": [{"id": fast_id(), "role": "user", "content": f"message {i}.{j} " * 8,
                              "timestamp": stamp} for j in range(messages_each)]}) + "\n")


def test_export_import_and_backup_in_subprocesses(user, tmp_path):
    user.write_config(NO_CLEANUP)
    chatted(user, "one", "two")
    exported = user.spawn("sessions", "export", "--all")
    assert exported.returncode == 0 and exported.stdout.count(b"\n") == 2
    path = tmp_path / "all.jsonl"
    path.write_bytes(exported.stdout)
    other = machine(tmp_path, "other")
    result = other.spawn("sessions", "import", str(path), str(FIXTURES / "chatgpt" / "chatgpt-export.zip"))
    assert result.returncode == 0, err(result)
    assert text(result).splitlines()[0] == imported_line(str(path), 2, 4, 0).rstrip("\n")
    backup = tmp_path / "backup.db"
    assert other.spawn("sessions", "backup", str(backup)).returncode == 0
    integrity(backup)
    assert len(sqlite3.connect(backup).execute("SELECT id FROM sessions").fetchall()) == 8


def test_ctrl_c_during_a_large_import_leaves_nothing_half_imported(user, tmp_path):
    user.write_config(NO_CLEANUP)
    path = tmp_path / "big.jsonl"
    big_export(path, 1500, 8)
    data = path.read_bytes()
    synapse.SqliteStore(str(user.db_path)).close()
    # While it reads and stages: stdin has given half the file, and no end.
    reading = subprocess.Popen([sys.executable, SYNAPSE, "sessions", "import", "-"], env=user.env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=user.root)
    reading.stdin.write(data[:len(data) // 2])
    reading.stdin.flush()
    reading.send_signal(signal.SIGINT)
    reading.communicate(timeout=60)
    assert reading.returncode == 130
    integrity(user.db_path)
    assert user.rows("SELECT count(*) FROM sessions") == [(0,)]
    # Inside its one transaction.
    probe = sqlite3.connect(user.db_path, timeout=0, isolation_level=None)
    merging = user.popen("sessions", "import", str(path))
    while not write_lock_taken(probe) and merging.poll() is None:
        time.sleep(0.0005)
    merging.send_signal(signal.SIGINT)
    merging.communicate(timeout=60)
    probe.close()
    integrity(user.db_path)
    counts = user.rows("SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM messages)")[0]
    assert (merging.returncode, counts) in ((130, (0, 0)), (0, (1500, 12000)))
    assert merging.returncode == 130, "the signal came after the import's transaction"


def test_an_import_while_another_process_chats_both_land(user, tmp_path):
    user.write_config(NO_CLEANUP)
    path = tmp_path / "big.jsonl"
    big_export(path, 1500, 8)
    synapse.SqliteStore(str(user.db_path)).close()
    probe = sqlite3.connect(user.db_path, timeout=0, isolation_level=None)
    importing = user.popen("sessions", "import", str(path))
    chats = [user.popen("-p", "echo", f"chat {i}") for i in range(2)]
    while not write_lock_taken(probe) and importing.poll() is None:
        time.sleep(0.0005)
    chats.append(user.popen("-p", "echo", "chat during the merge"))
    # A backup meanwhile neither waits for the import nor copies half of it.
    backup = tmp_path / "backup.db"
    assert user.spawn("sessions", "backup", str(backup)).returncode == 0
    probe.close()
    for process in (importing, *chats):
        out, error = process.communicate(timeout=60)
        assert process.returncode == 0, error.decode()
    assert len(user.session_ids()) == 1503
    assert user.rows("SELECT count(*) FROM messages")[0][0] == 12000 + 6
    integrity(user.db_path)
    integrity(backup)
    copied = sqlite3.connect(backup)
    imported = copied.execute("SELECT count(DISTINCT session_id), count(*) FROM messages"
                              " WHERE content LIKE 'message %'").fetchone()
    copied.close()
    assert imported in ((0, 0), (1500, 12000))  # the chats may be anywhere in their turns


def test_export_all_streams_in_flat_memory(user, tmp_path, monkeypatch):
    import tracemalloc
    monkeypatch.setattr(synapse, "EXPORT_BATCH", 1 << 14)  # what is gathered before a write
    many_sessions(user.db_path, 600, 10)
    out = tmp_path / "all.jsonl"
    tracemalloc.start()
    try:
        user.ok("sessions", "export", "--all", "-o", str(out))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.stat().st_size > 1_500_000 and peak < out.stat().st_size / 4, peak


def chatgpt_export(path: Path, conversations: int, messages: int) -> None:
    """A conversations.json of long conversations, written fast."""
    with open(path, "w", encoding="utf-8") as out:
        out.write("[")
        for i in range(conversations):
            mapping = {"root": {"id": "root", "parent": None, "message": None, "children": []}}
            for k in range(messages):
                mapping[f"m{k}"] = {"id": f"m{k}", "parent": f"m{k - 1}" if k else "root", "children": [],
                                    "message": chatgpt_message("user" if k % 2 == 0 else "assistant",
                                                               chatgpt_text(f"message {k} of {i} " * 5),
                                                               create_time=1700000000.5 + k)}
            out.write(("," if i else "") + json.dumps(
                {"id": f"c{i}", "title": "t", "create_time": 1700000000, "update_time": 1700000100,
                 "current_node": f"m{messages - 1}", "mapping": mapping}))
        out.write("]")


def test_a_chatgpt_export_is_read_a_conversation_at_a_time(tmp_path, monkeypatch):
    import tracemalloc
    monkeypatch.setattr(synapse, "IMPORT_CHUNK", 1 << 16)  # what is read at a time
    path = tmp_path / "conversations.json"
    chatgpt_export(path, 150, 40)
    tracemalloc.start()
    try:
        count = sum(1 for _ in synapse.read_import(str(path), "openai", str(tmp_path / "x.db")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 150 and path.stat().st_size > 1_500_000
    assert peak < path.stat().st_size / 3, peak  # the whole file decoded: many times its size


def test_values_split_across_reads_come_out_whole(monkeypatch):
    """Reads of 7 bytes split numbers, escapes and multibyte characters anywhere."""
    monkeypatch.setattr(synapse, "IMPORT_CHUNK", 7)
    values = [{"n": 123456789, "s": "\u00e9\u20ac\U0001f600 \\u00e9 \\ud83d\\ude00", "l": [1.5e10, True, None]}] * 4
    for data in (json.dumps(values, ensure_ascii=False), "\n".join(json.dumps(v) for v in values)):
        stream = io.BytesIO(b"\xef\xbb\xbf" + data.encode())
        got = list(synapse.iter_json_values(iter(lambda: stream.read(synapse.IMPORT_CHUNK), b"")))
        assert [v for _, v in got] == values
    stream = io.BytesIO(b"\n\n" + json.dumps(values[0]).encode() + b"\n\n{}\n")
    assert [w for w, _ in synapse.iter_json_values(iter(lambda: stream.read(7), b""))] == ["line 3", "line 5"]


def test_one_huge_value_is_read_in_linear_time(monkeypatch):
    attempts = []
    decoder = synapse._JSON_DECODER

    class Counting:
        def raw_decode(self, text, index=0):
            attempts.append(index)
            return decoder.raw_decode(text, index)

    monkeypatch.setattr(synapse, "_JSON_DECODER", Counting())
    data = b'[{"messages": "' + b"a" * 8_000_000 + b'"}]'
    stream = io.BytesIO(data)
    [(where, value)] = list(synapse.iter_json_values(iter(lambda: stream.read(1 << 20), b"")))
    assert where == "item 1" and len(value["messages"]) == 8_000_000
    # Each retry doubles what it waits for: a handful of decodes, not one a read.
    assert len(attempts) <= 6, attempts
