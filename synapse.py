"""Synapse: a terminal chat client for large language models that remembers.

``synapse "Hello"`` sends a message to a provider (DeepSeek, Anthropic, OpenAI,
a local Ollama, or any OpenAI-compatible server), streams the reply to the
terminal and stores both sides in a local SQLite database, so that the
conversation can be listed, read, searched, exported and continued later.

The module reads top to bottom in the order data flows:

1. errors, streams    -- one exception hierarchy, the exit statuses, and the
                         two writers every message goes through
2. data types         -- roles, sessions, messages, exchanges, filters
3. configuration      -- the TOML file, providers, roles, prices, the database
4. storage            -- the SessionStore protocol, migrations, SqliteStore
5. providers          -- the event-stream parser, HTTP, OpenAI, Anthropic, echo,
                         stream_chat (the one entry point) and the model lists
6. chat flow          -- a Conversation: store, send (or retry), stream, store;
                         undo and fork; the message from MESSAGE, pipe and files
7. portability        -- the JSON a session is written as, and the readers of
                         Synapse, ChatGPT and llm files to import
8. command line       -- argparse; the chat, ``sessions``, ``usage`` and
                         ``models`` commands; the editor; the REPL
9. main               -- where an exception that ends a command becomes its
                         error line and exit code (a command that goes on
                         past a failed item, or the REPL, reports it itself)

The contract it honours is SPEC.md.  ``requests`` is imported only when a
provider is actually called, so ``--help``, ``--version`` and every
``sessions`` command start fast.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import enum
import itertools
import json
import os
import re
import sqlite3
import stat
import sys
import time
from collections import namedtuple
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
# typing is a tenth of every start and only type checkers need its names here
# (annotations are strings: see the __future__ import); the one runtime use,
# the SessionStore protocol, is made when first asked for (section 4).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import uuid  # itself imported where IDs are made or read (section 2)
    from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional,
                        Sequence, TextIO, Tuple, Union)

    Reply = Union[str, "Usage"]  # what stream_chat yields

__version__ = "0.1.0"

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql")


# ---------------------------------------------------------------------------
# 1. Errors and the standard streams
#
# Every failure a user can meet is one of these, and each class carries the
# exit status it ends the command with.  ``main`` turns them into one line on
# stderr; nothing else decides an exit status.  Everything synapse prints goes
# through ``emit`` (stdout) or ``note`` (stderr).
# ---------------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILURE = 1  # network, provider, storage, a session not found
EXIT_USAGE = 2  # bad flags or message, bad configuration
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT


class SynapseError(Exception):
    """Base of every error synapse reports to the user."""

    exit_code = EXIT_FAILURE


class UsageError(SynapseError):
    """Bad flags, a malformed session ID, an empty message."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A bad config file, unknown provider, missing API key."""


class StorageError(SynapseError):
    """Anything the session store could not do."""


class DatabaseError(StorageError):
    """SQLite failed: locked, read-only, corrupt, not a database."""


class SessionNotFound(StorageError):
    def __init__(self, session_id: object, message: Optional[str] = None):
        self.session_id = session_id
        super().__init__(
            message
            or f"session {session_id} not found; `synapse sessions list` shows the sessions"
        )


class MigrationError(StorageError):
    """schema.sql is unreadable or the database's schema is from the future."""


class InvalidData(StorageError):
    """A stored row that cannot be turned back into a record."""


class ImportFailure(SynapseError):
    """A file ``sessions import`` cannot take (malformed, truncated, hostile or
    foreign): nothing of it is imported.  The message names what is wrong and
    where (a line, a conversation); the command puts the file's name first."""


class AmbiguousSessionID(SynapseError):
    def __init__(self, prefix: str, matches: Sequence[str]):
        listing = "".join(f"\n  {m}" for m in matches)
        super().__init__(
            f"session ID prefix '{prefix}' is ambiguous; give more characters. "
            f"It matches:{listing}"
        )


class ProviderError(SynapseError):
    """The provider could not be reached, refused, or sent a broken reply."""


class OutputError(SynapseError):
    """Standard output is closed, full, or refuses text otherwise."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a closed terminal): the command ends as on Ctrl-C,
    after the partial reply is stored, with status 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def signals_end_the_turn() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) raise Terminated while a chat
    runs, so that the partial reply is stored as on Ctrl-C.  After the first,
    the next ones (a closing terminal sends several) are ignored: the
    command is ending, and one more must not cut short the storing."""
    import signal

    ending = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def terminate(signum: int, frame: object) -> None:
        for each in ending:
            signal.signal(each, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {signum: signal.getsignal(signum) for signum in ending}
    for signum in ending[:2]:
        signal.signal(signum, terminate)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait while the block runs (they come after
    it): a second Ctrl-C must not undo the write that keeps a partial reply."""
    import signal

    try:
        previous = signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    except (AttributeError, ValueError, OSError):  # no such call here, or not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# What a person reads on a terminal must not drive it: C0 and C1 controls
# but newline and tab (ESC above all; CR, DEL too) and the bidirectional
# overrides that reorder a line are shown as escapes (SPEC §8).
_CONTROLS = "[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"


def visible(text: str, stream: Optional[TextIO]) -> str:
    """``text`` as it may reach ``stream``: as it is, unless ``stream`` is a
    terminal, where each control character becomes an escape such as ``\\x1b``."""
    try:
        terminal = stream is not None and stream.isatty()
    except ValueError:  # closed
        terminal = False
    return re.sub(_CONTROLS, _escaped, text) if terminal else text


def _escaped(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def emit(text: str, exact: bool = False) -> None:
    """Write ``text`` to stdout at once.  Unless ``exact`` (JSON, which is safe
    anywhere), a terminal sees control characters as escapes.  A closed, full
    or failing stdout is an OutputError; a reader that went away, BrokenPipeError."""
    stream = sys.stdout
    if stream is None:
        raise OutputError("standard output is closed; nothing could be printed")
    text = text if exact else visible(text, stream)
    try:
        # In pieces: one large write to a pipe whose reader leaves can come
        # back short with no error at all, where the next one fails.
        for start in range(0, len(text), 65536):
            stream.write(text[start:start + 65536])
            stream.flush()
        if not text:
            stream.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot write to standard output: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def note(line: str) -> None:
    """One line on stderr for a person: a warning, an error, a session ID.
    A closed or broken stderr loses the line, never the command's success."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(visible(line, stream) + "\n")
        stream.flush()
    except (OSError, ValueError):
        silence(stream)


def silence(stream: Optional[TextIO]) -> None:
    """Point a failed stream at /dev/null, so that the interpreter's last
    flush of what is still buffered cannot fail (and say so) again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fileno = stream.fileno()  # type: ignore[union-attr]
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fileno)
        os.close(null)


# ---------------------------------------------------------------------------
# 2. Data types
#
# Records are collections.namedtuple classes, as in the standard library:
# immutable, compared by value, and cheap to define (start-up has a budget,
# SPEC §9; the README's design notes say what each choice saves).
# ---------------------------------------------------------------------------


class Role(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"

    def __str__(self) -> str:
        return self.value


MAX_COUNT = 2 ** 63 - 1  # the largest integer SQLite stores: tokens, limits, counts


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_timestamp(moment: datetime) -> str:
    """The stored form: fixed width, UTC, so text order is time order."""
    if moment.tzinfo is None:
        raise InvalidData(f"timestamp {moment!r} has no time zone")
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


# Any ISO 8601 date-time: a space for the T, seconds and fraction optional,
# "Z", an offset or none.  It is rewritten for fromisoformat, which on
# Python 3.9 takes neither "Z" nor fractions other than 3 or 6 digits long.
_ISO_TIME = (r"(?i)(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d(?::\d\d)?)(?:[.,](\d+))?\s*"
             r"(Z|[+-]\d\d(?::?\d\d)?)?")


def iso_datetime(text: str, naive: Optional[timezone] = timezone.utc) -> datetime:
    """``text``, an ISO 8601 date-time, as an aware datetime: one without a
    zone is in ``naive`` (None: the local zone).  ValueError if it is none."""
    match = re.fullmatch(_ISO_TIME, text.strip())
    if match is None:
        raise ValueError(text)
    day, clock, fraction, offset = match.groups()
    if offset:
        offset = offset.upper().replace("Z", "+00:00")
        offset = offset if ":" in offset else f"{offset[:3]}:{offset[3:] or '00'}"
    fraction = f".{fraction[:6].ljust(6, '0')}" if fraction else ""
    moment = datetime.fromisoformat(f"{day}T{clock}{fraction}{offset or ''}")
    if moment.tzinfo is None:
        return moment.replace(tzinfo=naive) if naive else moment.astimezone()
    return moment


def parse_timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise InvalidData(f"stored timestamp {text!r} is not ISO 8601") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# IDs are uuid.UUID objects, but only the functions below, which make or read
# them, import uuid: on Python 3.11 and older it imports platform, a sizeable
# part of what SPEC §9 lets `--version` add to Python's own start.


def new_session_id() -> uuid.UUID:
    """A random UUID (version 4): short prefixes of it are unique."""
    import uuid
    return uuid.uuid4()


def new_message_id() -> uuid.UUID:
    """A time-ordered UUID (version 7 layout).

    Message IDs are never typed by users, and ordering them by time keeps the
    primary-key index append-only, which makes inserts and bulk cleanup cheap.
    Session IDs stay random (``uuid4``) so that short prefixes are unique.
    """
    import uuid
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value &= ~(0xF << 76)
    value |= 0x7 << 76  # version 7
    value &= ~(0x3 << 62)
    value |= 0x2 << 62  # RFC 4122 variant
    return uuid.UUID(int=value)


def parse_uuid(text: str) -> uuid.UUID:
    """A stored ID back as a UUID; ``InvalidData`` if it is not one."""
    import uuid
    try:
        return uuid.UUID(text)
    except (TypeError, ValueError):
        raise InvalidData(f"{text!r} is not a UUID") from None


class Session(namedtuple("Session", "id name provider model system_prompt created_at updated_at"
                                   " forked_from", defaults=(None,))):
    """A conversation: ``id`` a UUID, ``name`` and ``system_prompt`` str or None,
    ``provider`` and ``model`` str, ``created_at`` and ``updated_at`` datetimes,
    ``forked_from`` the UUID of the session it was forked from, or None."""

    __slots__ = ()

    @classmethod
    def new(
        cls,
        provider: str,
        model: str,
        system_prompt: Optional[str] = None,
        name: Optional[str] = None,
    ) -> "Session":
        now = utc_now()
        return cls(new_session_id(), name, provider, model, system_prompt, now, now)


class SessionSummary(namedtuple("SessionSummary", "id name provider model created_at updated_at"
                                                  " message_count preview")):
    """A row of ``sessions list``: a Session's fields but the system prompt,
    ``message_count`` an int, ``preview`` the first user message (str or None)."""

    __slots__ = ()


class StoredMessage(namedtuple("StoredMessage", "id session_id role content timestamp provider model"
                                                " input_tokens output_tokens stop_reason",
                               defaults=(None, None, None, None, None))):
    """One message: ``id`` and ``session_id`` UUIDs, ``role`` a Role,
    ``content`` str, ``timestamp`` a datetime.  A reply also records who wrote
    it (``provider``, ``model``), its ``input_tokens`` and ``output_tokens``
    as reported (int or None) and its ``stop_reason`` (SPEC §11); a user
    message leaves them None."""

    __slots__ = ()

    @classmethod
    def new(cls, session_id: uuid.UUID, role: Role, content: str, **fields: Any) -> "StoredMessage":
        return cls(new_message_id(), session_id, Role(role), content, utc_now(), **fields)


class CleanupResult(namedtuple("CleanupResult", "sessions_deleted by_max_limit by_retention")):
    """How many sessions a cleanup deleted, in all and for each reason (ints)."""

    __slots__ = ()


class SessionConfig(namedtuple("SessionConfig", "max_sessions retention_days auto_cleanup database_url",
                               defaults=(100, 90, True, None))):
    """The ``[session]`` table: ``max_sessions`` and ``retention_days`` ints
    (0 turns each off), ``auto_cleanup`` a bool, ``database_url`` str or None."""

    __slots__ = ()


class ImportCounts(namedtuple("ImportCounts", "sessions messages unchanged")):
    """What importing one file adds (ints): the ``sessions`` it creates or
    gives messages, those ``messages``, and the sessions it finds ``unchanged``
    (already up to date)."""

    __slots__ = ()


class ImportedSession(namedtuple("ImportedSession", "session messages")):
    """A session as read from a file to import: ``session`` its row and
    ``messages`` its messages' rows, tuples in the stored columns' order with
    IDs and times as stored text."""

    __slots__ = ()


class SearchHit(namedtuple("SearchHit", "session snippet")):
    """A session (SessionSummary) that ``sessions search`` found, and where (str)."""

    __slots__ = ()


class SessionFilter(namedtuple("SessionFilter", "since until provider model role",
                               defaults=(None, None, None, None, None))):
    """What a listing is narrowed to (SPEC §3, §11): ``since`` (inclusive) and
    ``until`` (exclusive) UTC datetimes, ``provider`` and ``model`` names, and
    for search the ``role`` of the matching message; None is no limit."""

    __slots__ = ()


def exchanges_start(roles: Sequence[Role], count: int) -> int:
    """Where the last ``count`` exchanges begin among a session's messages
    (given by their roles, in order).  An exchange is a user message and every
    message after it up to the next user message (SPEC §10); what comes
    before the first user message belongs to none and is never counted."""
    starts = [i for i, role in enumerate(roles) if role == Role.USER]
    if count <= 0 or not starts:
        return len(roles)
    return starts[-min(count, len(starts))]


PREVIEW_LENGTH = 50


def shorten(text: str, limit: int) -> str:
    """Whitespace runs folded to one space; past ``limit`` characters, cut to
    ``limit - 1`` of them and an ellipsis."""
    folded = " ".join(text.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "\u2026"


# ---------------------------------------------------------------------------
# 3. Configuration
#
# Reads the TOML file once into an immutable Config; resolves which provider,
# model, key and database a command uses.  Never touches the network or the
# database.
# ---------------------------------------------------------------------------


class ProviderSettings(namedtuple("ProviderSettings", "name kind base_url model api_key_env api_key"
                                                      " needs_key max_tokens_field stream_usage",
                                  defaults=(None, None, False, "max_tokens", False))):
    """One provider as built in and as the config file amends it.

    ``kind`` is "openai", "anthropic" or "echo"; ``base_url``, ``api_key_env``
    and ``api_key`` are str or None; ``needs_key`` is a bool.  The built-in
    openai provider's ``max_tokens_field`` is max_completion_tokens: newer
    OpenAI models reject max_tokens, while other compatible servers only know it.
    ``stream_usage``: whether a streamed request asks for token counts
    (``stream_options``), which some compatible servers refuse.
    """

    __slots__ = ()


BUILTIN_PROVIDERS: Mapping[str, ProviderSettings] = MappingProxyType({
    p.name: p
    for p in (
        ProviderSettings(
            "deepseek", "openai", "https://api.deepseek.com", "deepseek-chat",
            "DEEPSEEK_API_KEY", needs_key=True, stream_usage=True,
        ),
        ProviderSettings(
            "openai", "openai", "https://api.openai.com/v1", "gpt-4o-mini",
            "OPENAI_API_KEY", needs_key=True, max_tokens_field="max_completion_tokens",
            stream_usage=True,
        ),
        ProviderSettings(
            "anthropic", "anthropic", "https://api.anthropic.com", "claude-sonnet-4-5",
            "ANTHROPIC_API_KEY", needs_key=True,
        ),
        ProviderSettings("ollama", "openai", "http://localhost:11434/v1", "llama3.2",
                         stream_usage=True),
        ProviderSettings("echo", "echo", None, "echo"),
    )
})


_CONFIG_DEFAULTS: Mapping[str, object] = MappingProxyType({
    "path": None,  # the file read, if any
    "provider": "deepseek",
    "model": None,  # the provider's own model when None
    "api_key": None,
    "base_url": None,
    "max_tokens": 4096,
    "temperature": None,
    "timeout": 600.0,  # seconds between bytes of a reply
    "system_prompt": None,
    "providers": MappingProxyType({}),  # [providers.NAME] tables, as read
    "session": SessionConfig(),
    "prices": MappingProxyType({}),  # model: Price, from the [prices."MODEL"] tables
    "roles": MappingProxyType({}),  # name: RoleSettings, from the [roles.NAME] tables
})


class Config(namedtuple("Config", _CONFIG_DEFAULTS, defaults=_CONFIG_DEFAULTS.values())):
    """The configuration in force: the file's values over the defaults above."""

    __slots__ = ()


class Provider(namedtuple("Provider", "name kind base_url model api_key max_tokens_field stream_usage",
                          defaults=("max_tokens", False))):
    """The provider in force for one turn: everything a client needs
    (``base_url`` and ``api_key`` may be None)."""

    __slots__ = ()


def config_home(env: Mapping[str, str]) -> str:
    xdg = env.get("XDG_CONFIG_HOME")
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(xdg or os.path.join(home, ".config"), "synapse")


def warn(message: str) -> None:
    note(f"synapse: warning: {message}")


# The keys a config file may hold, with the types they must have.
_NUMBER = (int, float)
TOP_LEVEL_KEYS: Mapping[str, tuple] = MappingProxyType({
    "provider": (str,),
    "model": (str,),
    "api_key": (str,),
    "base_url": (str,),
    "max_tokens": (int,),
    "temperature": _NUMBER,
    "timeout": _NUMBER,
    "system_prompt": (str,),
    "system_prompt_file": (str,),
    "providers": (dict,),
    "session": (dict,),
    "prices": (dict,),
    "roles": (dict,),
})
PROVIDER_KEYS: Mapping[str, tuple] = MappingProxyType({
    "kind": (str,),
    "base_url": (str,),
    "api_key": (str,),
    "api_key_env": (str,),
    "model": (str,),
    "stream_usage": (bool,),
})
PRICE_KEYS: Mapping[str, tuple] = MappingProxyType({"input": _NUMBER, "output": _NUMBER})
ROLE_KEYS: Mapping[str, tuple] = MappingProxyType({
    "system_prompt": (str,),
    "system_prompt_file": (str,),
    "provider": (str,),
    "model": (str,),
    "temperature": _NUMBER,
})
SESSION_KEYS: Mapping[str, tuple] = MappingProxyType({
    "database_url": (str,),
    "max_sessions": (int,),
    "retention_days": (int,),
    "auto_cleanup": (bool,),
})
_TYPE_NAMES = MappingProxyType({str: "a string", int: "an integer", float: "a number",
                               bool: "true or false", dict: "a table"})
# The numbers a config may hold, each with the test it must pass (NaN fails
# every comparison, infinity the upper bounds) and what the error says.
NUMBER_RULES: Mapping[str, Tuple[Callable[[Any], bool], str]] = MappingProxyType({
    "max_tokens": (lambda v: v >= 1, "1 or more"),
    "temperature": (lambda v: 0 <= v <= 2, "a number from 0 to 2"),
    "timeout": (lambda v: 0 < v <= 86400, "more than 0 and at most 86400 (seconds)"),
    "max_sessions": (lambda v: v >= 0, "0 or more"),
    "input": (lambda v: 0 <= v <= 1e6, "a number from 0 to 1000000 (per million tokens)"),
    "output": (lambda v: 0 <= v <= 1e6, "a number from 0 to 1000000 (per million tokens)"),
    "retention_days": (lambda v: 0 <= v <= 36500, "from 0 to 36500 (days)"),
})


def _checked_table(table: Mapping[str, object], schema: Mapping[str, tuple],
                   where: str, path: str) -> Dict[str, object]:
    """Keep known keys of the right type; warn about unknown ones."""
    checked: Dict[str, object] = {}
    for key, value in table.items():
        name = f"{where}{key}"
        if key not in schema:
            warn(f"unknown key '{name}' in {path} (ignored)")
            continue
        types = schema[key]
        # bool is an int to Python, never to a config file.
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            wanted = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ConfigError(f"{path}: '{name}' must be {wanted}, not {value!r}")
        rule = NUMBER_RULES.get(key)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{path}: '{name}' must be {rule[1]}, not {value!r}")
        checked[key] = value
    return checked


def find_config_path(explicit: Optional[str], env: Mapping[str, str]) -> Tuple[str, bool]:
    """The config file in force and whether the user named it."""
    if explicit is not None:
        return os.path.expanduser(explicit), True
    if env.get("SYNAPSE_CONFIG"):
        return os.path.expanduser(env["SYNAPSE_CONFIG"]), True
    return os.path.join(config_home(env), "config.toml"), False


def load_config(explicit: Optional[str] = None,
                env: Optional[Mapping[str, str]] = None) -> Config:
    """Read and validate the config file; defaults when there is none."""
    path, named = find_config_path(explicit, os.environ if env is None else env)
    data = _read_toml(path, named)
    if data is None:
        return Config()
    top = _checked_table(data, TOP_LEVEL_KEYS, "", path)
    session = SessionConfig(**_checked_table(top.pop("session", {}), SESSION_KEYS,  # type: ignore[arg-type]
                                             "session.", path))
    providers = _provider_tables(top.pop("providers", {}), path)
    prices = _price_tables(top.pop("prices", {}), path)
    roles = _role_tables(top.pop("roles", {}), path)
    prompt_file = top.pop("system_prompt_file", None)
    if prompt_file is not None and "system_prompt" not in top:
        top["system_prompt"] = _read_prompt_file(path, str(prompt_file), "system_prompt_file")

    holds_key = "api_key" in top or any("api_key" in p for p in providers.values())
    if holds_key and os.name == "posix" and os.stat(path).st_mode & 0o077:
        warn(f"{path} holds an API key and can be read by others; run: chmod 600 {path}")

    numbers = {k: float(top[k]) for k in ("temperature", "timeout") if k in top}
    return Config(path=path, **{**top, **numbers}, providers=providers,  # type: ignore[arg-type]
                  session=session, prices=prices, roles=roles)


def _read_toml(path: str, named: bool) -> Optional[Dict[str, Any]]:
    """The file's tables, or None when there is no file at the default place."""
    try:
        with open(path, "rb") as config_file:
            raw = config_file.read()
    except FileNotFoundError:
        if named:
            raise ConfigError(f"config file {path} does not exist") from None
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised by CI on Python 3.9
        import tomli as tomllib
    try:
        return tomllib.loads(raw.decode("utf-8").lstrip("\ufeff"))  # Notepad's BOM is harmless
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _provider_tables(tables: Mapping[str, object], path: str) -> Dict[str, Mapping[str, object]]:
    providers: Dict[str, Mapping[str, object]] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: 'providers.{name}' must be a table")
        entry = _checked_table(table, PROVIDER_KEYS, f"providers.{name}.", path)
        if entry.get("kind", "openai") not in ("openai", "anthropic"):
            raise ConfigError(
                f"{path}: 'providers.{name}.kind' must be \"openai\" or \"anthropic\"")
        providers[name] = entry
    return providers


class Price(namedtuple("Price", "input output")):
    """What a model costs per million input and output tokens (floats), in
    whatever currency the user writes prices in."""

    __slots__ = ()


def _price_tables(tables: Mapping[str, object], path: str) -> Dict[str, Price]:
    prices: Dict[str, Price] = {}
    for model, table in tables.items():
        where = f"prices.{json.dumps(model)}"
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{where}' must be a table with input and output")
        entry = _checked_table(table, PRICE_KEYS, f"{where}.", path)
        missing = [k for k in PRICE_KEYS if k not in entry]
        if missing:
            raise ConfigError(f"{path}: '{where}' needs {' and '.join(missing)} (per million tokens)")
        prices[model] = Price(float(entry["input"]), float(entry["output"]))  # type: ignore[arg-type]
    return prices


class RoleSettings(namedtuple("RoleSettings", "system_prompt system_prompt_file provider model"
                                              " temperature config_path")):
    """A ``[roles.NAME]`` table (``--role NAME``): each field str, a float
    ``temperature``, or None; the prompt file is read when the role is used."""

    __slots__ = ()

    def prompt(self) -> Optional[str]:
        """The role's system prompt: ``system_prompt``, else its file's text."""
        if self.system_prompt is not None or self.system_prompt_file is None:
            return self.system_prompt
        return _read_prompt_file(self.config_path, self.system_prompt_file, "system_prompt_file")


def _role_tables(tables: Mapping[str, object], path: str) -> Dict[str, RoleSettings]:
    roles: Dict[str, RoleSettings] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: 'roles.{name}' must be a table")
        entry = _checked_table(table, ROLE_KEYS, f"roles.{name}.", path)
        if "temperature" in entry:
            entry["temperature"] = float(entry["temperature"])  # type: ignore[arg-type]
        roles[name] = RoleSettings(**{k: entry.get(k) for k in ROLE_KEYS}, config_path=path)
    return roles


def _read_prompt_file(config_path: str, name: str, key: str) -> str:
    """A prompt file's text, stripped; ``name`` is relative to the config file."""
    prompt_path = os.path.join(os.path.dirname(config_path), os.path.expanduser(name))
    try:
        with open(prompt_path, encoding="utf-8") as prompt:
            return prompt.read().strip()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name, or not UTF-8
        raise ConfigError(f"{config_path}: '{key}' {prompt_path} cannot be read: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def provider_settings(config: Config, name: str) -> ProviderSettings:
    """A built-in or ``[providers.X]`` provider with the config's amendments."""
    table = dict(config.providers.get(name, {}))
    if name == config.provider:
        # Top-level api_key/base_url/model belong to the top-level provider.
        for key in ("api_key", "base_url", "model"):
            if getattr(config, key) is not None:
                table[key] = getattr(config, key)
    builtin = BUILTIN_PROVIDERS.get(name)
    if builtin is None:
        if name not in config.providers:
            known = ", ".join(sorted({*BUILTIN_PROVIDERS, *config.providers}))
            raise ConfigError(f"unknown provider '{name}'; choose one of: {known}")
        if "base_url" not in table:
            raise ConfigError(f"{config.path}: [providers.{name}] needs a base_url")
        key_env = table.get("api_key_env")
        builtin = ProviderSettings(
            name, str(table.get("kind", "openai")), None, "",
            key_env,  # type: ignore[arg-type]
            needs_key=bool(key_env),
        )
    return builtin._replace(**{k: v for k, v in table.items() if k != "kind"})


def resolve_provider(config: Config, name: Optional[str], model: Optional[str],
                     env: Optional[Mapping[str, str]] = None) -> Provider:
    """The provider for this turn; a missing API key is a ConfigError."""
    env = os.environ if env is None else env
    settings = provider_settings(config, name or config.provider)
    chosen_model = model or settings.model
    if not chosen_model:
        raise ConfigError(
            f"no model for provider '{settings.name}'; pass -m MODEL or set "
            f"'model' in [providers.{settings.name}] of {config.path}"
        )
    from_env = env.get(settings.api_key_env) if settings.api_key_env else None
    key = from_env or settings.api_key
    where = config.path or find_config_path(None, env)[0]
    if settings.needs_key and not key:
        raise ConfigError(
            f"no API key for {settings.name}: set {settings.api_key_env}, or api_key "
            f"under [providers.{settings.name}] in {where}"
        )
    if key and not re.fullmatch(r"[\x21-\x7e]+", key):
        source = settings.api_key_env if from_env else f"api_key in {where}"
        raise ConfigError(f"the API key for {settings.name} ({source}) holds whitespace or "
                          f"characters an HTTP header cannot carry; a pasted newline is the "
                          f"usual cause")
    if settings.base_url is not None:
        _check_base_url(settings.base_url, settings.name, where)
    return Provider(settings.name, settings.kind, settings.base_url, chosen_model, key,
                    settings.max_tokens_field, settings.stream_usage)


def _check_base_url(url: str, provider: str, where: str) -> None:
    from urllib.parse import urlsplit  # loaded with requests anyway

    try:
        parts = urlsplit(url)
        good = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # a bad port raises too
    except ValueError:
        good = False
    if not good:
        raise ConfigError(f"the base_url of {provider} in {where} must be an http:// or "
                          f"https:// URL with a host, such as https://api.example.com/v1")


def known_secrets(config: Optional[Config], env: Mapping[str, str]) -> List[str]:
    """Every API key synapse might hold, and the user and password inside a
    base_url, so that no output can show one."""
    names = {p.api_key_env for p in BUILTIN_PROVIDERS.values() if p.api_key_env}
    keys: List[Optional[str]] = []
    urls: List[object] = []
    if config is not None:
        keys.append(config.api_key)
        urls.append(config.base_url)
        for table in config.providers.values():
            keys.append(table.get("api_key"))  # type: ignore[arg-type]
            names.add(table.get("api_key_env"))  # type: ignore[arg-type]
            urls.append(table.get("base_url"))
    keys.extend(env.get(n) for n in names if n)
    for url in urls:
        userinfo = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@", str(url or ""))
        if userinfo:
            keys += [userinfo.group(1), userinfo.group(1).partition(":")[2]]
    return sorted({k for k in keys if k and len(k) >= 4}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


def database_path(url: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                  configured: Optional[str] = None) -> str:
    """The database file: ``url`` if given, else ``SYNAPSE_DATABASE_URL``, else
    the config's ``configured`` URL, else the default place.

    Accepted: a path, ``sqlite:PATH``, ``sqlite://PATH``, ``sqlite:///ABS``,
    each with ``~`` expanded.  Anything else with a scheme is refused.
    """
    env = os.environ if env is None else env
    url = (url or env.get("SYNAPSE_DATABASE_URL", "").strip() or configured or "").strip()
    if not url:
        return os.path.join(config_home(env), "sessions.db")
    if "\0" in url:
        raise ConfigError(f"database URL {url!r} holds a NUL character")
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if path.startswith("//"):
            path = path[2:]  # sqlite://rel/path and sqlite:///abs/path
    elif re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", url):  # one letter is a Windows drive
        scheme = url.split(":", 1)[0]
        raise ConfigError(
            f"database URL scheme '{scheme}' is not supported; only SQLite is "
            f"(a path or sqlite:PATH)"
        )
    else:
        path = url
    if not path or path == ":memory:":  # SQLite's name for a database kept nowhere
        raise ConfigError(f"database URL '{url}' names no file")
    return os.path.expanduser(path)


# ---------------------------------------------------------------------------
# 4. Storage
#
# The SessionStore protocol, the migration runner that reads schema.sql, and
# SqliteStore.  It takes and returns records (section 2) -- rows, for export,
# import and backup, which move whole histories -- and raises StorageError;
# it knows nothing of the command line and prints nothing.
# ---------------------------------------------------------------------------


def _session_store_protocol() -> type:
    """The SessionStore protocol (SPEC §4): what a store of sessions must do,
    as a ``typing.Protocol``, made on first use (``synapse.SessionStore``)
    because typing costs every start a tenth and no command needs the class."""
    from typing import Protocol

    class SessionStore(Protocol):
        """Where sessions and their messages are kept (SPEC §4)."""

        def create_session(self, session: Session, messages: Sequence[StoredMessage] = ()) -> None:
            """Store a new session, with its first ``messages``, in one transaction."""

        def get_session(self, session_id: uuid.UUID) -> Optional[Session]:
            """The session, or None."""

        def list_sessions(self, limit: Optional[int] = None,
                          where: SessionFilter = SessionFilter()) -> List[SessionSummary]:
            """Summaries, most recently updated first (``where`` filters them)."""

        def touch_session(self, session_id: uuid.UUID) -> None:
            """Set ``updated_at`` to now; SessionNotFound if absent."""

        def delete_session(self, session_id: uuid.UUID) -> bool:
            """Delete the session and its messages; True if it existed."""

        def add_message(self, message: StoredMessage) -> None:
            """Append a message and touch its session; SessionNotFound if absent."""

        def get_messages(self, session_id: uuid.UUID) -> List[StoredMessage]:
            """The session's messages in the order they were added."""

        def cleanup(self, config: SessionConfig,
                    protect: Optional[uuid.UUID] = None) -> CleanupResult:
            """Delete what retention and max_sessions doom, sparing ``protect``."""

    SessionStore.__qualname__ = "SessionStore"
    return SessionStore


def __getattr__(name: str) -> Any:
    """Module attributes made on first use (PEP 562): only SessionStore."""
    if name == "SessionStore":
        globals()[name] = _session_store_protocol()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Migration(namedtuple("Migration", "number title statements")):
    """One numbered step of schema.sql: its ``statements`` are a tuple of str."""

    __slots__ = ()


_MIGRATION_HEADER = r"^--\s*migration:\s*(\d+)\s*(.*?)\s*$"


def parse_migrations(text: str) -> List[Migration]:
    """Split schema.sql at its ``-- migration: N title`` lines."""
    found: List[Tuple[int, str, List[str]]] = []
    for line in text.splitlines():
        header = re.match(_MIGRATION_HEADER, line)
        if header:
            found.append((int(header.group(1)), header.group(2), []))
        elif found:
            found[-1][2].append(line)
        elif line.strip() and not line.lstrip().startswith("--"):
            raise MigrationError("schema.sql has SQL before its first migration header")
    migrations = []
    for expected, (number, title, lines) in enumerate(found, start=1):
        if number != expected:
            raise MigrationError(f"schema.sql: migration {number} found where {expected} belongs")
        migrations.append(Migration(number, title, tuple(_split_statements(lines))))
    if not migrations:
        raise MigrationError("schema.sql holds no migrations")
    return migrations


def _split_statements(lines: Iterable[str]) -> Iterator[str]:
    # sqlite3.complete_statement knows that a trigger's body holds semicolons.
    pending = ""
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line + "\n"
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise MigrationError(f"schema.sql: unterminated statement: {pending.strip()[:60]}")


def load_migrations(path: str = SCHEMA_PATH) -> List[Migration]:
    try:
        with open(path, encoding="utf-8") as schema:
            return parse_migrations(schema.read())
    except OSError as exc:
        raise MigrationError(
            f"cannot read the schema {path}: {exc.strerror or exc}; reinstall synapse"
        ) from None


def describe_sqlite_error(exc: BaseException, path: str) -> str:
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return f"database {path} is busy (another synapse is writing); try again"
    if "readonly" in lowered or "read-only" in lowered:
        return f"database {path} is read-only; check the permissions of the file and its folder"
    if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        return (f"database {path} is damaged or not a synapse database ({text}); "
                f"move it aside to start afresh")
    if "unable to open" in lowered:
        return f"cannot open database {path}; check that its folder exists and is writable"
    if "disk" in lowered and "full" in lowered:
        return f"the disk holding {path} is full; free some space"
    return f"database {path}: {text}"


SQLITE_MAGIC = b"SQLite format 3\x00"
# Seconds a write waits for another's lock: an import's or a large cleanup's
# one transaction may hold it that long (SPEC §4).
BUSY_TIMEOUT = 60.0
# Pages of a new database.  Larger pages than SQLite's 4 KiB mean fewer page
# reads and WAL frames when much is deleted at once (a large cleanup), and
# cost an insert nothing worth measuring (the README has the figures).
NEW_DATABASE_PAGE_SIZE = 16384


def create_private_file(path: str) -> int:
    """Create ``path``, which must not exist (FileExistsError), readable and
    writable by its owner alone whatever the umask: it will hold conversations.
    Returns its descriptor, open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _prepare_database_file(path: str) -> None:
    """Refuse what is not SQLite; create the file 0600 in a 0700 folder."""
    if os.path.isdir(path):
        raise DatabaseError(f"database path {path} is a directory; point database_url at a file")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would hang us
        raise DatabaseError(f"database path {path} is not a regular file; point database_url at one")
    try:
        with open(path, "rb") as existing:
            head = existing.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        head = None
    except OSError as exc:
        raise DatabaseError(f"cannot read database {path}: {exc.strerror or exc}") from None
    if head is not None:
        if head and head != SQLITE_MAGIC:
            raise DatabaseError(
                f"{path} is not a SQLite database; refusing to touch it "
                f"(set SYNAPSE_DATABASE_URL or [session] database_url to another file)"
            )
        if not head:  # an empty file becomes a database: a private one
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700, exist_ok=True)
            os.chmod(folder, 0o700)
        os.close(create_private_file(path))
    except FileExistsError:
        return  # another synapse created it a moment ago
    except OSError as exc:
        raise DatabaseError(f"cannot create database {path}: {exc.strerror or exc}") from None


def connect(path: str, newest_version: Optional[int] = None) -> sqlite3.Connection:
    """Open ``path`` with the pragmas every synapse connection uses.

    Transactions are explicit (``isolation_level=None``): writers take
    ``BEGIN IMMEDIATE`` so that concurrent processes queue on the busy
    timeout instead of failing to upgrade a read lock.  A database whose
    schema is newer than ``newest_version`` is refused before anything (even
    the switch to WAL) writes to it.
    """
    _prepare_database_file(path)
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise DatabaseError(describe_sqlite_error(exc, path)) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT * 1000:.0f}")
        conn.execute("PRAGMA foreign_keys = ON")
        # Read the version before anything can write to the file: a database
        # from a newer synapse is refused untouched.
        version = _schema_version(conn, sys.maxsize if newest_version is None
                                  else newest_version, f"database {path}")
        if version == 0:
            # The version and the tables read together, in one snapshot: another
            # synapse may be making this same new database right now.
            version, names = conn.execute(
                "SELECT (SELECT user_version FROM pragma_user_version), (SELECT group_concat(name,"
                " ', ') FROM sqlite_master WHERE type = 'table')").fetchone()
            tables = names.split(", ") if names and version == 0 else []
            if tables:  # another program's database: synapse's own always has a version
                raise DatabaseError(
                    f"{path} is another program's SQLite database (it holds {', '.join(tables[:5])});"
                    f" refusing to touch it (set SYNAPSE_DATABASE_URL or [session] database_url"
                    f" to another file)")
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                conn.execute(f"PRAGMA page_size = {NEW_DATABASE_PAGE_SIZE}")
        _switch_to_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        # Zero deleted text inside the pages being written anyway, on every
        # platform (builds differ: Debian's zeroes every freed page, which
        # writes each of them once more).
        conn.execute("PRAGMA secure_delete = FAST")
    except sqlite3.Error as exc:
        conn.close()
        raise DatabaseError(describe_sqlite_error(exc, path)) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _switch_to_wal(conn: sqlite3.Connection, patience: float = 10.0) -> None:
    """``journal_mode = WAL``, retried while another process switches a new database.

    SQLite answers "database is locked" to that switch at once, without
    waiting out the busy timeout, when several processes open a brand-new
    database together (seen with 8 at once on a loaded machine).
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _roll_back(conn: sqlite3.Connection) -> None:
    """End a failed transaction; SQLite may have ended it already (a full
    disk does), and then the error worth telling is the one that came first."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def apply_migrations(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> int:
    """Apply each migration above ``user_version``, each in its own transaction.

    Returns the version the database is at afterwards.  Safe to run from many
    processes at once: the version is re-read under the write lock.
    """
    latest = migrations[-1].number if migrations else 0
    version = _schema_version(conn, latest)
    for migration in migrations:
        if migration.number <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if migration.number > version:
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {migration.number:d}")
                version = migration.number
            conn.execute("COMMIT")
        except BaseException as exc:
            _roll_back(conn)
            if isinstance(exc, sqlite3.Error):
                raise MigrationError(
                    f"migration {migration.number} ({migration.title}) failed: {exc}"
                ) from None
            raise
    return version


def _schema_version(conn: sqlite3.Connection, newest: int, path: str = "database") -> int:
    """``user_version``; a database from a newer synapse is refused."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > newest:
        raise MigrationError(f"{path} has schema version {version}, newer than this synapse "
                             f"knows ({newest}); upgrade synapse")
    return version


def _key(value: object) -> str:
    """An ID as SQL binds it: the hyphenated lower-case text of its UUID."""
    return str(value if not isinstance(value, str) else parse_uuid(value))


def _texts(row: Sequence, *at: int) -> Sequence:
    """``row``, once the columns ``at`` hold text or NULL (another program may
    have stored a BLOB or a number there)."""
    for i in at:
        if row[i] is not None and not isinstance(row[i], str):
            raise InvalidData(f"a row ({row[0]!r}) holds {type(row[i]).__name__} where text "
                              f"belongs; was the database written by another program?")
    return row


def _session_from_row(row: Sequence) -> Session:
    row = _texts(row, 1, 2, 3, 4)
    return Session(parse_uuid(row[0]), row[1], row[2], row[3], row[4],
                   parse_timestamp(row[5]), parse_timestamp(row[6]),
                   parse_uuid(row[7]) if row[7] is not None else None)


def _summary_from_row(row: Sequence) -> SessionSummary:
    row = _texts(row, 1, 2, 3, 7)
    preview = shorten(row[7], PREVIEW_LENGTH) if row[7] is not None else None
    return SessionSummary(parse_uuid(row[0]), row[1], row[2], row[3],
                          parse_timestamp(row[4]), parse_timestamp(row[5]), row[6], preview)


_OPTIONAL_TEXT = frozenset({str, type(None)})
_OPTIONAL_INT = frozenset({int, type(None)})


def _message_from_row(row: Sequence, session_id: Optional[uuid.UUID] = None) -> StoredMessage:
    """A message row as a record; ``session_id``, when the caller has it
    parsed already, saves a UUID per row (a long session has thousands)."""
    if type(row[3]) is not str or not {type(row[5]), type(row[6]), type(row[9])} <= _OPTIONAL_TEXT:
        _texts(row, 3, 5, 6, 9)  # which one, in the error
    if not {type(row[7]), type(row[8])} <= _OPTIONAL_INT:
        raise InvalidData(f"message {row[0]!r} holds token counts that are not numbers; was the "
                          f"database written by another program?")
    try:
        role = Role(row[2])
    except ValueError:
        raise InvalidData(f"message {row[0]} has unknown role {row[2]!r}") from None
    return StoredMessage(parse_uuid(row[0]), session_id or parse_uuid(row[1]), role, row[3],
                         parse_timestamp(row[4]), *row[5:])


# The summary columns shared by listing and search.  The preview reads only the
# head of the first user message: a 10 MB paste need not be loaded to show 50
# characters of it.
_SUMMARY_COLUMNS = """
    s.id, s.name, s.provider, s.model, s.created_at, s.updated_at,
    (SELECT count(*) FROM messages m WHERE m.session_id = s.id),
    (SELECT substr(m.content, 1, 2000) FROM messages m
      WHERE m.session_id = s.id AND m.role = 'user' ORDER BY m.rowid LIMIT 1)
"""
# The stored columns, in the order of the records' fields.  They are also the
# keys of ``show --json``'s objects (a message's without its session_id),
# which ``export --all`` writes straight from the rows and import reads back.
SESSION_FIELDS = ("id", "name", "provider", "model", "system_prompt", "created_at", "updated_at",
                  "forked_from")
MESSAGE_FIELDS = ("id", "role", "content", "timestamp", "provider", "model", "input_tokens",
                  "output_tokens", "stop_reason")
_SESSION_COLUMNS = ", ".join(SESSION_FIELDS)
_MESSAGE_COLUMNS = ", ".join(("id", "session_id", *MESSAGE_FIELDS[1:]))


def _session_row(session: Session) -> tuple:
    """A Session as stored: in _SESSION_COLUMNS order, IDs and times as text."""
    return (_key(session.id), session.name, session.provider, session.model, session.system_prompt,
            format_timestamp(session.created_at), format_timestamp(session.updated_at),
            _key(session.forked_from) if session.forked_from is not None else None)


def _message_row(message: StoredMessage) -> tuple:
    """A StoredMessage as stored, in _MESSAGE_COLUMNS order."""
    return (_key(message.id), _key(message.session_id), Role(message.role).value, message.content,
            format_timestamp(message.timestamp), *message[5:])


def _touch(conn: sqlite3.Connection, session_key: str, **columns: str) -> None:
    """Set a session's ``updated_at`` to now (and ``columns``); SessionNotFound if absent."""
    assignments = "".join(f", {name} = ?" for name in columns)
    cursor = conn.execute(f"UPDATE sessions SET updated_at = ?{assignments} WHERE id = ?",
                          (format_timestamp(utc_now()), *columns.values(), session_key))
    if cursor.rowcount == 0:
        raise SessionNotFound(session_key)


def _insert_messages(conn: sqlite3.Connection, messages: Iterable[StoredMessage]) -> None:
    conn.executemany(
        f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [_message_row(m) for m in messages])


# A search word common in a long history matches thousands of sessions; a
# terminal wants the newest few.
SEARCH_DEFAULT_LIMIT = 50
# The work (thousands of SQLite steps: some thousands of sessions) a limited
# search spends walking sessions newest first before it falls back to one
# scan of every message.
SEARCH_WALK_BUDGET = 300


def _casefold_contains(content: Optional[str], needle: str) -> bool:
    return content is not None and needle in content.casefold()


def _filter_sql(where: SessionFilter, time_column: str, table: str) -> Tuple[str, Dict[str, object]]:
    """``where`` as SQL conditions (each after an AND) on ``time_column`` and
    the provider and model of ``table``, and their parameters."""
    conditions, params = "", {}
    for name, column, value, operator in (
            ("since", time_column, where.since, ">="), ("until", time_column, where.until, "<"),
            ("provider", f"{table}.provider", where.provider, "="),
            ("model", f"{table}.model", where.model, "=")):
        if value is not None:
            conditions += f" AND {column} {operator} :{name}"
            params[name] = format_timestamp(value) if isinstance(value, datetime) else value
    return conditions, params


# How ``synapse usage --by`` groups replies: local days and months, as the
# user's clock reads them (SQLite's localtime follows TZ, as Python's does).
USAGE_GROUPS: Mapping[str, str] = MappingProxyType({
    "model": "m.model",
    "provider": "m.provider",
    "day": "date(m.timestamp, 'localtime')",
    "month": "strftime('%Y-%m', m.timestamp, 'localtime')",
    "session": "m.session_id",
})


def _cleanup_choices(conn: sqlite3.Connection, config: SessionConfig, protect: Optional[uuid.UUID],
                     sessions: str = "sessions"
                     ) -> Tuple[int, List[Tuple[str, str, Mapping[str, object]]]]:
    """How many sessions there are, and the queries that choose what a cleanup
    deletes: (reason, a SELECT of the doomed sessions' ``id, updated_at``, its
    parameters).  ``sessions`` names the table to choose from: the import's
    guard chooses from the sessions as an import would leave them."""
    cutoff = ""  # every stored timestamp sorts after it
    if config.retention_days > 0:
        cutoff = format_timestamp(utc_now() - timedelta(days=config.retention_days))
    params: Dict[str, object] = {"keep": _key(protect) if protect is not None else "",
                                 "cutoff": cutoff}
    past_retention = f"SELECT id, updated_at FROM {sessions} WHERE updated_at < :cutoff AND id != :keep"
    choices = [("retention", past_retention, params)]
    total = conn.execute(f"SELECT count(*) FROM {sessions}").fetchone()[0]
    if config.max_sessions > 0:
        expired = conn.execute(f"SELECT count(*) FROM ({past_retention})", params).fetchone()[0]
        excess = total - expired - config.max_sessions
        if excess > 0:
            choices.append(("max", f"SELECT id, updated_at FROM {sessions}"
                            " WHERE updated_at >= :cutoff AND id != :keep"
                            " ORDER BY updated_at, created_at, rowid LIMIT :excess",
                            {**params, "excess": excess}))
    return total, choices


def _cleanup_result(counts: Mapping[str, int]) -> CleanupResult:
    by_max, by_retention = counts.get("max", 0), counts.get("retention", 0)
    return CleanupResult(by_max + by_retention, by_max, by_retention)


# A cleanup deleting at least this many sessions, and at least a fifth of all
# of them, takes the bulk path of _delete_doomed.
BULK_CLEANUP_MIN = 1000
BULK_CLEANUP_SHARE = 5
# The page cache of that bulk path, KiB (SQLite's default is 2,000): while the
# indexes are rebuilt (sorting takes as much again), then for the last deletes,
# which look up sessions in random order.
BULK_CLEANUP_CACHE_KIB = 8000
BULK_CLEANUP_LOOKUP_CACHE_KIB = 16000


def _delete_doomed(conn: sqlite3.Connection, bulk: bool) -> None:
    """Delete the sessions listed in the temp table ``doomed`` and all their
    messages (foreign keys are off: this is what keeps them whole).

    What makes a large cleanup slow is the two indexes on messages, above all
    ``idx_messages_session``: session IDs are random, so the doomed sessions'
    entries are spread over all of it, and deleting them row by row rewrites
    every page of it in random order.  On the bulk path both indexes are
    dropped and rebuilt afterwards from what remains, each in one sorted pass.
    Meanwhile the doomed messages are found by rowid: rowids grow with time,
    and a message is normally no newer than its session's ``updated_at``, so
    they lie at or before the last rowid stamped up to the newest doomed
    session.  The few that do not (a message stamped later than its session,
    possible through the API) go in a last pass through the rebuilt index.
    It is all one transaction: no other connection ever sees an index missing.
    """
    indexes = dict(conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
        " AND name IN ('idx_messages_session', 'idx_messages_timestamp')")) if bulk else {}
    (cache_size,) = conn.execute("PRAGMA cache_size").fetchone()
    try:
        if len(indexes) == 2:  # not when someone took an index from the database
            conn.execute(f"PRAGMA cache_size = -{BULK_CLEANUP_CACHE_KIB}")
            (last,) = conn.execute(
                "SELECT max(rowid) FROM messages INDEXED BY idx_messages_timestamp"
                " WHERE timestamp <= (SELECT max(updated_at) FROM doomed)").fetchone()
            for name in indexes:
                conn.execute(f"DROP INDEX {name}")
            conn.execute("DELETE FROM messages NOT INDEXED"
                         " WHERE rowid <= ? AND session_id IN (SELECT id FROM doomed)", (last or 0,))
            for sql in indexes.values():
                conn.execute(sql)
            conn.execute(f"PRAGMA cache_size = -{BULK_CLEANUP_LOOKUP_CACHE_KIB}")
        # All of a small cleanup; after the bulk path, only the stragglers.
        conn.execute("DELETE FROM messages WHERE session_id IN (SELECT id FROM doomed)")
        conn.execute("DELETE FROM sessions WHERE id IN (SELECT id FROM doomed)")
    finally:
        conn.execute(f"PRAGMA cache_size = {cache_size}")


def make_snippet(content: str, needle: str, width: int = 70) -> str:
    """About ``width`` characters of ``content`` around the first ``needle``."""
    # Where it is in the text itself (casefolding would move it: "ß" is "ss").
    found = re.search(re.escape(needle), content, re.IGNORECASE)
    at = found.start() if found else 0
    start = max(0, at - (width - len(needle)) // 2)
    piece = " ".join(content[start:start + width].split())
    return ("\u2026" if start > 0 else "") + piece + ("\u2026" if start + width < len(content) else "")


# An import reads and checks every file whole before it writes anything, and
# holds the write lock only for each file's one merge transaction.  Meanwhile
# the rows wait in temporary tables of the store's own connection: SQLite keeps
# them in a file of their own, not in memory, whatever the size of the import;
# they take no lock on the database and vanish with the connection.  ``file``
# is a file's place on the command line, ``seq`` (a message's rowid) its place
# among the messages of all the files.
_STAGING_TABLES = (
    f"CREATE TEMP TABLE import_sessions (file INTEGER NOT NULL, {_SESSION_COLUMNS},"
    " PRIMARY KEY (id, file))",
    f"CREATE TEMP TABLE import_messages (seq INTEGER PRIMARY KEY, file INTEGER NOT NULL,"
    f" {_MESSAGE_COLUMNS})",
)
# A session twice in one file (two exports joined) keeps its first fields and
# the later updated_at.
_STAGE_SESSION = (f"INSERT INTO import_sessions (file, {_SESSION_COLUMNS})"
                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id, file)"
                  " DO UPDATE SET updated_at = max(updated_at, excluded.updated_at)")
_STAGE_MESSAGE = (f"INSERT INTO import_messages (file, {_MESSAGE_COLUMNS})"
                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# Staged rows flushed to the tables at a time: few statements, flat memory.
STAGING_BATCH = 5000
# A staged message ``m`` the database lacks: it is not stored, and no earlier
# staged file brings it (a message, like a session, is known by its ID).
_NEW_MESSAGE = ("NOT EXISTS (SELECT 1 FROM main.messages x WHERE x.id = m.id)"
                " AND NOT EXISTS (SELECT 1 FROM import_messages e WHERE e.id = m.id AND e.seq < m.seq)")
# A staged session ``s`` the database has, or an earlier staged file brings.
_KNOWN_SESSION = ("(EXISTS (SELECT 1 FROM main.sessions x WHERE x.id = s.id)"
                  " OR EXISTS (SELECT 1 FROM import_sessions e WHERE e.id = s.id AND e.file < s.file))")
# ImportCounts of one staged file: it only reads, so a dry run asks it too.
_IMPORT_COUNTS = f"""
    WITH added AS (SELECT m.session_id, count(*) AS messages FROM import_messages m
                    WHERE m.file = :file AND {_NEW_MESSAGE} GROUP BY m.session_id)
    SELECT coalesce(sum(NOT staged.known OR added.messages > 0), 0),
           coalesce(sum(added.messages), 0),
           coalesce(sum(staged.known AND added.messages IS NULL), 0)
      FROM (SELECT s.id, {_KNOWN_SESSION} AS known FROM import_sessions s WHERE s.file = :file) staged
      LEFT JOIN added ON added.session_id = staged.id"""
_MERGE_IMPORT = (
    # A session already stored keeps its own fields and takes the later updated_at ...
    "UPDATE sessions SET updated_at = (SELECT s.updated_at FROM import_sessions s"
    "                                   WHERE s.file = :file AND s.id = sessions.id)"
    " WHERE id IN (SELECT s.id FROM import_sessions s JOIN sessions x ON x.id = s.id"
    "               WHERE s.file = :file AND s.updated_at > x.updated_at)",
    # ... and gains the messages it lacks after its own, in the files' order
    # (rowid order is the order a session's messages come back in).  What is
    # stored already, or came first, is the primary key's to ignore: asking
    # first would have SQLite copy the rows aside before inserting them.
    f"INSERT OR IGNORE INTO sessions ({_SESSION_COLUMNS}) SELECT {_SESSION_COLUMNS}"
    " FROM import_sessions WHERE file = :file ORDER BY rowid",
    f"INSERT OR IGNORE INTO messages ({_MESSAGE_COLUMNS}) SELECT {_MESSAGE_COLUMNS}"
    " FROM import_messages WHERE file = :file ORDER BY seq",
)
# The sessions as the staged files would leave them, for the cleanup guard:
# the stored ones in their order, then the new ones; ``imported`` marks those
# the import creates or adds messages to.
_IMPORT_OUTCOME = (
    "CREATE TEMP TABLE IF NOT EXISTS import_outcome (id TEXT PRIMARY KEY,"
    " created_at TEXT NOT NULL, updated_at TEXT NOT NULL, imported INTEGER NOT NULL)",
    "DELETE FROM import_outcome",
    "INSERT INTO import_outcome SELECT id, created_at, updated_at, 0 FROM main.sessions ORDER BY rowid",
    "INSERT INTO import_outcome SELECT id, created_at, max(updated_at), 1 FROM import_sessions"
    " WHERE true GROUP BY id ORDER BY min(rowid)"
    " ON CONFLICT (id) DO UPDATE SET updated_at = max(updated_at, excluded.updated_at)",
    "UPDATE import_outcome SET imported = 1 WHERE id IN"
    f" (SELECT m.session_id FROM import_messages m WHERE {_NEW_MESSAGE})",
)


class SqliteStore:
    """The SessionStore on one SQLite file."""

    def __init__(self, path: str):
        self.path = path
        migrations = load_migrations()
        self._conn = connect(path, newest_version=migrations[-1].number)
        try:
            with self._errors():
                apply_migrations(self._conn, migrations)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "SqliteStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise DatabaseError(describe_sqlite_error(exc, self.path)) from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once so concurrent writers queue."""
        with self._errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                _roll_back(self._conn)
                raise

    def _read(self, sql: str, params: Any = ()) -> List[tuple]:
        with self._errors():
            return self._conn.execute(sql, params).fetchall()

    # -- the SessionStore protocol ------------------------------------------

    def create_session(self, session: Session, messages: Sequence[StoredMessage] = ()) -> None:
        with self._write() as conn:
            conn.execute(f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         _session_row(session))
            _insert_messages(conn, messages)

    def get_session(self, session_id: uuid.UUID) -> Optional[Session]:
        rows = self._read(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?",
                          (_key(session_id),))
        return _session_from_row(rows[0]) if rows else None

    def list_sessions(self, limit: Optional[int] = None,
                      where: SessionFilter = SessionFilter()) -> List[SessionSummary]:
        conditions, params = _filter_sql(where, "s.updated_at", "s")
        rows = self._read(
            f"SELECT {_SUMMARY_COLUMNS} FROM sessions s WHERE 1{conditions}"
            " ORDER BY s.updated_at DESC, s.rowid DESC LIMIT :limit",
            {**params, "limit": -1 if limit is None else limit})
        return [_summary_from_row(r) for r in rows]

    def touch_session(self, session_id: uuid.UUID) -> None:
        with self._write() as conn:
            _touch(conn, _key(session_id))

    def delete_session(self, session_id: uuid.UUID) -> bool:
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM sessions WHERE id = ?", (_key(session_id),))
            return cursor.rowcount > 0

    def add_message(self, message: StoredMessage) -> None:
        with self._write() as conn:
            _touch(conn, _key(message.session_id))
            _insert_messages(conn, [message])

    def get_messages(self, session_id: uuid.UUID) -> List[StoredMessage]:
        key = _key(session_id)
        rows = self._read(f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                          " WHERE session_id = ? ORDER BY rowid", (key,))
        shared = parse_uuid(key)  # the same for every row
        return [_message_from_row(r, shared) for r in rows]

    def cleanup(self, config: SessionConfig,
                protect: Optional[uuid.UUID] = None) -> CleanupResult:
        """Apply retention, then max_sessions, in one transaction."""
        # Foreign keys are off for this one transaction, which deletes every
        # doomed session's messages itself (_delete_doomed): the cascade, one
        # index lookup per deleted session in random order, was a fifth of a
        # large cleanup.  The pragma can only change outside a transaction.
        with self._errors():
            self._conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self._write() as conn:
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS doomed"
                             " (id TEXT PRIMARY KEY, why TEXT NOT NULL, updated_at TEXT NOT NULL)")
                conn.execute("DELETE FROM doomed")
                total, choices = _cleanup_choices(conn, config, protect)
                for why, sql, params in choices:
                    conn.execute(f"INSERT INTO doomed SELECT id, '{why}', updated_at FROM ({sql})",
                                 params)
                counts = dict(conn.execute("SELECT why, count(*) FROM doomed GROUP BY why"))
                result = _cleanup_result(counts)
                if result.sessions_deleted:
                    _delete_doomed(conn, bulk=result.sessions_deleted >= BULK_CLEANUP_MIN
                                   and result.sessions_deleted * BULK_CLEANUP_SHARE >= total)
                conn.execute("DELETE FROM doomed")
        finally:
            with self._errors():
                self._conn.execute("PRAGMA foreign_keys = ON")
        return result

    # -- beyond the protocol: what the command line needs ---------------------

    def choose_cleanup(self, config: SessionConfig, protect: Optional[uuid.UUID] = None
                       ) -> Tuple[CleanupResult, List[str]]:
        """What ``cleanup`` would delete now, and which sessions (their IDs
        as stored: a dry run lists tens of thousands, no UUID objects needed).
        It only reads: no write lock, nothing to roll back."""
        with self._errors():
            doomed = {why: [r[0] for r in self._conn.execute(sql, params)]
                      for why, sql, params in _cleanup_choices(self._conn, config, protect)[1]}
        return (_cleanup_result({why: len(ids) for why, ids in doomed.items()}),
                [i for ids in doomed.values() for i in ids])

    def export_rows(self) -> Iterator[Tuple[tuple, List[tuple]]]:
        """Every session's row with its messages' rows (in MESSAGE_FIELDS order),
        by ``created_at``, a session at a time (memory does not grow with the
        database), all from one snapshot.  Close it when done."""
        conn = self._conn
        with self._errors():
            conn.execute("BEGIN")  # one read transaction: a consistent snapshot
            try:
                sessions = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions"
                                        " ORDER BY created_at, rowid")
                for row in sessions:
                    yield row, conn.execute(f"SELECT {', '.join(MESSAGE_FIELDS)} FROM messages"
                                            " WHERE session_id = ? ORDER BY rowid", (row[0],)).fetchall()
            finally:
                conn.execute("COMMIT")

    def stage_import(self, file: int, sessions: Iterable[ImportedSession]) -> None:
        """Stage one file's sessions for ``import_counts`` and ``merge_import``:
        all of them, or none when reading fails part-way (the error goes on).
        It writes only the connection's temporary tables, under no lock."""
        conn = self._conn
        with self._errors():
            if not conn.execute("SELECT 1 FROM sqlite_temp_master WHERE name = 'import_sessions'"
                                ).fetchone():
                # Before any temporary table: changing it drops them.  On disk,
                # so that memory stays flat whatever the file's size.
                conn.execute("PRAGMA temp_store = FILE")
                for statement in _STAGING_TABLES:
                    conn.execute(statement)
            conn.execute("BEGIN")
            try:
                session_rows: List[tuple] = []
                message_rows: List[tuple] = []
                for session in sessions:
                    session_rows.append((file, *session.session))
                    message_rows.extend((file, *m) for m in session.messages)
                    if len(session_rows) + len(message_rows) >= STAGING_BATCH:
                        conn.executemany(_STAGE_SESSION, session_rows)
                        conn.executemany(_STAGE_MESSAGE, message_rows)
                        session_rows, message_rows = [], []
                conn.executemany(_STAGE_SESSION, session_rows)
                conn.executemany(_STAGE_MESSAGE, message_rows)
                conn.execute("COMMIT")
            except BaseException:
                _roll_back(conn)
                raise

    def _staged(self) -> sqlite3.Connection:
        """The connection, once every file is staged, with the staged messages
        indexed (in one sorted pass, rather than row by row while staging)."""
        self._conn.execute("CREATE INDEX IF NOT EXISTS temp.import_messages_id"
                           " ON import_messages (id)")
        return self._conn

    def import_counts(self, file: int) -> ImportCounts:
        """What merging the staged ``file`` would add now.  It only reads."""
        with self._errors():
            return ImportCounts(*self._staged().execute(_IMPORT_COUNTS, {"file": file}).fetchone())

    def merge_import(self, file: int) -> ImportCounts:
        """Merge the staged ``file`` into the database, in one transaction: new
        sessions whole, and to those already stored the messages they lack."""
        with self._errors():
            self._staged()
        with self._write() as conn:
            counts = ImportCounts(*conn.execute(_IMPORT_COUNTS, {"file": file}).fetchone())
            for statement in _MERGE_IMPORT:
                conn.execute(statement, {"file": file})
        return counts

    def doomed_imports(self, config: SessionConfig) -> CleanupResult:
        """How many sessions that the staged files create or add messages to
        a cleanup with ``config`` would delete once they are merged, as the
        next chat's automatic one would.  It only reads the database."""
        with self._errors():
            conn = self._staged()
            conn.execute("BEGIN")  # one snapshot; only temporary tables are written
            try:
                for statement in _IMPORT_OUTCOME:
                    conn.execute(statement)
                counts = {why: conn.execute("SELECT count(*) FROM import_outcome WHERE imported"
                                            f" AND id IN (SELECT id FROM ({sql}))", params).fetchone()[0]
                          for why, sql, params in _cleanup_choices(conn, config, None,
                                                                   "import_outcome")[1]}
            finally:
                conn.execute("COMMIT")
        return _cleanup_result(counts)

    def backup(self, path: str) -> None:
        """A consistent copy of the database at ``path``, a new private file,
        made by SQLite's online backup while other processes go on writing."""
        if os.path.isdir(path):
            raise StorageError(f"{path} is a directory; give the backup a new file name")
        try:
            os.close(create_private_file(path))
        except FileExistsError:
            raise StorageError(f"{path} already exists; a backup never overwrites a file, "
                               f"give it a new name") from None
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None
        try:
            target = sqlite3.connect(path, isolation_level=None)
            try:
                # One step: the whole copy is read in one transaction, a
                # snapshot that writers to the database do not disturb (WAL).
                self._conn.backup(target)
                # One self-contained file (the copy took the database's WAL mode).
                target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()
        except BaseException as exc:
            for leftover in ("", "-journal", "-wal", "-shm"):  # files of the copy alone
                with contextlib.suppress(OSError):
                    os.unlink(path + leftover)
            if isinstance(exc, sqlite3.Error):
                raise DatabaseError(f"the backup failed: {describe_sqlite_error(exc, path)}") from None
            raise

    def find_session_ids(self, prefix: str, limit: int = 20) -> List[str]:
        """Stored IDs starting with ``prefix`` (hyphenated, lower case)."""
        rows = self._read("SELECT id FROM sessions WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                          (prefix, prefix + "~", limit))
        return [r[0] for r in rows]

    def rename_session(self, session_id: uuid.UUID, name: Optional[str]) -> None:
        with self._write() as conn:
            cursor = conn.execute("UPDATE sessions SET name = ? WHERE id = ?",
                                  (name, _key(session_id)))
            if cursor.rowcount == 0:
                raise SessionNotFound(session_id)

    def switch_model(self, session_id: uuid.UUID, provider: str, model: str) -> None:
        with self._write() as conn:
            _touch(conn, _key(session_id), provider=provider, model=model)

    def undo(self, session_id: uuid.UUID, count: int) -> List[StoredMessage]:
        """Remove the session's last ``count`` exchanges and return them; the
        choice is made under the write lock, so two undos never remove one
        exchange twice."""
        key = _key(session_id)
        with self._write() as conn:
            messages = [_message_from_row(r) for r in conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY rowid", (key,))]
            removed = messages[exchanges_start([m.role for m in messages], count):]
            conn.executemany("DELETE FROM messages WHERE id = ?", [(_key(m.id),) for m in removed])
            _touch(conn, key)
        return removed

    def replace_reply(self, asked: StoredMessage, reply: StoredMessage) -> None:
        """Make ``reply`` the one answer to the user message ``asked`` (a
        retry): what followed it goes, in the same transaction that stores the
        reply.  Refused when the session went on past ``asked`` meanwhile."""
        key = _key(asked.session_id)
        with self._write() as conn:
            row = conn.execute("SELECT rowid FROM messages WHERE id = ? AND session_id = ?",
                               (_key(asked.id), key)).fetchone()
            later = row and conn.execute(
                "SELECT 1 FROM messages WHERE session_id = ? AND rowid > ? AND role = 'user'",
                (key, row[0])).fetchone()
            if row is None or later:
                raise StorageError("the session changed while the retry ran (its last message "
                                   "went or another came); the new reply was not stored")
            conn.execute("DELETE FROM messages WHERE session_id = ? AND rowid > ?", (key, row[0]))
            _touch(conn, key)
            _insert_messages(conn, [reply])

    def search_sessions(self, text: str, limit: Optional[int] = None,
                        where: SessionFilter = SessionFilter()) -> List[SearchHit]:
        """Sessions with a message containing ``text``, newest first; ``where``
        narrows the sessions and the role of the message.

        An ASCII needle uses LIKE, which SQLite runs in C and which ignores
        ASCII case; any other needle is matched with Python's ``casefold`` so
        that "ÄRGER" finds "ärger".  ``%``, ``_`` and quotes are escaped: they
        are plain characters here.

        With a limit, sessions are first walked newest first, stopping at the
        limit: instant when the text is common.  When it is rare that walk would
        visit every session one by one, so it is abandoned after a bounded
        amount of work for one sequential scan of all messages, which is what
        a search without a limit does from the start.
        """
        if text.isascii():
            condition = "m.content LIKE :needle ESCAPE '\\'"
            needle = "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"
        else:
            self._conn.create_function("casefold_contains", 2, _casefold_contains,
                                       deterministic=True)
            condition, needle = "casefold_contains(m.content, :needle)", text.casefold()
        if where.role is not None:
            condition += " AND m.role = :role"
        sessions, params = _filter_sql(where, "s.updated_at", "s")
        first_hit = (f"(SELECT m.content FROM messages m WHERE m.session_id = s.id"
                     f" AND {condition} ORDER BY m.rowid LIMIT 1)")
        newest_first = "ORDER BY s.updated_at DESC, s.rowid DESC"
        params.update(needle=needle, role=where.role, limit=-1 if limit is None else limit)
        rows = None
        if limit is not None:
            rows = self._read_bounded(
                f"SELECT * FROM (SELECT {_SUMMARY_COLUMNS}, {first_hit} AS hit"
                f" FROM sessions s WHERE 1{sessions} {newest_first}) WHERE hit IS NOT NULL"
                f" LIMIT :limit", params, SEARCH_WALK_BUDGET)
        if rows is None:
            rows = self._read(
                f"SELECT {_SUMMARY_COLUMNS}, {first_hit} FROM sessions s"
                f" WHERE s.id IN (SELECT m.session_id FROM messages m WHERE {condition}){sessions}"
                f" {newest_first} LIMIT :limit", params)
        return [SearchHit(_summary_from_row(r[:8]), make_snippet(r[8], text)) for r in rows]

    def usage(self, by: str, where: SessionFilter) -> List[tuple]:
        """Sums over the replies (assistant messages) ``where`` selects, by
        their timestamp: rows of (group, model, replies, replies without counts,
        input tokens, output tokens, and by session the session's name), one
        per group and model."""
        conditions, params = _filter_sql(where, "m.timestamp", "m")
        # By model, the model is the group: sorting on it once is a third of the query.
        sums = (f"SELECT {USAGE_GROUPS[by]} AS grp, m.model, count(*),"
                " sum(m.input_tokens IS NULL AND m.output_tokens IS NULL),"
                " coalesce(sum(m.input_tokens), 0), coalesce(sum(m.output_tokens), 0)"
                f" FROM messages m WHERE m.role = 'assistant'{conditions}"
                f" GROUP BY {'grp' if by == 'model' else 'grp, m.model'}")
        if by != "session":
            return [(*row, None) for row in self._read(sums, params)]
        return self._read(f"SELECT g.*, s.name FROM ({sums}) g LEFT JOIN sessions s ON s.id = g.grp",
                          params)

    def _read_bounded(self, sql: str, params: Mapping[str, object],
                      budget: int) -> Optional[List[tuple]]:
        """The rows, or None when the query needs more than ``budget`` thousand steps."""
        steps = itertools.count()
        self._conn.set_progress_handler(lambda: next(steps) >= budget, 1000)
        try:
            with self._errors():
                try:
                    return self._conn.execute(sql, params).fetchall()
                except sqlite3.OperationalError as exc:
                    if "interrupt" in str(exc):
                        return None
                    raise
        finally:
            self._conn.set_progress_handler(None, 0)


def create_storage(database_url: Optional[str] = None) -> SqliteStore:
    """Open (creating and migrating as needed) the store at ``database_url``,
    else where SPEC §4 says the database is."""
    return SqliteStore(database_path(database_url))


# ---------------------------------------------------------------------------
# 5. Providers
#
# The server-sent-events parser, the one HTTP helper, a request and a reply
# parser per protocol, and ``stream_chat``, the one entry point (retries,
# the provider's name on every error).  A reply is a generator of text:
# nothing is sent until the first piece is asked for.
# ---------------------------------------------------------------------------


class ServerEvent(namedtuple("ServerEvent", "event data")):
    """One server-sent event: its type ("message" unless named) and its data."""

    __slots__ = ()


class EventStreamParser:
    """Incremental server-sent-events parser, fed raw bytes as they arrive.

    Follows the SSE rules: lines end at CR, LF or CRLF (and nowhere else: no
    ``str.splitlines``, which would also split at U+2028 inside JSON),
    ``data:`` with or without one space, multi-line data, comment lines, and
    events and UTF-8 characters split anywhere across reads.  Undecodable
    bytes become U+FFFD; it never raises.  Its time is linear in what it
    reads: a line split over many reads is searched and joined once.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending: List[str] = []  # the pieces of the line not yet ended
        self._after_cr = False  # the last line ended in CR: a next LF is part of it
        self._event = ""
        self._data: List[str] = []

    def feed(self, chunk: bytes) -> List[ServerEvent]:
        return self._consume(self._decoder.decode(chunk))

    def close(self) -> List[ServerEvent]:
        """End of stream: a last line or event without its blank line counts."""
        events = self._consume(self._decoder.decode(b"", final=True))
        if self._pending:
            events.extend(self._line("".join(self._pending)))
            self._pending = []
        events.extend(self._line(""))
        return events

    def _consume(self, text: str) -> List[ServerEvent]:
        if self._after_cr and text:
            if text[0] == "\n":
                text = text[1:]
            self._after_cr = False
        if "\n" not in text and "\r" not in text:  # inside a line: a search, not a regex scan
            if text:
                self._pending.append(text)
            return []
        events: List[ServerEvent] = []
        start = 0
        for end in re.finditer(_LINE_END, text):
            piece = text[start:end.start()]
            if self._pending:
                self._pending.append(piece)
                events.extend(self._joined_line(self._pending))
                self._pending = []
            else:
                events.extend(self._line(piece))
            start = end.end()
        if start < len(text):
            self._pending.append(text[start:])
        elif text.endswith("\r"):
            self._after_cr = True
        return events

    def _joined_line(self, pieces: List[str]) -> List[ServerEvent]:
        """A line that came in pieces, joined once: the field's name is cut
        off the first piece before the join, so a long value is copied once."""
        first = pieces[0]
        colon = first.find(":")
        if 0 < colon < len(first) - 1:
            pieces[0] = first[colon + 2 if first[colon + 1] == " " else colon + 1:]
            return self._field(first[:colon], "".join(pieces))
        return self._line("".join(pieces))

    def _line(self, line: str) -> List[ServerEvent]:
        if not line:
            if not self._data:
                self._event = ""
                return []
            event = ServerEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return [event]
        colon = line.find(":")
        if colon < 0:
            return self._field(line, "")
        return self._field(line[:colon], line[colon + 2 if line.startswith(" ", colon + 1) else colon + 1:])

    def _field(self, name: str, value: str) -> List[ServerEvent]:
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return []  # any other field, or a comment (": keep-alive", an empty name)


# CRLF first, so that it counts as one line end; a CR at the very end of a
# read may be the first half of a CRLF and is settled by the next read.
_LINE_END = r"\r\n|\r|\n"


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
MAX_RETRIES = 2
CONNECT_TIMEOUT = 10.0
MAX_RETRY_WAIT = 30.0
RETRY_BASE_DELAY = 1.0  # seconds before the first retry; doubled for each next one


class ChatRequest(namedtuple("ChatRequest", "system_prompt messages max_tokens temperature timeout stream",
                             defaults=(4096, None, 600.0, True))):
    """What one turn sends, whatever the protocol: ``messages`` are (role,
    content) pairs, oldest first; ``system_prompt`` and ``temperature`` may be None."""

    __slots__ = ()


class Usage(namedtuple("Usage", "input_tokens output_tokens stop_reason",
                       defaults=(None, None, None))):
    """What a provider reports beside the text: token counts (int or None) and
    why the reply ended (str or None).  A reply may report them in parts;
    ``merged`` takes each field from the later part that has it."""

    __slots__ = ()

    def merged(self, later: "Usage") -> "Usage":
        return Usage(*(b if b is not None else a for a, b in zip(self, later)))


def _count(value: object) -> Optional[int]:
    """A token count as reported, or None for a null, a missing or an odd
    one (a bool, a negative, more than SQLite can hold)."""
    return value if type(value) is int and 0 <= value <= MAX_COUNT else None


def _reason(value: object) -> Optional[str]:
    """A stop reason as reported: a non-empty string, or None for anything else."""
    return value if isinstance(value, str) and value else None


def _sample(value: object) -> str:
    return shorten(json.dumps(value, ensure_ascii=False), 80)


class ProviderFault(Exception):
    """What a provider did wrong, phrased to follow its name ("returned 401 ...",
    "sent a malformed stream event ...").  The layers below ``stream_chat``
    raise it; ``stream_chat`` names the provider and raises ProviderError."""


class _Retry(Exception):
    """A fault that another attempt may cure, while no reply text is out."""

    def __init__(self, fault: ProviderFault, headers: Mapping[str, str] = MappingProxyType({})):
        super().__init__(str(fault))
        self.fault, self.headers = fault, headers


def retry_delay(attempt: int, headers: Mapping[str, str]) -> float:
    """Seconds to wait before retry ``attempt`` (0-based).

    ``retry-after-ms`` (OpenAI, Anthropic) wins over ``Retry-After``; both
    are capped at 30 s.  Without them: 1 s, 2 s, ...
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue  # an HTTP date: fall back to backoff
        if seconds == seconds:  # not NaN
            return min(max(seconds, 0.0), MAX_RETRY_WAIT)
    return RETRY_BASE_DELAY * 2 ** attempt


def _error_object(data: object) -> object:
    """The error inside an error body: ``{"error": {...}}`` (OpenAI, and
    Anthropic inside its ``{"type": "error"}``) or ``{"error": "text"}`` (Ollama)."""
    return data.get("error", data) if isinstance(data, dict) else None


def _error_fields(data: object) -> Tuple[Optional[str], Optional[str]]:
    """(type or code, message) of an error body of any provider."""
    error = _error_object(data)
    if isinstance(error, str):
        return None, error
    if not isinstance(error, dict):
        return None, None
    kind = error.get("type") or error.get("code")
    if kind == "error" or not isinstance(kind, (str, int)):  # Anthropic's outer wrapper; junk
        kind = None
    message = error.get("message")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message, ensure_ascii=False)
    return (str(kind) if kind else None), message


def _json_or_none(body: bytes) -> object:
    try:
        return json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):  # RecursionError: nesting too deep to follow
        return None


def describe_http_error(status: int, reason: str, body: bytes, content_type: str) -> str:
    kind, message = _error_fields(_json_or_none(body))
    if message:
        label = f" ({kind})" if kind else ""
        text = f"returned {status}{label}: {shorten(message, 300)}"
    elif not body.strip():
        text = f"returned {status} {reason} with an empty body"
    elif "html" in content_type.lower() or body.lstrip()[:1] == b"<":
        text = f"returned {status} {reason} as an HTML page (is base_url right?)"
    else:
        text = f"returned {status} {reason}: {shorten(body.decode('utf-8', 'replace'), 300)}"
    hints = {401: "check the API key", 403: "check the API key and its permissions",
             404: "check the model name and base_url"}
    return text + (f"; {hints[status]}" if status in hints else "")


def _is_permanent(status: int, body: bytes) -> bool:
    """A 429 for an empty account will not pass by waiting (its ``code`` or
    ``type`` says so); nor does DeepSeek's 402, which is not retried anyway."""
    error = _error_object(_json_or_none(body))
    return (status == 429 and isinstance(error, dict)
            and "insufficient_quota" in (error.get("code"), error.get("type")))


def _network_reason(exc: BaseException) -> str:
    """What went wrong on the network, in words (never a bare class name)."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip()
    for clue, reason in (("IncompleteRead", "the reply was cut short"),
                         ("ended prematurely", "the reply was cut short"),
                         ("without response", "the server closed the connection"),
                         ("Connection aborted", "the server closed the connection")):
        if clue in text:
            return reason
    return shorten(text, 120) or "the connection failed"


def send_request(provider: Provider, method: str, path: str, headers: Mapping[str, str],
                 payload: Optional[Mapping[str, object]], timeout: float, stream: bool):
    """One HTTP attempt at ``base_url + path``: the 2xx response, else a
    ProviderFault (a _Retry when another attempt may cure it)."""
    try:
        import requests  # deferred: it is most of a chat's start-up, and only chat needs it
    except ImportError:
        raise SynapseError(f"talking to {provider.name} needs the requests package, which is "
                           f"not installed; install it: python3 -m pip install requests") from None

    url = f"{(provider.base_url or '').rstrip('/')}{path}"
    headers = {"Accept": "text/event-stream" if stream else "application/json", **headers}
    if stream:  # a compressed stream would reach us only in blocks
        headers["Accept-Encoding"] = "identity"
    body = None
    if payload is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(payload).encode("utf-8")
    try:
        # No redirect is followed: it would take the key and the conversation
        # to another host (or turn the POST into a GET).
        response = requests.request(method, url, data=body, headers=headers, stream=True,
                                    timeout=(CONNECT_TIMEOUT, timeout), allow_redirects=False)
    except requests.exceptions.ConnectTimeout:
        raise _Retry(ProviderFault(f"did not answer at {provider.base_url} within "
                                   f"{CONNECT_TIMEOUT:g} s; check the network and base_url")) from None
    except requests.exceptions.Timeout:  # a read timeout: waiting again would double it
        raise _silence(timeout) from None
    except (requests.exceptions.RequestException, OSError) as exc:
        raise _Retry(ProviderFault(f"is not reachable at {provider.base_url} "
                                   f"({_network_reason(exc)}); check the network and base_url")) from None
    if response.status_code < 300:
        return response
    if response.status_code < 400:
        response.close()
        raise ProviderFault(f"answered {response.status_code} {response.reason or ''}, redirecting to "
                            f"{response.headers.get('location') or 'nowhere'}; synapse follows no "
                            f"redirect: if that is the endpoint, set base_url to it")
    try:
        content = b"".join(iter_response_bytes(response, timeout))
    except (ProviderFault, _Retry):
        content = b""
    text = describe_http_error(response.status_code, response.reason or "", content,
                               response.headers.get("content-type", ""))
    if payload and "stream_options" in payload and b"stream_options" in content:
        text += (f"; this server does not take stream_options: set stream_usage = false "
                 f"under [providers.{provider.name}] in the config")
    fault = ProviderFault(text)
    if response.status_code in RETRY_STATUSES and not _is_permanent(response.status_code, content):
        raise _Retry(fault, {k.lower(): v for k, v in response.headers.items()})
    raise fault


def _decompressor(encoding: str) -> Callable[[Optional[bytes]], bytes]:
    """Undo ``Content-Encoding``, fed piece by piece (None at the end)."""
    import zlib

    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ProviderFault(f"sent a reply in the unknown encoding {encoding!r}")
    # 47: a gzip or a zlib header, whichever comes (deflate is zlib-wrapped).
    state = zlib.decompressobj(47)

    def decompress(data: Optional[bytes]) -> bytes:
        try:
            return state.flush() if data is None else state.decompress(data)
        except zlib.error:
            raise ProviderFault(f"sent a {encoding} reply that does not decompress") from None
    return decompress


def _silence(timeout: float) -> ProviderFault:
    return ProviderFault(f"sent nothing for {timeout:g} s; raise timeout in the config "
                         f"or try again")


def iter_response_bytes(response, timeout: float) -> Iterator[bytes]:
    """The body as the network delivers it, one read at a time, decompressed
    when it came compressed (``Content-Encoding`` gzip or deflate)."""
    import requests
    import urllib3  # already loaded by requests

    raw = response.raw
    encoding = response.headers.get("content-encoding", "").strip().lower()
    try:
        decompress = _decompressor(encoding) if encoding not in ("", "identity") else None
        if hasattr(raw, "read1"):  # urllib3 >= 2: returns what has arrived
            chunks: Iterable[bytes] = iter(lambda: raw.read1(65536), b"")
        else:  # pragma: no cover - urllib3 1.x
            chunks = raw.stream(1, decode_content=False)
        for chunk in chunks:
            chunk = decompress(chunk) if decompress else chunk
            if chunk:
                yield chunk
        if decompress:
            yield decompress(None)
    except (urllib3.exceptions.ReadTimeoutError, requests.exceptions.Timeout, TimeoutError):
        raise _silence(timeout) from None
    except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError) as exc:
        raise _Retry(ProviderFault(f"broke the connection mid-reply ({_network_reason(exc)}); "
                                   f"try again")) from None
    finally:
        response.close()


def iter_events(response, timeout: float) -> Iterator[ServerEvent]:
    parser = EventStreamParser()
    for chunk in iter_response_bytes(response, timeout):
        yield from parser.feed(chunk)
    yield from parser.close()


def _response_kind(response) -> str:
    """"events" or "json"; an HTML page or other surprise is a fault."""
    content_type = response.headers.get("content-type", "").lower()
    if "json" in content_type:
        return "json"
    if "html" in content_type:
        response.close()
        raise ProviderFault("answered with an HTML page, not a reply (is base_url right?)")
    return "events"


def _json_event(data: str) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise ProviderFault(f"sent a malformed stream event: {shorten(data, 80)!r}") from None
    if not isinstance(value, dict):
        raise ProviderFault(f"sent a stream event that is not a JSON object: {shorten(data, 80)!r}")
    return value


def _reported_error(value: Mapping[str, object]) -> ProviderFault:
    kind, message = _error_fields(value)
    label = f" ({kind})" if kind else ""
    return ProviderFault(f"reported an error{label}: {shorten(message or 'no details', 300)}")


def read_json_body(response, timeout: float) -> dict:
    body = b"".join(iter_response_bytes(response, timeout))
    value = _json_or_none(body)
    if value is None:
        raise ProviderFault(f"sent a reply that is not JSON: "
                            f"{shorten(body.decode('utf-8', 'replace'), 80)!r}")
    if not isinstance(value, dict):
        raise ProviderFault(f"sent a reply that is not a JSON object: {shorten(str(value), 80)}")
    if value.get("error"):
        raise _reported_error(value)
    return value


# -- OpenAI chat completions (also DeepSeek, Ollama, compatible servers) ------------


def openai_headers(provider: Provider) -> Dict[str, str]:
    return {"Authorization": f"Bearer {provider.api_key}"} if provider.api_key else {}


def openai_payload(provider: Provider, request: ChatRequest) -> Dict[str, object]:
    messages = [{"role": "system", "content": request.system_prompt}] if request.system_prompt else []
    messages += [{"role": role, "content": content} for role, content in request.messages]
    payload: Dict[str, object] = {"model": provider.model, "messages": messages,
                                  "stream": request.stream,
                                  provider.max_tokens_field: request.max_tokens}
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    if request.stream and provider.stream_usage:
        payload["stream_options"] = {"include_usage": True}  # the counts come in a last chunk
    return payload


def _openai_parts(value: Mapping[str, object], key: str) -> Iterator[Reply]:
    """The text, finish reason and usage of a chat.completion (``key``
    "message") or of one chunk of a stream (``key`` "delta")."""
    choices = value.get("choices")
    if not isinstance(choices, list):
        raise ProviderFault(f"sent a reply without a list of choices: {_sample(value)}")
    if choices:
        choice = choices[0]
        if not isinstance(choice, dict):
            raise ProviderFault(f"sent a choice that is not an object: {_sample(value)}")
        part = choice.get(key, {} if key == "delta" else None)  # a chunk may hold only a finish
        if not isinstance(part, dict):
            raise ProviderFault(f"sent a choice without a {key} object: {_sample(value)}")
        # reasoning_content (DeepSeek's thinking) is not the reply: skipped.
        content = part.get("content")
        if content is not None and not isinstance(content, str):
            raise ProviderFault(f"sent reply text that is not a string: {_sample(value)}")
        if content:
            yield content
        reason = _reason(choice.get("finish_reason"))
        if reason:
            yield Usage(stop_reason=reason)
    usage = value.get("usage")
    if isinstance(usage, dict):  # the body's, or the last chunk's (choices: [])
        yield Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def openai_body(value: Mapping[str, object]) -> Iterator[Reply]:
    return _openai_parts(value, "message")


def openai_texts(events: Iterable[ServerEvent]) -> Iterator[Reply]:
    """The reply in an OpenAI-style event stream, up to ``[DONE]``."""
    for event in events:
        data = event.data.strip()
        if data == "[DONE]":
            return
        if not data:
            continue
        value = _json_event(data)
        if value.get("error"):  # an "error": null beside a delta is no error
            raise _reported_error(value)
        yield from _openai_parts(value, "delta")
    raise ProviderFault("ended the reply before data: [DONE]")


# -- Anthropic Messages -----------------------------------------------------------


def anthropic_headers(provider: Provider) -> Dict[str, str]:
    headers = {"anthropic-version": "2023-06-01"}
    if provider.api_key:
        headers["x-api-key"] = provider.api_key
    return headers


def anthropic_messages(messages: Sequence[Tuple[str, str]]) -> List[Dict[str, str]]:
    """Alternating roles starting with user, as the Messages API demands."""
    merged: List[Dict[str, str]] = []
    for role, content in messages:
        if not merged and role != "user":
            continue  # the API refuses a conversation that opens with the assistant
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n\n" + content
        else:
            merged.append({"role": role, "content": content})
    return merged


def anthropic_payload(provider: Provider, request: ChatRequest) -> Dict[str, object]:
    payload: Dict[str, object] = {"model": provider.model, "max_tokens": request.max_tokens,
                                  "messages": anthropic_messages(request.messages),
                                  "stream": request.stream}
    if request.system_prompt:
        payload["system"] = request.system_prompt
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    return payload


def _anthropic_input(usage: object) -> Usage:
    """Input counts of a ``usage`` object; cache reads and writes are input too."""
    if not isinstance(usage, dict):
        return Usage()
    counts = [_count(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens",
                                              "cache_read_input_tokens")]
    return Usage(sum(c for c in counts if c is not None) if counts[0] is not None else None)


def _anthropic_text(block: object, value: Mapping[str, object]) -> Optional[str]:
    """The text of a text block or text delta; None for other kinds (thinking, tools)."""
    if not isinstance(block, dict):
        raise ProviderFault(f"sent a content block that is not an object: {_sample(value)}")
    if block.get("type") not in ("text", "text_delta"):
        return None
    text = block.get("text")
    if not isinstance(text, str):
        raise ProviderFault(f"sent reply text that is not a string: {_sample(value)}")
    return text


def anthropic_body(value: Mapping[str, object]) -> Iterator[Reply]:
    """The reply of a whole Messages response."""
    content = value.get("content")
    if not isinstance(content, list):
        raise ProviderFault(f"sent a reply without a list of content blocks: {_sample(value)}")
    for block in content:
        text = _anthropic_text(block, value)
        if text:
            yield text
    usage = value.get("usage")
    yield _anthropic_input(usage)._replace(
        output_tokens=_count(usage.get("output_tokens")) if isinstance(usage, dict) else None,
        stop_reason=_reason(value.get("stop_reason")))


def anthropic_texts(events: Iterable[ServerEvent]) -> Iterator[Reply]:
    """The reply in an Anthropic event stream, up to ``message_stop``."""
    for event in events:
        if not event.data.strip():
            continue
        value = _json_event(event.data)
        kind = value.get("type", event.event)
        if kind == "content_block_delta":
            text = _anthropic_text(value.get("delta"), value)
            if text:
                yield text
        elif kind == "message_start":
            message = value.get("message")
            yield _anthropic_input(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "message_delta":
            delta, usage = value.get("delta"), value.get("usage")
            yield Usage(None, _count(usage.get("output_tokens")) if isinstance(usage, dict) else None,
                        _reason(delta.get("stop_reason")) if isinstance(delta, dict) else None)
        elif kind == "message_stop":
            return
        elif kind == "error":
            raise _reported_error(value)
    raise ProviderFault("ended the reply before message_stop")


# -- one skeleton for every protocol -------------------------------------------------


class ChatProtocol(namedtuple("ChatProtocol", "path headers payload body events")):
    """How one wire protocol chats: the endpoint's ``path``; ``headers(provider)``
    and ``payload(provider, request)`` make the request; ``body(value)`` reads a
    whole JSON reply and ``events(events)`` a stream, each yielding the reply
    (text, and Usage records)."""

    __slots__ = ()


PROTOCOLS: Mapping[str, ChatProtocol] = MappingProxyType({
    "openai": ChatProtocol("/chat/completions", openai_headers, openai_payload,
                           openai_body, openai_texts),
    "anthropic": ChatProtocol("/v1/messages", anthropic_headers, anthropic_payload,
                              anthropic_body, anthropic_texts),
})


def with_retries(call: Callable[[], Any]) -> Any:
    """``call()``; after a _Retry, again (at most MAX_RETRIES times), waiting
    ``retry_delay`` first."""
    for attempt in itertools.count():
        try:
            return call()
        except _Retry as retry:
            if attempt >= MAX_RETRIES:
                raise retry.fault from None
            time.sleep(retry_delay(attempt, retry.headers))


def stream_chat(provider: Provider, request: ChatRequest) -> Iterator[Reply]:
    """The provider's reply to ``request`` as it arrives: text pieces (str),
    and Usage records (token counts, the stop reason) where the protocol
    reports them.

    The one entry point to every protocol.  Connection errors and the
    RETRY_STATUSES are retried, also a connection that drops before the first
    piece of text, but never once text is out.  A reply without any text is
    an error.  Every ProviderFault below leaves as a ProviderError naming the
    provider.
    """
    if provider.kind == "echo":
        yield from echo_reply(request)
        return
    protocol = PROTOCOLS[provider.kind]
    payload = protocol.payload(provider, request)

    def up_to_the_first_text() -> Tuple[List[Reply], Iterator[Reply]]:
        response = send_request(provider, "POST", protocol.path, protocol.headers(provider),
                                payload, request.timeout, request.stream)
        if _response_kind(response) == "json":
            reply = protocol.body(read_json_body(response, request.timeout))
        else:
            reply = protocol.events(iter_events(response, request.timeout))
        head: List[Reply] = []
        for item in reply:
            head.append(item)
            if isinstance(item, str) and item:
                break
        return head, reply

    try:
        head, rest = with_retries(up_to_the_first_text)
        yield from head
        if not any(isinstance(item, str) and item for item in head):
            stop_reason = next((i.stop_reason for i in reversed(head) if i.stop_reason), None)
            because = f" (stop reason: {stop_reason})" if stop_reason else ""
            raise ProviderFault(f"sent a reply without any text{because}")
        try:
            yield from rest
        except _Retry as retry:  # text is out: too late to ask again
            raise retry.fault from None
    except ProviderFault as fault:
        raise ProviderError(f"{provider.name} {fault}") from None


def list_models(provider: Provider, timeout: float) -> List[str]:
    """The IDs of the models the provider offers (SPEC §11): OpenAI-compatible
    ``/models``, Anthropic's ``/v1/models`` page by page; echo has one."""
    if provider.kind == "echo":
        return ["echo"]
    anthropic = provider.kind == "anthropic"
    headers = anthropic_headers(provider) if anthropic else openai_headers(provider)
    models: List[str] = []
    after = None
    try:
        while True:
            path = "/models"
            if anthropic:
                path = "/v1/models?limit=1000" + (f"&after_id={after}" if after else "")
            page = with_retries(lambda: read_json_body(
                _json_response(send_request(provider, "GET", path, headers, None, timeout, False)),
                timeout))
            data = page.get("data", "missing")
            data = [] if data is None else data  # Ollama with no model pulled
            if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                       for m in data):
                raise ProviderFault(f"sent a model list without a list of models: {_sample(page)}")
            models += [m["id"] for m in data]
            if not (anthropic and page.get("has_more") and page.get("last_id")):
                return models
            if page["last_id"] == after:
                raise ProviderFault(f"sent the same page of models twice (after {after})")
            after = page["last_id"]
    except ProviderFault as fault:
        raise ProviderError(f"{provider.name} {fault}") from None


def _json_response(response):
    if _response_kind(response) != "json":
        response.close()
        raise ProviderFault("answered with something that is not JSON (is base_url right?)")
    return response


def echo_reply(request: ChatRequest) -> Iterator[Reply]:
    """The last user message back, a word at a time (large ones in pieces),
    with word counts for tokens."""
    text = next((c for r, c in reversed(request.messages) if r == "user"), "")
    if len(text) > 65536:
        for start in range(0, len(text), 16384):
            yield text[start:start + 16384]
    else:
        yield from re.findall(r"\s*\S+\s*|\s+", text)
    sent = [request.system_prompt or ""] + [c for _, c in request.messages]
    yield Usage(sum(len(c.split()) for c in sent), len(text.split()), "stop")


# ---------------------------------------------------------------------------
# 6. Chat flow
#
# From a ChatPlan (what the command line asks) to a Conversation: the session,
# its history, the provider and the request options.  ``Conversation.send``
# is one turn: commit the user message, stream the reply to ``out`` as it
# arrives, keep the reply -- also a partial one when the user presses Ctrl-C
# or the provider fails mid-reply; ``retry`` asks again.  It writes only the
# reply, to ``out``; it reads files the user names, and nothing else prints.
# ---------------------------------------------------------------------------


LATEST_SESSION = object()  # ChatPlan.session for -C: the most recently updated one


class ChatPlan(namedtuple("ChatPlan", "session provider model system_prompt name temperature"
                                       " stream save")):
    """What the command line asks of a chat, read once from its flags.

    ``session`` is an ID as the user typed it, LATEST_SESSION, or None for a
    new session; ``provider`` and ``model`` are names or None (the defaults);
    ``system_prompt`` and ``name`` (str or None) shape a new session;
    ``temperature`` (a role's) replaces the config's when not None;
    ``stream`` and ``save`` (False: --no-save, nothing is written) are bools.
    """

    __slots__ = ()


_UUID_PIECES = ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))


def compact_session_id(text: str) -> str:
    """An ID as the user typed it, as lower-case hex digits; a UsageError
    when it is neither a full UUID nor a prefix of 4+ hex digits."""
    compact = text.strip().replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{4,32}", compact):
        raise UsageError(f"'{text}' is not a session ID; give a UUID or at least "
                         f"4 of its leading hex characters")
    return compact


def resolve_session_id(store: SqliteStore, text: str) -> uuid.UUID:
    """The one parser of IDs the user types: a full UUID or a unique prefix
    of 4+ hex digits, hyphens optional, any case."""
    compact = compact_session_id(text)
    if len(compact) == 32:
        return parse_uuid(compact)
    prefix = "-".join(compact[a:b] for a, b in _UUID_PIECES if compact[a:b])
    matches = store.find_session_ids(prefix, limit=11)
    if not matches:
        raise SessionNotFound(text)
    if len(matches) > 1:
        raise AmbiguousSessionID(text, matches[:10] + (["..."] if len(matches) > 10 else []))
    return parse_uuid(matches[0])


def load_session(store: SqliteStore, text: object) -> Session:
    """The session the user named: an ID text, or LATEST_SESSION."""
    if text is LATEST_SESSION:
        latest = store.list_sessions(limit=1)
        if not latest:
            raise SessionNotFound(None, "there is no session to continue; start one with "
                                        "synapse \"MESSAGE\"")
        session_id = latest[0].id
    else:
        session_id = resolve_session_id(store, str(text))
    session = store.get_session(session_id)
    if session is None:
        raise SessionNotFound(text)
    return session


def open_store(config: Config, create: bool = True) -> SqliteStore:
    """The store SPEC §4 places: ``SYNAPSE_DATABASE_URL``, else the config's.
    Unless ``create``, a database that is not there yet is not made."""
    path = database_path(None, os.environ, config.session.database_url)
    if not create and not os.path.exists(path):
        raise SessionNotFound(None, f"there is no session to continue: {path} does not exist yet")
    return SqliteStore(path)


class Conversation:
    """A session as the chat flow holds it: its record, its messages so far,
    the provider in force and the plan's request options.

    A new session is stored together with its first message, in one
    transaction: until then ``stored`` is False.  Under a plan that does not
    ``save`` (--no-save) everything happens in memory only; ``store`` is then
    None, or the store the history was read from.
    """

    def __init__(self, store: Optional[SqliteStore], session: Session, history: List[StoredMessage],
                 provider: Provider, config: Config, plan: ChatPlan, stored: bool):
        self.store, self.session, self.history = store, session, history
        self.provider, self.config, self.plan, self.stored = provider, config, plan, stored

    def __enter__(self) -> "Conversation":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.store is not None:
            self.store.close()

    @property
    def saving(self) -> bool:
        return self.plan.save and self.store is not None

    def start_new(self) -> None:
        """Go on in a new session, shaped as the plan says (stored with its first message)."""
        plan = self.plan
        self.session = Session.new(self.provider.name, self.provider.model,
                                   plan.system_prompt or self.config.system_prompt, plan.name)
        self.history, self.stored = [], False

    def request(self, upto: int) -> ChatRequest:
        """What the first ``upto`` messages of the history send."""
        config, plan = self.config, self.plan
        temperature = config.temperature if plan.temperature is None else plan.temperature
        return ChatRequest(self.session.system_prompt,
                           [(m.role.value, m.content) for m in self.history[:upto]
                            if m.role != Role.SYSTEM],
                           config.max_tokens, temperature, config.timeout, plan.stream)

    def send(self, text: str, out: Callable[[str], None]) -> Optional[StoredMessage]:
        """SPEC §6 steps 6 to 9: store ``text``, give each piece of the reply
        to ``out`` as it arrives, store the reply -- what arrived of it,
        whatever ends the stream -- with who wrote it, its tokens and why it
        ended (SPEC §11).  Returns the stored reply."""
        self._keep(StoredMessage.new(self.session.id, Role.USER, text))  # before the network
        return self._answer(len(self.history) - 1, out, retry=False)

    def last_question(self) -> Optional[int]:
        """Where the last user message is in the history (None: there is none)."""
        return next((i for i in range(len(self.history) - 1, -1, -1)
                     if self.history[i].role == Role.USER), None)

    def retry_replaces(self) -> bool:
        """Whether a retry now would replace a reply (the last user message has one)."""
        asked = self.last_question()
        return asked is not None and asked < len(self.history) - 1

    def retry(self, out: Callable[[str], None]) -> Optional[StoredMessage]:
        """Ask again for the last user message (SPEC §10).  A complete new
        reply replaces what followed it, in one transaction; when it had no
        reply, the new one is kept as any reply is, partial included."""
        asked = self.last_question()
        if asked is None:
            raise SynapseError("nothing to retry: the session has no message of yours")
        return self._answer(asked, out, retry=True)

    def _answer(self, asked: int, out: Callable[[str], None], retry: bool) -> Optional[StoredMessage]:
        """Stream the reply to the history up to its message ``asked`` and keep it."""
        answered = asked < len(self.history) - 1  # a retry would replace a reply
        pieces: List[str] = []
        usage, ending = Usage(), "error"
        reply: Optional[StoredMessage] = None
        try:
            for item in stream_chat(self.provider, self.request(asked + 1)):
                if isinstance(item, Usage):
                    usage = usage.merged(item)
                else:
                    pieces.append(item)
                    out(item)
            ending = ""
        except (KeyboardInterrupt, Terminated, BrokenPipeError, OutputError):
            ending = "interrupted"
            raise
        except ProviderError as exc:
            if pieces:
                kept = "the old reply was kept" if answered else "the partial reply was kept"
                raise ProviderError(f"{exc}; {kept}") from None
            warning = cut_off_warning(usage.stop_reason, self.config.max_tokens)
            raise ProviderError(f"{exc}\nsynapse: warning: {warning}" if warning else str(exc)) from None
        finally:
            if pieces and not (ending and answered):  # a retry keeps the old reply over a partial one
                reply = StoredMessage.new(
                    self.session.id, Role.ASSISTANT, "".join(pieces), provider=self.provider.name,
                    model=self.provider.model, input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens, stop_reason=ending or usage.stop_reason)
                with signals_held():
                    if retry:
                        if self.saving:
                            self.store.replace_reply(self.history[asked], reply)
                        self.history[asked + 1:] = [reply]
                    else:
                        self._keep(reply)
            if not ending:
                out("\n")
            elif pieces:  # the line ends before the news of what ended the reply
                with contextlib.suppress(SynapseError, OSError):
                    out("\n")
        return reply

    def _keep(self, message: StoredMessage) -> None:
        if self.saving:
            if self.stored:
                self.store.add_message(message)
            else:
                self.store.create_session(self.session, [message])
        self.stored = True
        self.history.append(message)

    def undo(self, count: int) -> List[StoredMessage]:
        """Remove the last ``count`` exchanges; returns what went."""
        if not self.stored:
            return []
        if not self.saving:
            cut = exchanges_start([m.role for m in self.history], count)
            removed, self.history = self.history[cut:], self.history[:cut]
            return removed
        removed = self.store.undo(self.session.id, count)
        self.history = self.store.get_messages(self.session.id)
        return removed

    def fork(self) -> None:
        """Go on in a fork of the session (SPEC §10)."""
        if not self.stored:
            raise SynapseError("nothing to fork yet: the session starts with your first message")
        self.session, self.history = forked(self.session, self.history, 0, None)
        if self.saving:
            self.store.create_session(self.session, self.history)

    def rename(self, name: Optional[str]) -> None:
        if self.stored and self.saving:
            self.store.rename_session(self.session.id, name)
        self.session = self.session._replace(name=name)


def forked(session: Session, messages: Sequence[StoredMessage], undo: int,
           name: Optional[str]) -> Tuple[Session, List[StoredMessage]]:
    """A fork of ``session`` (not stored): its provider, model and system
    prompt, ``forked_from`` its ID, copies of its messages but the last
    ``undo`` exchanges (new IDs; roles, text, times and SPEC §11 fields kept);
    named ``name``, else after the source (SPEC §10)."""
    kept = messages[:exchanges_start([m.role for m in messages], undo)]
    if name is None:
        first = next((m.content for m in messages if m.role == Role.USER), None)
        title = session.name or (shorten(first, PREVIEW_LENGTH) if first else None)
        name = f"{title} (fork)" if title else f"fork of {str(session.id)[:8]}"
    fork = Session.new(session.provider, session.model, session.system_prompt, name)
    fork = fork._replace(forked_from=session.id)
    return fork, [m._replace(id=new_message_id(), session_id=fork.id) for m in kept]


def cut_off_warning(stop_reason: Optional[str], max_tokens: int) -> Optional[str]:
    """What to say when the token limit cut a reply short (SPEC §11)."""
    if stop_reason not in ("length", "max_tokens"):
        return None
    return f"the reply was cut off at max_tokens ({max_tokens}); raise max_tokens in the config"


def open_conversation(plan: ChatPlan, config: Config) -> Conversation:
    """SPEC §6 steps 1 and 3 to 5: the provider, the store, the automatic
    cleanup, and the session to talk in, continued or new.  A plan that does
    not save opens no store for a new session, and reads a continued one
    without writing (no cleanup, no model switch stored)."""
    if plan.session is None:
        # Resolved before the store opens: a missing key leaves no trace.
        provider = resolve_provider(config, plan.provider, plan.model)
        store = open_store(config) if plan.save else None
        if store is not None:
            with _closed_on_error(store):
                if config.session.auto_cleanup:
                    store.cleanup(config.session)
        conversation = Conversation(store, Session.new(provider.name, provider.model), [],
                                    provider, config, plan, stored=False)
        conversation.start_new()
        return conversation
    store = open_store(config, create=plan.save)
    with _closed_on_error(store):
        session = load_session(store, plan.session)
        # -p without -m: that provider's own model, not the session's.
        provider = resolve_provider(config, plan.provider or session.provider,
                                    plan.model or (None if plan.provider else session.model))
        if plan.save and config.session.auto_cleanup:
            store.cleanup(config.session, protect=session.id)
        if (provider.name, provider.model) != (session.provider, session.model):
            if plan.save:
                store.switch_model(session.id, provider.name, provider.model)
            session = session._replace(provider=provider.name, model=provider.model)
        return Conversation(store, session, store.get_messages(session.id), provider, config,
                            plan, stored=True)


@contextlib.contextmanager
def _closed_on_error(store: SqliteStore) -> Iterator[None]:
    try:
        yield
    except BaseException:
        store.close()
        raise


def clean_text(text: str) -> str:
    """Command-line text with undecodable bytes made U+FFFD (never a crash)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def piped_text(stdin: Optional[TextIO]) -> str:
    """What is piped in (read as UTF-8, undecodable bytes as U+FFFD); ""
    when stdin is a terminal or absent."""
    if stdin is None or stdin.isatty():
        return ""
    return stdin.buffer.read().decode("utf-8", "replace").rstrip()


def file_block(path: str) -> str:
    """A file for a message (SPEC §10): its path as given, then its text in a
    fence longer than any run of backticks that starts one of its lines."""
    try:
        with open(os.path.expanduser(path), "rb") as attached:
            data = attached.read()
    except OSError as exc:
        reason = ("is a directory" if isinstance(exc, IsADirectoryError)
                  else f"cannot be read ({exc.strerror})")
        raise UsageError(f"{path} {reason}; -f attaches a text file") from None
    try:
        if b"\0" in data:
            raise ValueError
        text = data.decode("utf-8")
    except ValueError:
        raise UsageError(f"{path} looks binary (a NUL byte or invalid UTF-8); -f attaches "
                         f"text files only") from None
    runs = [len(run) for run in re.findall(r"^`+", text, re.MULTILINE)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    body = text if not text or text.endswith("\n") else text + "\n"
    return f"{path}\n{fence}\n{body}{fence}"


def compose_message(argument: Optional[str], piped: str, files: Sequence[str] = ()) -> str:
    """SPEC §2 and §10: each file, the piped text, then MESSAGE, a blank line
    between them, trailing whitespace stripped (possibly empty)."""
    parts = [file_block(path) for path in files]
    parts += [piped] if piped else []
    parts += [argument] if argument is not None else []
    return "\n\n".join(parts).rstrip()


def require_text(message: str) -> str:
    if not message.strip():
        raise UsageError("the message is empty; give one as an argument or pipe text in")
    return message


# ---------------------------------------------------------------------------
# 7. Portability -- export as JSON Lines, import from Synapse, ChatGPT and llm
#    files
#
# The JSON a session is written as, and the readers of every kind of file
# ``sessions import`` takes.  A reader turns a file into ImportedSession
# records, rows in the stored form, checked as they are read: a file that is
# wrong anywhere raises ImportFailure (naming the line or conversation) before
# any of it is written.  SqliteStore stages, merges and backs up (section 4);
# the commands are in section 8.
# ---------------------------------------------------------------------------


def session_object(row: Sequence, message_rows: Iterable[Sequence]) -> Dict[str, object]:
    """``show --json``'s object from stored rows: the session's in SESSION_FIELDS
    order, its messages' in MESSAGE_FIELDS order."""
    session: Dict[str, object] = dict(zip(SESSION_FIELDS, row))
    session["messages"] = [dict(zip(MESSAGE_FIELDS, m)) for m in message_rows]
    return session


def session_json(session: Session, messages: Iterable[StoredMessage]) -> Dict[str, object]:
    """What ``show --json`` prints: the object ``export --all`` writes from the rows."""
    return session_object(_session_row(session),
                          ((r[0], *r[2:]) for r in map(_message_row, messages)))


# json.dumps escapes C0 controls but not DEL, C1 and the bidirectional
# overrides; escaped too, JSON is safe on any terminal and decodes the same.
# So are U+2028 and U+2029, where str.splitlines, and so many a reader of
# JSON Lines, would end a line.
_JSON_UNSAFE = "[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"


def json_text(value: object, indent: Optional[int] = 2) -> str:
    """What ``--json`` and ``export --format json`` print; with ``indent``
    None, one compact line of JSON Lines (``export --all``, ``--format jsonl``)."""
    text = json.dumps(value, ensure_ascii=False, indent=indent,
                      separators=(",", ": ") if indent is not None else (",", ":"))
    return re.sub(_JSON_UNSAFE, lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


# -- the fields of a file to import --------------------------------------------------


IMPORT_CHUNK = 1 << 20  # bytes read at a time
MAX_ZIP_MEMBER = 1 << 30  # bytes a zip member may unpack to,
MAX_ZIP_RATIO = 200  # and times its compressed size (a zip bomb is refused unread)
_JSON_KINDS: Mapping[str, tuple] = MappingProxyType({
    "string": (str,), "integer": (int,), "number": (int, float), "object": (dict,),
    "array": (list,)})
_ROLES = frozenset(role.value for role in Role)
_STORED_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_STORED_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00"

def _fields(value: object, fields: Sequence[Tuple[str, str, bool]], where: str) -> List[Any]:
    """The values of a JSON object's ``fields``, each (key, JSON kind -- a key
    of _JSON_KINDS --, required), checked: one absent or null is None, unless
    it is required."""
    if type(value) is not dict:
        raise ImportFailure(f"{where}: not a JSON object")
    found = []
    for key, kind, required in fields:
        item = value.get(key)
        if item is None:
            if required:
                raise ImportFailure(f"{where}: '{key}' is missing")
        elif type(item) not in _JSON_KINDS[kind]:  # exactly: true is not an integer here
            raise ImportFailure(f"{where}: '{key}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
        found.append(item)
    return found


def _field(value: object, key: str, kind: str, where: str, required: bool = False) -> Any:
    return _fields(value, ((key, kind, required),), where)[0]


def _checked_count(count: Optional[int], key: str, where: str) -> Optional[int]:
    if count is not None and not 0 <= count <= MAX_COUNT:
        raise ImportFailure(f"{where}: '{key}' must be a count from 0 to {MAX_COUNT}")
    return count


def imported_id(text: str, where: str) -> str:
    """A UUID from a file in the stored form (hyphenated, lower case)."""
    if re.fullmatch(_STORED_ID, text):
        return text
    try:
        return _key(text)
    except InvalidData:
        raise ImportFailure(f"{where}: {shorten(text, 40)!r} is not a UUID") from None


def foreign_id(source_key: str) -> str:
    """The ID of a session or message from another tool, derived from its
    own (SPEC §12: ``chatgpt:…``, ``llm:…``), so that a second import adds nothing."""
    import uuid
    return str(uuid.uuid5(uuid.NAMESPACE_URL, source_key))


def imported_time(text: str, where: str) -> str:
    """An ISO 8601 date-time from a file in the stored form; naive is UTC."""
    try:
        if re.fullmatch(_STORED_TIME, text):  # most of an export: only the ranges to check
            datetime.fromisoformat(text)
            return text
        return format_timestamp(iso_datetime(text))
    except (ValueError, OverflowError, InvalidData):
        raise ImportFailure(f"{where}: {shorten(text, 40)!r} is not an ISO 8601 date-time") from None


def epoch_time(seconds: float, where: str) -> str:
    """Seconds since 1970 (ChatGPT's times) in the stored form."""
    try:
        return format_timestamp(datetime.fromtimestamp(seconds, timezone.utc))
    except (ValueError, OverflowError, OSError):
        raise ImportFailure(f"{where}: {seconds!r} is not a valid time") from None


# -- JSON, read a value at a time -------------------------------------------------


_JSON_DECODER = json.JSONDecoder()
_JSON_SPACE = r"[ \t\n\r]*"
_SURROGATE = "[\ud800-\udfff]"
# The text of a surrogate escape: decoded, a pair is one character, a lone
# one a string SQLite cannot store, which the decoded value is searched for.
_SURROGATE_ESCAPE = r"\\u[dD][89a-fA-F]"


class JsonValues:
    """A window of decoded text over a file's chunks of bytes, from which
    whole JSON values are taken one at a time, with line numbers: memory
    holds one value, not the file (SPEC §12: a conversation at a time)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()  # drops a leading BOM
        self.text, self.pos, self._ended = "", 0, False
        self._line, self._line_pos = 1, 0  # the line number at text[_line_pos]

    def line_at(self, index: int) -> int:
        # Counting only what was not counted yet keeps the numbering linear.
        self._line += self.text.count("\n", self._line_pos, index)
        self._line_pos = index
        return self._line

    def _fill(self, want: int) -> bool:
        """Drop what was taken and read until ``want`` characters wait or the
        file ends; False when nothing was added."""
        self.line_at(self.pos)
        pending = [self.text[self.pos:]]
        have, grew = len(pending[0]), False
        while have < want and not self._ended:
            data = next(self._chunks, b"")
            self._ended = not data
            try:
                text = self._utf8.decode(data, final=self._ended)
            except UnicodeDecodeError:
                raise ImportFailure(f"not valid UTF-8 (after line {self._line})") from None
            pending.append(text)
            have += len(text)
            grew = grew or bool(text)
        self.text, self.pos, self._line_pos = "".join(pending), 0, 0
        return grew

    def next_char(self) -> str:
        """Skip whitespace; the next character, or '' at the end of the file."""
        while True:
            self.pos = re.compile(_JSON_SPACE).match(self.text, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.text) or not self._fill(IMPORT_CHUNK):
                return self.text[self.pos:self.pos + 1]

    def value(self, where: str) -> Any:
        """Decode the JSON value at the cursor, reading on while it may be incomplete."""
        start = self.line_at(self.pos)
        while True:
            try:
                value, end = _JSON_DECODER.raw_decode(self.text, self.pos)
                if end < len(self.text) or self._ended:  # else a number may go on
                    break
            except json.JSONDecodeError as exc:
                # An incomplete value fails near the end of the text read (or in
                # an open string); anything else is wrong, and said at once.
                incomplete = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.text) - 16
                if self._ended and incomplete:
                    raise ImportFailure(f"{where}: truncated: the file ends inside it") from None
                if not incomplete:
                    at = self.line_at(max(exc.pos, self.pos))
                    raise ImportFailure(f"{where}: invalid JSON: {exc.msg}"
                                        + ("" if at == start else f" (line {at})")) from None
            except (ValueError, RecursionError) as exc:  # a huge integer, deep nesting
                raise ImportFailure(f"{where}: invalid JSON ({type(exc).__name__})") from None
            # Doubling what waits before each retry bounds the retries of one
            # value to O(log n): a single huge value still costs linear time.
            self._fill(2 * (len(self.text) - self.pos))
        if re.compile(_SURROGATE_ESCAPE).search(self.text, self.pos, end) and _holds_lone_surrogate(value):
            raise ImportFailure(f"{where}: a string holds an unpaired UTF-16 surrogate, "
                                f"which is not text")
        self.pos = end
        return value


def _holds_lone_surrogate(value: object) -> bool:
    pending = [value]  # a stack, not recursion: the value may nest as deep as JSON lets it
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if re.search(_SURROGATE, item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def iter_json_values(chunks: Iterator[bytes]) -> Iterator[Tuple[str, Any]]:
    """(where, value): each element of a JSON array ("item N"), or each of
    the JSON values one after another ("line N"): one object, or JSON Lines."""
    reader = JsonValues(chunks)
    first = reader.next_char()
    if first == "[":
        reader.pos += 1
        count = 0
        while True:
            char = reader.next_char()
            if not char:
                raise ImportFailure(f"truncated: the JSON array ends after item {count}")
            if char == "]":
                break
            if count:
                if char != ",":
                    raise ImportFailure(f"item {count}: invalid JSON: expected ',' or ']' after "
                                        f"it (line {reader.line_at(reader.pos)})")
                reader.pos += 1
                reader.next_char()
            count += 1
            yield f"item {count}", reader.value(f"item {count}")
        reader.pos += 1
        if reader.next_char():
            raise ImportFailure(f"unexpected data after the JSON array "
                                f"(line {reader.line_at(reader.pos)})")
    elif first == "{":
        while reader.next_char():
            where = f"line {reader.line_at(reader.pos)}"
            yield where, reader.value(where)
    elif first:
        raise ImportFailure("not a Synapse, ChatGPT or llm file")


def json_sessions(chunks: Iterator[bytes]) -> Iterator[ImportedSession]:
    """The sessions of a JSON file: Synapse's (one ``show --json`` object, an
    array of them, JSON Lines) or ChatGPT's conversations, as its first value says."""
    read: Optional[Callable[[Any, str], Optional[ImportedSession]]] = None
    for where, value in iter_json_values(chunks):
        if read is None:
            if not isinstance(value, dict) or not {"mapping", "messages"} & value.keys():
                raise ImportFailure(f"{where}: neither a Synapse session nor a ChatGPT conversation")
            read = chatgpt_session if "mapping" in value else synapse_session
        session = read(value, where)
        if session is not None:
            yield session


# -- Synapse's own files ---------------------------------------------------------


# ``show --json``'s fields, in the stored columns' order: (key, JSON kind, required).
_SYNAPSE_SESSION = (("id", "string", True), ("name", "string", False), ("provider", "string", True),
                    ("model", "string", True), ("system_prompt", "string", False),
                    ("created_at", "string", True), ("updated_at", "string", True),
                    ("forked_from", "string", False), ("messages", "array", True))
_SYNAPSE_MESSAGE = (("id", "string", True), ("role", "string", True), ("content", "string", True),
                    ("timestamp", "string", True), ("provider", "string", False),
                    ("model", "string", False), ("input_tokens", "integer", False),
                    ("output_tokens", "integer", False), ("stop_reason", "string", False))


def synapse_session(value: object, where: str) -> ImportedSession:
    """One ``show --json`` object.  Files of older versions may lack the
    SPEC §11 fields and ``forked_from``: they import as null."""
    *row, messages = _fields(value, _SYNAPSE_SESSION, where)
    session_id = row[0] = imported_id(row[0], f"{where}: 'id'")
    row[5] = imported_time(row[5], f"{where}: 'created_at'")
    row[6] = imported_time(row[6], f"{where}: 'updated_at'")
    if row[7] is not None:
        row[7] = imported_id(row[7], f"{where}: 'forked_from'")
    return ImportedSession(tuple(row), [_synapse_message(m, session_id, f"{where}: message {i}")
                                        for i, m in enumerate(messages, 1)])


def _synapse_message(value: object, session_id: str, where: str) -> tuple:
    (message_id, role, content, timestamp, provider, model, input_tokens, output_tokens,
     stop_reason) = _fields(value, _SYNAPSE_MESSAGE, where)
    if role not in _ROLES:
        raise ImportFailure(f"{where}: 'role' must be user, assistant or system")
    return (imported_id(message_id, f"{where}: 'id'"), session_id, role, content,
            imported_time(timestamp, f"{where}: 'timestamp'"), provider, model,
            _checked_count(input_tokens, "input_tokens", where),
            _checked_count(output_tokens, "output_tokens", where), stop_reason)


# -- ChatGPT's data export ------------------------------------------------------------


def chatgpt_session(conversation: object, where: str) -> Optional[ImportedSession]:
    """One conversation of a ChatGPT ``conversations.json`` (SPEC §12 and
    fixtures/chatgpt/README.md), or None when it keeps no message (its hidden
    system messages only, say): an empty session would only clutter the list."""
    cid = (_field(conversation, "conversation_id", "string", where)
           or _field(conversation, "id", "string", where, True))
    where = f"{where} (conversation {cid})"
    mapping = _field(conversation, "mapping", "object", where, True)
    # The branch the user last saw: from current_node back to the root
    # (regenerated and edited branches left behind are not imported; the
    # mapping's key order means nothing).
    path: List[str] = []
    node_id = _field(conversation, "current_node", "string", where, True)
    while node_id is not None:
        node = mapping.get(node_id)
        if not isinstance(node, dict):
            raise ImportFailure(f"{where}: node {node_id} is missing from the mapping")
        if len(path) >= len(mapping):  # more steps than nodes: the links go round
            raise ImportFailure(f"{where}: its parent links form a cycle at node {node_id}")
        path.append(node_id)
        node_id = _field(node, "parent", "string", f"{where}: node {node_id}")
    session_id = foreign_id(f"chatgpt:{cid}")
    created = epoch_time(_field(conversation, "create_time", "number", where, True),
                         f"{where}: 'create_time'")
    updated = _field(conversation, "update_time", "number", where)
    timestamp, system_prompt, model, messages = created, None, "chatgpt", []
    for node_id in reversed(path):
        node_where = f"{where}: node {node_id}"
        message = _field(mapping[node_id], "message", "object", node_where)
        kept = message and _chatgpt_text(message, node_where)
        if not kept:
            continue
        role, text = kept
        stamp = _field(message, "create_time", "number", node_where)
        if stamp is not None:  # else the previous kept message's (at first the conversation's)
            timestamp = epoch_time(stamp, f"{node_where}: 'create_time'")
        if role == "system":
            system_prompt = system_prompt or text
            continue
        slug = None
        if role == "assistant":
            slug = _field(message.get("metadata") or {}, "model_slug", "string", node_where)
            model = slug or model
        messages.append((foreign_id(f"chatgpt:{cid}:{node_id}"), session_id, role, text, timestamp,
                         "openai" if role == "assistant" else None, slug, None, None, None))
    if not messages:
        return None
    return ImportedSession((
        session_id, _field(conversation, "title", "string", where), "openai", model, system_prompt,
        created, created if updated is None else epoch_time(updated, f"{where}: 'update_time'"),
        None), messages)


def _chatgpt_text(message: Dict[str, Any], where: str) -> Optional[Tuple[str, str]]:
    """(role, text) of a message that is imported; None for one that is skipped."""
    role = _field(_field(message, "author", "object", where, True), "role", "string", where, True)
    metadata = _field(message, "metadata", "object", where) or {}
    if metadata.get("is_visually_hidden_from_conversation") or role not in _ROLES:
        return None  # hidden, or a tool's message
    if role == "assistant" and (_field(message, "recipient", "string", where) or "all") != "all":
        return None  # a command to a tool (browser, python)
    content = _field(message, "content", "object", where, True)
    kind = content.get("content_type")
    if kind == "code":
        language = _field(content, "language", "string", where) or "unknown"
        code = _field(content, "text", "string", where, True)
        text = f"```{'' if language == 'unknown' else language}\n{code}\n```"
    elif kind in ("text", "multimodal_text"):
        parts = _field(content, "parts", "array", where) or []
        if kind == "multimodal_text":
            parts = ["[image]" if isinstance(p, dict) and p.get("content_type") == "image_asset_pointer"
                     else p for p in parts]
        text = "\n\n".join(p for p in parts if isinstance(p, str) and p)
    else:
        return None  # thoughts, reasoning_recap, user_editable_context, execution_output, ...
    return (role, text) if text.strip() else None


_SPLIT_MEMBER = r"conversations-(\d+)\.json"


def chatgpt_zip_sessions(path: str) -> Iterator[ImportedSession]:
    """The sessions of a ChatGPT export zip: its conversations.json, else its
    conversations-NNN.json in numeric order, each read a conversation at a
    time; the other members are never opened."""
    import struct
    import zipfile
    import zlib

    damaged = (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, struct.error,
               zlib.error)
    try:
        archive = zipfile.ZipFile(path)
    except damaged as exc:
        raise ImportFailure(f"not a readable zip archive ({exc})") from None
    with archive:
        members = archive.infolist()
        members = [m for m in members if m.filename == "conversations.json"] or sorted(
            (m for m in members if re.fullmatch(_SPLIT_MEMBER, m.filename)),
            key=lambda m: int(re.fullmatch(_SPLIT_MEMBER, m.filename).group(1)))  # type: ignore[union-attr]
        if not members:
            raise ImportFailure("a zip archive without conversations.json "
                                "(nor conversations-000.json, ...)")
        for member in members:
            # From the archive's directory, before a byte is unpacked; and
            # zipfile never unpacks more than the size the directory declares.
            if member.file_size > MAX_ZIP_MEMBER or member.file_size > member.compress_size * MAX_ZIP_RATIO:
                raise ImportFailure(f"{member.filename}: refused, it would unpack to "
                                    f"{member.file_size} bytes from {member.compress_size} (more than "
                                    f"1 GiB, or more than {MAX_ZIP_RATIO} to 1)")
            try:
                with archive.open(member) as unpacked:
                    yield from json_sessions(iter(lambda: unpacked.read(IMPORT_CHUNK), b""))
            except ImportFailure as exc:
                raise ImportFailure(f"{member.filename}: {exc}") from None
            except damaged as exc:
                raise ImportFailure(f"{member.filename}: a damaged zip member ({exc})") from None


# -- llm's logs database ---------------------------------------------------------------


_OPENAI_MODELS = ("gpt-", "o1", "o3", "o4", "chatgpt")


def llm_provider(model: str, default_provider: str) -> str:
    """The provider of an llm model name (SPEC §12), after any ``plugin/`` prefix."""
    name = model.rpartition("/")[2].lower()
    if name.startswith(_OPENAI_MODELS):
        return "openai"
    if name.startswith("claude"):
        return "anthropic"
    if name.startswith("deepseek"):
        return "deepseek"
    return default_provider


def _with_attachments(text: str, mime_types: Sequence[Optional[str]]) -> str:
    """A prompt and a mark for each attachment, joined by blank lines (as for ChatGPT)."""
    marks = ["[image]" if (kind or "").startswith("image/") else "[attachment]" for kind in mime_types]
    return "\n\n".join(([text] if text else []) + marks)


def _token_columns(db: sqlite3.Connection, table: str) -> str:
    # llm 0.13 had no token columns.
    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    return "input_tokens, output_tokens" if {"input_tokens", "output_tokens"} <= have else "NULL, NULL"


def _llm_call(row: Sequence, where: str) -> Dict[str, Any]:
    """The checked fields of a model call: ``row`` is (conversation, id, model,
    datetime_utc, input tokens, output tokens, ...)."""
    call = dict(zip(("id", "model", "when", "input_tokens", "output_tokens"), row[1:6]))
    for key in ("id", "model", "when"):
        _field(call, key, "string", where, True)
    for key in ("input_tokens", "output_tokens"):
        _checked_count(_field(call, key, "integer", where), key, where)
    call["when"] = imported_time(call["when"], f"{where}: datetime_utc")  # llm 0.13's naive is UTC
    return call


def _classic_calls(db: sqlite3.Connection, tables: Iterable[str]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(conversation id, call) of each ``responses`` row (llm up to 0.31), by conversation."""
    def linked(link: str, target: str, column: str, response_id: str) -> List[str]:
        if not {link, target} <= set(tables):
            return []
        values = [row[0] for row in db.execute(
            f'SELECT t.{column} FROM {link} x JOIN {target} t ON t.id = x.{target[:-1]}_id'
            f' WHERE x.response_id = ? ORDER BY x."order"', (response_id,))]
        if not all(isinstance(v, str) or v is None for v in values):
            raise ImportFailure(f"response {response_id}: a {target[:-1]} is not text")
        return [v or "" for v in values]

    rows = db.execute("SELECT CAST(coalesce(conversation_id, id, '') AS TEXT) AS cid, id, model,"
                      f" datetime_utc, {_token_columns(db, 'responses')}, prompt, system, response"
                      " FROM responses ORDER BY cid")
    for row in rows:
        where = f"response {row[1]}"
        call = _llm_call(row, where)
        texts = dict(zip(("prompt", "system", "response"), row[6:9]))
        for key in texts:
            _field(texts, key, "string", where)
        prompt, system = texts["prompt"], texts["system"]
        # What llm before 0.32 sent: the fragments, then the typed prompt, a newline apart.
        fragments = linked("prompt_fragments", "fragments", "content", call["id"])
        system_fragments = linked("system_fragments", "fragments", "content", call["id"])
        call["prompt"] = _with_attachments("\n".join(fragments + [prompt] if prompt else fragments),
                                           linked("prompt_attachments", "attachments", "type", call["id"]))
        call["system"] = "\n".join(system_fragments + [system] if system else system_fragments) or None
        call["response"] = texts["response"]
        yield row[0], call


class LlmMessages:
    """llm 0.32's content-addressed messages: chains of hash -> (parent hash,
    role), shared between conversations, with their parts."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.nodes = {digest: (parent, role) for digest, parent, role in
                      db.execute("SELECT hash, parent_hash, role FROM messages")}
        self.roots: Dict[str, Optional[str]] = {}

    def node(self, digest: str) -> Tuple[Optional[str], Optional[str]]:
        if digest not in self.nodes:
            raise ImportFailure(f"message {str(digest)[:20]} is missing")
        return self.nodes[digest]

    def walk(self, digest: Optional[str]) -> Iterator[str]:
        """From ``digest`` back to the root; a chain that loops fails."""
        for _ in range(len(self.nodes) + 1):
            if digest is None:
                return
            yield digest
            digest = self.node(digest)[0]
        raise ImportFailure("the llm message chain loops")

    def root(self, digest: Optional[str]) -> Optional[str]:
        # Remembered, so that finding every turn's system message stays linear.
        path = []
        for step in self.walk(digest):
            if step in self.roots:
                digest = self.roots[step]
                break
            path.append(step)
        else:
            digest = path[-1] if path else None
        self.roots.update((step, digest) for step in path)
        return digest

    def content(self, digest: str) -> Tuple[str, List[Optional[str]]]:
        """A message's text parts joined (as llm joins them) and its attachments' MIME types."""
        where = f"message {str(digest)[:20]}"
        texts, attachments = [], []
        for kind, text, payload in self.db.execute(
                "SELECT type, text, payload FROM parts WHERE message_hash = ? ORDER BY position",
                (digest,)):
            if kind not in ("text", "attachment"):
                continue  # tool calls and results, reasoning: not imported
            try:
                data = json.loads(payload) if payload else {}
            except (TypeError, ValueError):
                raise ImportFailure(f"{where}: a part's payload is not JSON") from None
            if not isinstance(data, dict):
                raise ImportFailure(f"{where}: a part's payload is not a JSON object")
            if kind == "attachment":
                ref = data.get("attachment")
                row = self.db.execute("SELECT type FROM attachments WHERE id = ?",
                                      (ref.get("id") if isinstance(ref, dict) else None,)).fetchone()
                attachments.append(row[0] if row and isinstance(row[0], str) else None)
            elif text is not None or "text_ref" in data or "text" in data:
                texts.append(text if text is not None else self.resolve(data, where))
        if not all(isinstance(t, str) for t in texts):
            raise ImportFailure(f"{where}: a text part is not text")
        return "".join(texts), attachments

    def resolve(self, data: Dict[str, Any], where: str) -> Any:
        """The text of a part that refers to fragments (``-f``): literals and
        ``fragments.content``, in order."""
        if "text_ref" not in data:
            return data["text"]
        pieces = data["text_ref"] if isinstance(data["text_ref"], list) else [None]
        out = []
        for piece in pieces:
            if isinstance(piece, dict) and "literal" in piece:
                out.append(piece["literal"])
            elif isinstance(piece, dict) and "fragment" in piece:
                row = self.db.execute("SELECT content FROM fragments WHERE id = ?",
                                      (piece["fragment"],)).fetchone()
                out.append(row[0] if row else None)
            else:
                out.append(None)
        if not all(isinstance(p, str) for p in out):
            raise ImportFailure(f"{where}: a fragment reference does not resolve")
        return "".join(out)


def _turn_calls(db: sqlite3.Connection) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(conversation id, call) of each ``turns`` row (llm 0.32 on), by thread,
    derived as ``llm logs`` derives them: the inputs are the chain up to
    parent_message_hash, the outputs the chain up to tip_message_hash less the inputs."""
    store = LlmMessages(db)
    rows = db.execute("SELECT CAST(coalesce(thread_id, id, '') AS TEXT) AS cid, id, model,"
                      f" datetime_utc, {_token_columns(db, 'turns')}, parent_message_hash,"
                      " tip_message_hash FROM turns ORDER BY cid")
    for row in rows:
        where = f"turn {row[1]}"
        parent, tip = row[6], row[7]
        outputs = []
        for digest in store.walk(tip):
            if digest == parent:
                break
            outputs.append(digest)
        else:
            if parent is not None:
                raise ImportFailure(f"{where}: its tip message does not follow from its parent")
        # The prompt is the user messages of the trailing run of user and tool
        # messages: the history before them belongs to earlier calls, so it
        # is never imported twice.
        own = list(itertools.takewhile(lambda d: store.node(d)[1] in ("user", "tool"),
                                       store.walk(parent)))
        texts, attachments = [], []
        for digest in reversed(own):
            if store.node(digest)[1] == "user":
                text, types = store.content(digest)
                texts.append(text)
                attachments += types
        root = store.root(parent)
        system = store.content(root)[0] if root and store.node(root)[1] == "system" else None
        call = _llm_call(row, where)
        call.update(prompt=_with_attachments("".join(texts), attachments), system=system or None,
                    response="".join(store.content(d)[0] for d in reversed(outputs)))
        yield row[0], call


def _llm_session(cid: str, name: object, calls: List[Dict[str, Any]],
                 default_provider: str) -> ImportedSession:
    where = f"conversation {cid}"
    if name is not None and not isinstance(name, str):
        raise ImportFailure(f"{where}: its name is not text")
    calls.sort(key=lambda c: (c["when"], c["id"]))  # the stored form sorts as time does
    session_id = foreign_id(f"llm:{cid}")
    messages = []
    for c in calls:  # an empty text (a step of a tool call) makes no message
        if c["prompt"]:
            messages.append((foreign_id(f"llm:{c['id']}:prompt"), session_id, "user", c["prompt"],
                             c["when"], None, None, None, None, None))
        if c["response"]:
            messages.append((foreign_id(f"llm:{c['id']}:response"), session_id, "assistant",
                             c["response"], c["when"], llm_provider(c["model"], default_provider),
                             c["model"], c["input_tokens"], c["output_tokens"], None))
    last = calls[-1]
    system = next((c["system"] for c in calls if c["system"]), None)
    return ImportedSession((
        session_id, name, llm_provider(last["model"], default_provider), last["model"], system,
        calls[0]["when"], last["when"], None), messages)


def llm_sessions(path: str, default_provider: str) -> Iterator[ImportedSession]:
    """The sessions of an llm logs database of either generation or both,
    opened read-only and read from one snapshot.  A conversation is the union
    of its ``responses`` and its ``turns``, merged by time; one without any
    call has nothing to import (and no time) and is skipped."""
    import heapq
    import pathlib

    db = None
    try:
        db = sqlite3.connect(pathlib.Path(path).absolute().as_uri() + "?mode=ro", uri=True,
                             isolation_level=None)
        db.execute("PRAGMA trusted_schema = OFF")  # a hostile file's views run no functions
        db.execute("BEGIN")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if {"sessions", "messages"} <= tables and {"provider", "updated_at"} <= {
                row[1] for row in db.execute("PRAGMA table_info(sessions)")}:
            raise ImportFailure("a Synapse database (a backup?), not a file to import; to merge "
                                "it, run `SYNAPSE_DATABASE_URL=THAT_FILE synapse sessions export "
                                "--all -o all.jsonl` and import all.jsonl")
        classic, native = {"conversations", "responses"} <= tables, {"threads", "turns"} <= tables
        if not (classic or native):
            raise ImportFailure("a SQLite database but not an llm logs database")
        names = {}  # conversations.name, else threads.name
        for table, wanted in (("threads", native), ("conversations", classic)):
            if wanted:
                names.update((cid, name) for cid, name in
                             db.execute(f"SELECT CAST(id AS TEXT), name FROM {table}")
                             if name is not None)
        streams = ([_classic_calls(db, tables)] if classic else []) + ([_turn_calls(db)] if native else [])
        # Both streams come by conversation, so merged they group each one.
        merged = heapq.merge(*streams, key=lambda pair: pair[0])
        for cid, group in itertools.groupby(merged, key=lambda pair: pair[0]):
            yield _llm_session(cid, names.get(cid), [call for _, call in group], default_provider)
    except sqlite3.Error as exc:
        raise ImportFailure(f"an unreadable llm database ({exc})") from None
    finally:
        if db is not None:
            db.close()


# -- any file -----------------------------------------------------------------------


def detect_kind(head: bytes) -> str:
    """"sqlite", "zip" or "json", from the first bytes of a file, never its name."""
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"[", b"{", b""):
        return "json"  # nothing but whitespace is JSON Lines of no session
    raise ImportFailure("not a Synapse, ChatGPT or llm file")


@contextlib.contextmanager
def _import_bytes(path: str) -> Iterator[Iterator[bytes]]:
    """The bytes of ``path`` ("-": standard input), in chunks."""
    if path == "-":
        if sys.stdin is None:
            raise ImportFailure("standard input is closed")
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(path, "rb")
        except FileNotFoundError:
            raise ImportFailure("no such file") from None
        except IsADirectoryError:
            raise ImportFailure("a directory, not a file") from None
        except OSError as exc:
            raise ImportFailure(f"cannot read it: {exc.strerror or exc}") from None

    def chunks() -> Iterator[bytes]:
        try:
            yield from iter(lambda: stream.read(IMPORT_CHUNK), b"")
        except OSError as exc:
            raise ImportFailure(f"cannot read it: {exc.strerror or exc}") from None

    try:
        yield chunks()
    finally:
        if path != "-":
            stream.close()


@contextlib.contextmanager
def _on_disk(path: str, chunks: Iterator[bytes]) -> Iterator[str]:
    """A path to read the file at: its own, or for standard input a private
    temporary copy (zipfile and SQLite need a file), removed afterwards."""
    if path != "-":
        yield path
        return
    import shutil
    import tempfile

    folder = None
    try:
        folder = tempfile.mkdtemp(prefix="synapse-import-")  # mode 0700
        copy = os.path.join(folder, "stdin")
        with open(create_private_file(copy), "wb") as out:
            for chunk in chunks:
                out.write(chunk)
    except OSError as exc:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise ImportFailure(f"cannot keep a copy of it to read ({exc.strerror or exc})") from None
    try:
        yield copy
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # with any -journal SQLite left


def _same_file(path: str, other: str) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def read_import(path: str, default_provider: str, database: str) -> Iterator[ImportedSession]:
    """The sessions of the file at ``path`` ("-": standard input), of any kind
    SPEC §12 names, told apart by its content.  ``default_provider`` is the
    provider of an llm model with no provider of its own; ``database`` is the
    store's, which is refused as input."""
    if path != "-" and _same_file(path, database):
        raise ImportFailure("synapse's own database, the one it would import into")
    with _import_bytes(path) as chunks:
        head = next(chunks, b"")
        kind = detect_kind(head)
        chunks = itertools.chain([head], chunks)
        if kind == "json":
            yield from json_sessions(chunks)
            return
        with _on_disk(path, chunks) as local:
            yield from (llm_sessions(local, default_provider) if kind == "sqlite"
                        else chatgpt_zip_sessions(local))


# ---------------------------------------------------------------------------
# 8. Command line
#
# argparse for ``synapse [OPTIONS] [MESSAGE]``, ``synapse sessions ...``,
# ``usage`` and ``models``; the handlers, the editor, and interactive mode.
# Handlers return an exit status or raise a SynapseError; they print, and
# what they call above prints only the reply (``Conversation.send``) and
# config warnings.
# ---------------------------------------------------------------------------


CHAT_EPILOG = """\
session commands:
  synapse sessions list [--limit N] [--json]
  synapse sessions show ID [--json]
  synapse sessions delete ID [ID ...]
  synapse sessions rename ID NAME
  synapse sessions export ID [--format markdown|json|jsonl] [-o FILE]
  synapse sessions export --all [-o FILE]      every session, as JSON Lines
  synapse sessions import FILE... [--dry-run] [--allow-cleanup]
                                  Synapse JSON, ChatGPT's export, llm's logs.db
  synapse sessions backup FILE
  synapse sessions search TEXT [--limit N] [--json]
  synapse sessions cleanup [--dry-run]
  synapse sessions undo ID [--count N]
  synapse sessions fork ID [--undo N] [--name NAME]
  synapse usage [--since WHEN] [--until WHEN] [--by model|provider|day|month|session]
  synapse models [-p NAME] [--json]

examples:
  synapse -p echo "Hello"                 try it with no account
  synapse "Explain SQLite WAL mode"       ask the default provider (deepseek)
  cat app.py | synapse "review this"      piped text, a blank line, then MESSAGE
  synapse -C "and in Rust?"               continue the latest session
  synapse -C --retry                      ask again for your last message
  synapse -f app.py "what does it do?"    a file, fenced, then the message
  synapse -n "a question to forget"       store nothing
  synapse -r                              interactive mode

environment:
  DEEPSEEK_API_KEY, OPENAI_API_KEY, ANTHROPIC_API_KEY
                         API keys (or api_key in the config file)
  SYNAPSE_CONFIG         the config file (else $XDG_CONFIG_HOME/synapse/config.toml,
                         ~/.config/synapse/config.toml)
  SYNAPSE_DATABASE_URL   the database (else [session] database_url in the config,
                         else $XDG_CONFIG_HOME/synapse/sessions.db,
                         ~/.config/synapse/sessions.db)
  SYNAPSE_DEBUG=1        print a traceback with every error

IDs are full UUIDs or unique prefixes of at least 4 hex characters.  A MESSAGE
that starts with "-" follows "--": synapse -- "-1 is odd".
Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error,
130 Ctrl-C, 143 SIGTERM, 129 SIGHUP.
"""


def terminal_columns(default: int) -> int:
    """Columns of the terminal on stdout, as ``shutil.get_terminal_size`` finds
    them, without importing ``shutil`` (and with it ``bz2`` and ``lzma``), a
    sizeable part of the start-up budget."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or default
    except (AttributeError, ValueError, OSError):
        return default


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, sized by ``terminal_columns``; a description or epilog with
    line breaks is laid out by hand and kept, one without is wrapped.

    argparse builds a formatter for every option it is given, even when no
    help is printed, and its own finds the width by importing ``shutil``.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None):
        super().__init__(prog, indent_increment, max_help_position,
                         width if width is not None else terminal_columns(80) - 2)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text or len(indent + text) <= width:  # (textwrap only for what needs it)
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose errors end in synapse's own line, ``synapse: error: ...``,
    and whose help and usage go through ``emit`` and ``note``."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.argv: Sequence[str] = ()

    def parse_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        self.argv = list(args or ())
        # argparse reads "-hello" as -h and more (and Pythons differ in what
        # they make of it): a message that starts with "-" must follow "--".
        stray = self.stray_dash_word()
        if stray is not None:
            self.error(f"'{stray}' is not an option")
        return super().parse_args(args, namespace)

    def stray_dash_word(self) -> Optional[str]:
        """The first word before ``--`` that starts with "-" but is no option:
        neither short flags run together (-Cr, -pecho) nor a known long one.
        Only the chat parser has messages to mistake for options."""
        if self.prog != "synapse":
            return None
        words = iter(self.argv)
        for word in words:
            if word == "--":
                return None
            if not word.startswith("-") or word == "-":
                continue
            if word.startswith("--"):
                action = self._option_string_actions.get(word.split("=")[0])
                if action is None:
                    return word
                if action.nargs is None and "=" not in word:
                    next(words, None)  # its value, whatever it looks like
                continue
            for at, letter in enumerate(word[1:], start=2):
                action = self._option_string_actions.get("-" + letter)
                if action is None:
                    return word
                if action.nargs != 0:  # takes a value: the rest of the word, or the next one
                    if at == len(word):
                        next(words, None)
                    break
        return None

    def _print_message(self, message: str, file: Optional[TextIO] = None) -> None:
        if message:
            if file is sys.stderr:
                note(message.rstrip("\n"))
            else:
                emit(message)

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        hint = ""
        stray = self.stray_dash_word()
        if ("--since" in message or "--until" in message) and WHEN_FORMS not in message:
            hint = f"; WHEN is {WHEN_FORMS}"  # "-3d" is taken for an option
        elif stray is not None:
            hint = f'; a message that starts with "-" must follow --: synapse -- "{stray}"'
        note(f"synapse: error: {message}{hint}")
        raise SystemExit(EXIT_USAGE)


def _add_config_option(parser: argparse.ArgumentParser, default: object = None) -> None:
    parser.add_argument("-c", "--config", metavar="PATH", default=default,
                        help="config file (default: $SYNAPSE_CONFIG, then "
                             "$XDG_CONFIG_HOME/synapse/config.toml)")


def _whole_number(text: str, least: int) -> int:
    if not re.fullmatch(r"\s*[-+]?[0-9]+\s*", text):  # int() takes "1_0" and other digits too
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number")
    value = int(text)
    if not least <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be from {least} to {MAX_COUNT}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _count_int(text: str) -> int:
    return _whole_number(text, 0)


def build_chat_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="synapse", description="Chat with large language models from the terminal: "
        "DeepSeek, Anthropic, OpenAI, Ollama or any OpenAI-compatible server.  Every "
        "conversation is kept in a local SQLite database, to list, search, export and "
        "continue later.", epilog=CHAT_EPILOG)
    parser.add_argument("message", nargs="*", metavar="MESSAGE",
                        help="the message (words are joined by spaces); stdin is read when piped")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("-s", "--session", metavar="ID", help="continue that session")
    which.add_argument("-C", "--continue", dest="continue_latest", action="store_true",
                       help="continue the most recently updated session")
    parser.add_argument("-p", "--provider", metavar="NAME",
                        help="deepseek, openai, anthropic, ollama, echo or a [providers.X] name")
    parser.add_argument("-m", "--model", metavar="NAME", help="model for this turn")
    parser.add_argument("--system", metavar="TEXT", help="system prompt for a new session")
    parser.add_argument("--name", metavar="TEXT", help="name for a new session")
    parser.add_argument("--role", metavar="NAME",
                        help="a new session shaped by [roles.NAME] in the config: its system "
                             "prompt, and provider, model and temperature when it sets them")
    parser.add_argument("-f", "--file", dest="files", action="append", default=[], metavar="PATH",
                        help="put a text file into the message, fenced (repeatable)")
    parser.add_argument("-e", "--edit", action="store_true",
                        help="write the message in $VISUAL or $EDITOR first")
    parser.add_argument("--retry", action="store_true",
                        help="with -s or -C: ask again for the session's last message of yours")
    parser.add_argument("-n", "--no-save", action="store_true",
                        help="store nothing: no session, no message, no cleanup")
    parser.add_argument("-r", "--repl", action="store_true", help="interactive mode")
    parser.add_argument("--no-stream", action="store_true",
                        help="ask the provider for one non-streaming response")
    _add_config_option(parser)
    parser.add_argument("-V", "--version", action="version", version=f"synapse {__version__}")
    return parser


def build_sessions_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="synapse sessions",
                               description="List, read, search and tidy stored sessions.")
    _add_config_option(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: a -c given before the subcommand must not be reset to None.
        _add_config_option(sub, default=argparse.SUPPRESS)
        sub.set_defaults(handler=handler)
        return sub

    an_id = "a session ID: a full UUID or a unique prefix of 4 or more hex characters"
    listing = command("list", command_list, "list sessions, most recently updated first")
    listing.add_argument("--limit", type=_positive_int, metavar="N", help="show at most N")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    _add_filter_options(listing, "sessions updated")
    show = command("show", command_show, "print a session and its messages")
    show.add_argument("id", metavar="ID", help=an_id)
    show.add_argument("--json", action="store_true", help="print a JSON object")
    delete = command("delete", command_delete, "delete sessions and their messages")
    delete.add_argument("ids", nargs="+", metavar="ID", help=an_id)
    rename = command("rename", command_rename, "set a session's name")
    rename.add_argument("id", metavar="ID", help=an_id)
    rename.add_argument("name", metavar="NAME", help="the new name; an empty one clears it")
    export = command("export", command_export,
                     "export a session as Markdown or JSON, or every session as JSON Lines")
    export.add_argument("id", nargs="?", metavar="ID", help=an_id)
    export.add_argument("--all", action="store_true",
                        help="every session instead, oldest first, one JSON object a line: "
                             "what `sessions import` reads on another machine")
    export.add_argument("--format", choices=("markdown", "json", "jsonl"),
                        help="markdown (the default: title, metadata, a section per message), "
                             "json (what show --json prints) or jsonl (the same on one line; "
                             "the only format of --all)")
    export.add_argument("-o", "--output", metavar="FILE",
                        help="write to FILE (a new one is private, mode 0600); - is stdout")
    imports = command("import", command_import,
                      "import sessions from files: Synapse JSON or JSON Lines (what export "
                      "writes), a ChatGPT data export (its .zip or conversations.json), or an "
                      "llm logs.db; each file whole or not at all, and a file imported again "
                      "adds nothing")
    imports.add_argument("files", nargs="+", metavar="FILE", help="a file to import; - is stdin")
    imports.add_argument("--dry-run", action="store_true",
                         help="write nothing; say what would be imported")
    imports.add_argument("--allow-cleanup", action="store_true",
                         help="import even when [session] retention_days or max_sessions would "
                              "have the next chat's automatic cleanup delete imported sessions")
    backup = command("backup", command_backup,
                     "copy the database to a new file, consistent even while other synapse "
                     "processes write; the copy is a database synapse opens as it is")
    backup.add_argument("file", metavar="FILE", help="the copy: a new file (mode 0600)")
    search = command("search", command_search,
                     "find sessions with a message containing TEXT, newest first")
    search.add_argument("text", metavar="TEXT",
                        help="a literal substring (%%, _ and quotes are plain characters); "
                             "case is ignored: ASCII case for ASCII TEXT, Unicode case "
                             "folding for any other")
    search.add_argument("--limit", type=_positive_int, metavar="N", default=SEARCH_DEFAULT_LIMIT,
                        help=f"show at most N (default {SEARCH_DEFAULT_LIMIT})")
    search.add_argument("--json", action="store_true", help="print a JSON array")
    _add_filter_options(search, "sessions updated")
    search.add_argument("--role", choices=("user", "assistant"),
                        help="only matches in the user's messages, or in the replies")
    cleanup = command("cleanup", command_cleanup,
                      "delete now the sessions that [session] retention_days and "
                      "max_sessions in the config doom (also when auto_cleanup is off)")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="delete nothing; list what would go")
    undo = command("undo", command_undo, "remove a session's last exchanges (a message of "
                   "yours and what followed it)")
    undo.add_argument("id", metavar="ID", help=an_id)
    undo.add_argument("--count", type=_positive_int, default=1, metavar="N",
                      help="how many exchanges (default 1)")
    fork = command("fork", command_fork, "copy a session into a new one and print the new ID")
    fork.add_argument("id", metavar="ID", help=an_id)
    fork.add_argument("--undo", type=_count_int, default=0, metavar="N",
                      help="leave out the last N exchanges (default 0)")
    fork.add_argument("--name", metavar="NAME",
                      help="its name (default: the source's name or preview, then (fork))")
    return parser


WHEN_FORMS = ("a date (2026-12-01: local midnight), an ISO 8601 time (2026-12-01T09:30, "
              "local unless it ends in Z or an offset) or a span back from now (90m, 36h, 7d, 2w)")
_SPAN = r"([1-9][0-9]{0,8})([mhdw])"
_SPAN_SECONDS = MappingProxyType({"m": 60, "h": 3600, "d": 86400, "w": 604800})


def parse_when(text: str) -> datetime:
    """A WHEN of SPEC §3 as a UTC datetime."""
    text = text.strip()
    span = re.fullmatch(_SPAN, text)
    try:
        if span:
            return utc_now() - timedelta(seconds=int(span.group(1)) * _SPAN_SECONDS[span.group(2)])
        # No zone: the user's local time, as a date means local midnight.
        moment = (datetime.fromisoformat(text).astimezone() if re.fullmatch(r"\d{4}-\d\d-\d\d", text)
                  else iso_datetime(text, naive=None))
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a time; give {WHEN_FORMS}") from None


def _add_filter_options(parser: argparse.ArgumentParser, on: str) -> None:
    parser.add_argument("--since", type=parse_when, metavar="WHEN",
                        help=f"only {on} from WHEN on: {WHEN_FORMS}")
    parser.add_argument("--until", type=parse_when, metavar="WHEN",
                        help=f"only {on} before WHEN")
    parser.add_argument("--provider", metavar="NAME", help="only this provider's")
    parser.add_argument("--model", metavar="NAME", help="only this model's")


def build_usage_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="synapse usage", description="Sum the tokens, and with [prices.\"MODEL\"] in the "
        "config the cost, of the stored replies.")
    _add_config_option(parser)
    _add_filter_options(parser, "replies")
    parser.add_argument("--by", choices=tuple(USAGE_GROUPS), default="model",
                        help="group by model (the default), provider, day, month or session")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(handler=command_usage)
    return parser


def build_models_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="synapse models",
                               description="List the models a provider offers; * marks the one "
                                           "synapse uses for it.")
    _add_config_option(parser)
    parser.add_argument("-p", "--provider", metavar="NAME",
                        help="the provider to ask (default: the configured one)")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.set_defaults(handler=command_models)
    return parser


COMMAND_PARSERS: Mapping[str, Callable[[], argparse.ArgumentParser]] = MappingProxyType({
    "sessions": build_sessions_parser, "usage": build_usage_parser, "models": build_models_parser})


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """``synapse [-c PATH] sessions|usage|models ...`` goes to its own parser;
    the rest (``synapse -- models`` too) is chat."""
    position = 0
    while position < len(argv) and (argv[position] in ("-c", "--config")
                                    or argv[position].startswith("--config=")):
        position += 1 if "=" in argv[position] else 2
    command = argv[position] if position < len(argv) else None
    if command in COMMAND_PARSERS:
        # A leading -c PATH moves behind the command, which accepts it too.
        return _clean_arguments(COMMAND_PARSERS[command]().parse_args(
            [*argv[position + 1:], *argv[:position]]))
    parser = build_chat_parser()
    args = _clean_arguments(parser.parse_args(argv))
    args.handler = command_repl if args.repl else command_chat
    args.parser = parser
    return args


PATH_ARGUMENTS = frozenset({"config", "files", "output", "file"})  # the OS must find them as given


def _clean_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Undecodable bytes in the text arguments become U+FFFD, as in MESSAGE
    (SPEC §2); paths keep them, to name the file the user named."""
    for name, value in vars(args).items():
        if name in PATH_ARGUMENTS:
            continue
        if isinstance(value, str):
            setattr(args, name, clean_text(value))
        elif isinstance(value, list):
            setattr(args, name, [clean_text(v) if isinstance(v, str) else v for v in value])
    return args


# -- shared helpers ----------------------------------------------------------
def local_time(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def cell_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: East Asian wide and full-width
    characters two, combining marks and other zero-width ones none."""
    if text.isascii():
        return len(text)
    import unicodedata  # only for text that needs it

    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf")
               else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def cut(text: str, limit: int, measure: Callable[[str], int] = len) -> str:
    """``text`` in ``limit`` characters (or columns, measured by ``cell_width``),
    ending in an ellipsis when cut; never mid-character."""
    if measure(text) <= limit:
        return text
    kept, used = [], 0
    for char in text:
        used += measure(char)
        if used > limit - 1:
            break
        kept.append(char)
    return "".join(kept) + "\u2026"


def summary_json(summary: SessionSummary) -> Dict[str, object]:
    return {"id": str(summary.id), "name": summary.name, "provider": summary.provider,
            "model": summary.model, "created_at": format_timestamp(summary.created_at),
            "updated_at": format_timestamp(summary.updated_at),
            "message_count": summary.message_count, "preview": summary.preview}


# -- sessions commands ---------------------------------------------------------


LIST_COLUMNS = ("ID", "NAME", "PROVIDER", "MODEL", "CREATED", "MESSAGES", "PREVIEW")
PIPED_CELL_LIMITS = MappingProxyType({"NAME": 20, "MODEL": 20})  # characters
NARROWEST_CELL = 8  # what PREVIEW, NAME and MODEL shrink to before the ID does


def list_table(summaries: Sequence[SessionSummary], columns: Optional[int]) -> str:
    """``sessions list``'s table: on a terminal of ``columns``, fitted to it
    (SPEC §3: PREVIEW shrinks first, then NAME and MODEL, then the ID shows its
    first 8 characters); piped (``columns`` None), full IDs and cells cut by
    characters."""
    rows = [[str(s.id), s.name, s.provider, s.model, local_time(s.created_at),
             str(s.message_count), s.preview] for s in summaries]
    # One line per row: whitespace folded; on a terminal, controls escaped first,
    # so that the escapes are measured too.
    rows = [[visible(" ".join((cell or "").split()), sys.stdout) for cell in row] for row in rows]
    if columns is None:
        rows = [[cut(c, PIPED_CELL_LIMITS.get(h, len(c))) for h, c in zip(LIST_COLUMNS, row)]
                for row in rows]
    table = [list(LIST_COLUMNS), *rows]
    natural = {h: max(cell_width(r[i]) for r in table) for i, h in enumerate(LIST_COLUMNS)}
    widths = dict(natural) if columns is None else _fitted_widths(natural, columns)
    lines = []
    for row in table:
        cells = []
        for heading, cell in zip(LIST_COLUMNS, row):
            width = widths[heading]
            if heading == "ID" and row is not table[0]:
                cell = cell[:width]  # a prefix stays a valid ID: no ellipsis
            cell = cut(cell, width, cell_width)
            cells.append(cell + " " * (width - cell_width(cell)))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _fitted_widths(natural: Mapping[str, int], columns: int) -> Dict[str, int]:
    widths = dict(natural)

    def excess() -> int:
        return sum(widths.values()) + 2 * (len(widths) - 1) - columns

    for heading in ("PREVIEW", "NAME", "MODEL"):
        floor = min(NARROWEST_CELL, natural[heading])
        widths[heading] = max(floor, widths[heading] - max(excess(), 0))
    if excess() > 0:
        widths["ID"] = NARROWEST_CELL
        # Still too wide: PREVIEW goes (width 0, not negative) before a row wraps.
        widths["PREVIEW"] = max(0, min(natural["PREVIEW"], widths["PREVIEW"] - excess()))
    return widths


def session_filter(args: argparse.Namespace) -> SessionFilter:
    return SessionFilter(args.since, args.until, args.provider, args.model,
                         getattr(args, "role", None))


def command_list(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        summaries = store.list_sessions(args.limit, session_filter(args))
    if args.json:
        emit(json_text([summary_json(s) for s in summaries]), exact=True)
    elif not summaries:
        emit("No sessions found.\n")
    else:
        terminal = sys.stdout is not None and sys.stdout.isatty()
        emit(list_table(summaries, terminal_columns(80) if terminal else None), exact=True)
    return EXIT_OK


def command_show(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        session = load_session(store, args.id)
        messages = store.get_messages(session.id)
    if args.json:
        emit(json_text(session_json(session, messages)), exact=True)
        return EXIT_OK
    lines = [f"Session:  {session.id}"]
    if session.name:
        lines.append(f"Name:     {session.name}")
    lines += [f"Provider: {session.provider}", f"Model:    {session.model}",
              f"Created:  {local_time(session.created_at)}",
              f"Updated:  {local_time(session.updated_at)}"]
    if session.forked_from:
        lines.append(f"Forked from: {session.forked_from}")
    counted = [m for m in messages if m.input_tokens is not None or m.output_tokens is not None]
    if counted:
        lines.append(f"Tokens:   {sum(m.input_tokens or 0 for m in counted)} in, "
                     f"{sum(m.output_tokens or 0 for m in counted)} out")
    if session.system_prompt:
        lines.append(f"System:   {session.system_prompt}")
    lines.append("")
    for message in messages:
        lines += [f"[{message.role.value.upper()}]", message.content, ""]
    emit("\n".join(lines) + "\n")
    return EXIT_OK


def command_delete(args: argparse.Namespace, config: Config) -> int:
    worst = EXIT_OK
    with open_store(config) as store:
        for text in args.ids:
            try:
                session_id = resolve_session_id(store, text)
                if not store.delete_session(session_id):
                    raise SessionNotFound(text)
            except (UsageError, SessionNotFound, AmbiguousSessionID) as exc:
                report_error(str(exc), config)
                worst = max(worst, exc.exit_code)
                continue
            emit(f"Deleted session {session_id}\n")
    return worst


def command_rename(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        session_id = resolve_session_id(store, args.id)
        name = args.name.strip() or None
        store.rename_session(session_id, name)
    emit(f"Renamed session {session_id} to {name!r}\n" if name
         else f"Cleared the name of session {session_id}\n")
    return EXIT_OK


def export_markdown(session: Session, messages: Sequence[StoredMessage]) -> str:
    lines = [f"# {session.name or 'Session ' + str(session.id)}", "",
             f"- Session: `{session.id}`", f"- Provider: {session.provider}",
             f"- Model: {session.model}", f"- Created: {format_timestamp(session.created_at)}",
             f"- Updated: {format_timestamp(session.updated_at)}", ""]
    if session.system_prompt:
        lines += ["## System", "", session.system_prompt, ""]
    for message in messages:
        lines += [f"## {message.role.value.capitalize()}", ""]
        if message.model and message.model != session.model:  # who answered, when not the usual
            lines += [f"*{message.model}*", ""]
        lines += [message.content, ""]
    return "\n".join(lines)


@contextlib.contextmanager
def private_output(path: str) -> Iterator[TextIO]:
    """``path`` open for writing text: a new file is made 0600 (it holds
    conversations); an existing one keeps its mode."""
    path = os.path.expanduser(path)
    try:
        try:
            output = open(create_private_file(path), "w", encoding="utf-8")
        except FileExistsError:
            output = open(path, "w", encoding="utf-8")
        with output:
            yield output
    except OSError as exc:
        raise SynapseError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_private_file(path: str, text: str) -> None:
    with private_output(path) as output:
        output.write(text)


def command_export(args: argparse.Namespace, config: Config) -> int:
    if args.all:
        return _export_all(args, config)
    if args.id is None:
        raise UsageError("give the ID of a session to export, or --all for every session")
    with open_store(config) as store:
        session = load_session(store, args.id)
        messages = store.get_messages(session.id)
    exact = args.format in ("json", "jsonl")
    text = (json_text(session_json(session, messages), None if args.format == "jsonl" else 2)
            if exact else export_markdown(session, messages))
    if args.output in (None, "-"):
        emit(text, exact=exact)
        return EXIT_OK
    write_private_file(args.output, text)
    emit(f"Exported session {session.id} to {args.output}\n")
    return EXIT_OK


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


# Characters of JSON Lines gathered before each write of ``export --all``.
EXPORT_BATCH = 1 << 18


def _export_all(args: argparse.Namespace, config: Config) -> int:
    """``export --all``: JSON Lines, streamed from the database a session at a time."""
    if args.id is not None:
        raise UsageError("give a session ID or --all, not both")
    if args.format not in (None, "jsonl"):
        raise UsageError(f"--all writes JSON Lines only; --format {args.format} is for one session")
    to_stdout = args.output in (None, "-")
    count = 0
    with open_store(config) as store, contextlib.ExitStack() as outputs:
        write = (lambda text: emit(text, exact=True)) if to_stdout else \
            outputs.enter_context(private_output(args.output)).write
        batch: List[str] = []
        size = 0
        with contextlib.closing(store.export_rows()) as rows:
            for row, messages in rows:
                line = json_text(session_object(row, messages), indent=None)
                batch.append(line)
                size += len(line)
                count += 1
                if size >= EXPORT_BATCH:
                    write("".join(batch))
                    batch, size = [], 0
        write("".join(batch))
    if not to_stdout:
        emit(f"Exported {_plural(count, 'session')} to {args.output}\n")
    return EXIT_OK


def command_import(args: argparse.Namespace, config: Config) -> int:
    """``sessions import FILE...``: read and check every file first (its rows
    staged), then the cleanup guard, then one transaction a file."""
    worst = EXIT_OK
    staged: List[Tuple[int, str]] = []
    with open_store(config) as store:
        for index, path in enumerate(args.files):
            label = "stdin" if path == "-" else path
            try:
                sessions = read_import(path if path == "-" else os.path.expanduser(path),
                                       config.provider, store.path)
                with contextlib.closing(sessions):
                    store.stage_import(index, sessions)
            except ImportFailure as exc:
                report_error(f"{label}: {exc}; nothing was imported from it", config)
                worst = EXIT_FAILURE
                continue
            staged.append((index, label))
        refusal = None
        if staged and config.session.auto_cleanup and not args.allow_cleanup:
            refusal = _cleanup_refusal(store.doomed_imports(config.session), config)
        if refusal is not None and not args.dry_run:
            raise refusal
        for index, label in staged:
            counts = store.import_counts(index) if args.dry_run else store.merge_import(index)
            emit(f"{label}: {'Would import' if args.dry_run else 'Imported'} "
                 f"{_plural(counts.sessions, 'session')} ({_plural(counts.messages, 'message')}); "
                 f"{_plural(counts.unchanged, 'session')} already up to date\n")
    if refusal is not None:
        raise refusal
    return worst


def _cleanup_refusal(doomed: CleanupResult, config: Config) -> Optional[UsageError]:
    """The error that stops an import whose sessions the next chat's
    automatic cleanup would delete (SPEC §12), or None."""
    if not doomed.sessions_deleted:
        return None
    limits = config.session
    reasons = [f"{count} {what}" for count, what in (
        (doomed.by_retention, f"past retention_days = {limits.retention_days}"),
        (doomed.by_max_limit, f"over max_sessions = {limits.max_sessions}")) if count]
    where = config.path or find_config_path(None, os.environ)[0]
    return UsageError(
        f"the next chat's automatic cleanup would delete "
        f"{_plural(doomed.sessions_deleted, 'imported session')} ({', '.join(reasons)}); "
        f"nothing was imported. Raise max_sessions or retention_days under [session] in "
        f"{where} (0 turns each off), set auto_cleanup = false there, or pass --allow-cleanup")


def command_backup(args: argparse.Namespace, config: Config) -> int:
    path = os.path.expanduser(args.file)
    with open_store(config) as store:
        store.backup(path)
    emit(f"Backed up {store.path} to {path}\n")
    return EXIT_OK


def command_search(args: argparse.Namespace, config: Config) -> int:
    text = args.text
    if not text:
        raise UsageError("the search text is empty")
    with open_store(config) as store:
        hits = store.search_sessions(text, args.limit, session_filter(args))
    if args.json:
        emit(json_text([{**summary_json(h.session), "snippet": h.snippet} for h in hits]), exact=True)
        return EXIT_OK
    if not hits:
        emit(f"No sessions match {text!r}.\n")
        return EXIT_OK
    lines = []
    for hit in hits:
        s = hit.session
        title = f"  {cut(shorten(s.name, 200), 40)}" if s.name else ""
        lines += [f"{s.id}  {local_time(s.updated_at)}  {s.provider}/{s.model}{title}",
                  f"    {cut(hit.snippet, 100)}"]
    emit("\n".join(lines) + "\n")
    return EXIT_OK


def removed_summary(session_id: uuid.UUID, removed: Sequence[StoredMessage]) -> str:
    """What ``sessions undo`` (and /undo) say: how many went, then each."""
    plural = "message" if len(removed) == 1 else "messages"
    lines = [f"Removed {len(removed)} {plural} from session {session_id}"]
    lines += [f"[{m.role.value.upper()}] {shorten(m.content, PREVIEW_LENGTH)}" for m in removed]
    return "\n".join(lines) + "\n"


def command_undo(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        session = load_session(store, args.id)
        removed = store.undo(session.id, args.count)
    emit(removed_summary(session.id, removed))
    return EXIT_OK


def command_fork(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        source = load_session(store, args.id)
        fork, messages = forked(source, store.get_messages(source.id), args.undo, args.name)
        store.create_session(fork, messages)
    emit(f"{fork.id}\n")  # alone, for $(synapse sessions fork ...)
    return EXIT_OK


def command_cleanup(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        if args.dry_run:
            result, doomed = store.choose_cleanup(config.session)
        else:
            result, doomed = store.cleanup(config.session), []
    counts = (f"{result.sessions_deleted} sessions ({result.by_max_limit} over max_sessions, "
              f"{result.by_retention} past retention_days)")
    if not args.dry_run:
        emit(f"Deleted {counts}\n")
        return EXIT_OK
    emit("".join([f"Would delete {counts}; nothing was deleted (dry run)\n",
                  *(f"  {session_id}\n" for session_id in doomed)]))
    return EXIT_OK


# -- usage and models ------------------------------------------------------------


class UsageGroup(namedtuple("UsageGroup", "key name replies uncounted input_tokens output_tokens"
                                          " cost cost_complete")):
    """One row of ``synapse usage``: the group's ``key`` (and ``name``, by
    session), its reply and token counts, and its ``cost`` (float, the sum
    of what its priced models cost, None when none is priced) with
    ``cost_complete`` False when some of its models have no price."""

    __slots__ = ()


def usage_groups(rows: Iterable[tuple], prices: Mapping[str, Price], by: str) -> List[UsageGroup]:
    """The store's rows (per group and model) summed per group, priced, in
    SPEC §11's order: by cost, then output tokens, those of unknown cost last;
    days and months newest first."""
    sums: Dict[object, List[Any]] = {}
    for key, model, replies, uncounted, tokens_in, tokens_out, name in rows:
        group = sums.setdefault(key, [name, 0, 0, 0, 0, None, True])
        group[1:5] = [group[1] + replies, group[2] + uncounted,
                      group[3] + tokens_in, group[4] + tokens_out]
        price = prices.get(model) if model is not None else None
        if price is None:
            group[6] = False
        else:
            group[5] = (group[5] or 0.0) + tokens_in * price.input / 1e6 + tokens_out * price.output / 1e6
    groups = [UsageGroup(key, *values) for key, values in sums.items()]
    if by in ("day", "month"):
        return sorted(groups, key=lambda g: g.key or "", reverse=True)
    return sorted(groups, key=lambda g: (g.cost is not None, g.cost or 0.0, g.output_tokens),
                  reverse=True)


def format_cost(cost: Optional[float], complete: bool) -> str:
    return "-" if cost is None else f"{cost:.4f}" + ("" if complete else "+")


def command_usage(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        rows = store.usage(args.by, SessionFilter(args.since, args.until, args.provider, args.model))
    groups = usage_groups(rows, config.prices, args.by)
    if args.json:
        emit(json_text([{"group": g.key, "replies": g.replies, "uncounted": g.uncounted,
                         "input_tokens": g.input_tokens, "output_tokens": g.output_tokens,
                         "cost": g.cost} for g in groups]), exact=True)
        return EXIT_OK
    if not groups:
        emit("No replies found.\n")
        return EXIT_OK
    by_session = args.by == "session"
    head = ["SESSION", "NAME"] if by_session else [args.by.upper()]
    uncounted = any(g.uncounted for g in groups)
    numbers = ["REPLIES", *(["UNCOUNTED"] if uncounted else []), "INPUT", "OUTPUT", "COST"]

    def cells(g: UsageGroup) -> List[str]:
        label = [str(g.key), cut(shorten(g.name or "", 200), 30)] if by_session \
            else [str(g.key) if g.key is not None else "(unknown)"]
        return [*label, str(g.replies), *([str(g.uncounted)] if uncounted else []),
                str(g.input_tokens), str(g.output_tokens), format_cost(g.cost, g.cost_complete)]

    known = [g.cost for g in groups if g.cost is not None]
    total = UsageGroup("TOTAL", "", *(sum(getattr(g, f) for g in groups) for f in
                                      ("replies", "uncounted", "input_tokens", "output_tokens")),
                       sum(known) if known else None, all(g.cost_complete for g in groups))
    table = [head + numbers, *(cells(g) for g in groups), cells(total)]
    widths = [max(cell_width(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i < len(head) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in table]
    emit("\n".join(lines) + "\n")
    return EXIT_OK


def command_models(args: argparse.Namespace, config: Config) -> int:
    provider = resolve_provider(config, args.provider, None)
    models = sorted(list_models(provider, config.timeout))
    if args.json:
        emit(json_text([{"id": m, "default": m == provider.model} for m in models]), exact=True)
    elif not models:
        emit(f"No models listed by {provider.name}.\n")
    else:
        emit("".join(f"{m}{' *' if m == provider.model else ''}\n" for m in models))
    return EXIT_OK


# -- chat ----------------------------------------------------------------------


def chat_plan(args: argparse.Namespace, config: Config) -> ChatPlan:
    """The chat flags, read once; a ``--role`` fills in what they leave open."""
    session = args.session if args.session is not None else (
        LATEST_SESSION if args.continue_latest else None)
    if session is not LATEST_SESSION and session is not None:
        compact_session_id(session)  # a malformed ID is refused before anything opens
    for flag, value in (("-p", args.provider), ("-m", args.model), ("--role", args.role)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} needs a name")
    if session is not None and (args.system or args.name):
        warn("--system and --name apply to new sessions; ignored when continuing")
    if args.retry and session is None:
        raise UsageError("--retry asks again in a stored session: give -s ID or -C")
    provider, model, temperature = args.provider, args.model, None
    system = args.system or None
    if args.role is not None:
        if session is not None:
            raise UsageError("--role shapes a new session; it cannot go with -s or -C")
        role = config.roles.get(args.role)
        if role is None:
            known = ", ".join(sorted(config.roles)) or f"none ([roles.NAME] in {config.path or 'the config'})"
            raise UsageError(f"unknown role '{args.role}'; the configured roles are: {known}")
        system = system or role.prompt()
        # -p without -m: that provider's own model, not the role's.
        provider, model = provider or role.provider, model or (None if provider else role.model)
        temperature = role.temperature
    return ChatPlan(session, provider, model, system,
                    args.name or None, temperature,
                    not args.no_stream, not args.no_save)


def command_chat(args: argparse.Namespace, config: Config) -> int:
    """One turn: ``synapse [OPTIONS] MESSAGE``, or ``--retry``."""
    stdin = sys.stdin
    if not (args.message or args.files or args.edit or args.retry) \
            and (stdin is None or stdin.isatty()):
        emit(args.parser.format_help())
        return EXIT_OK
    plan = chat_plan(args, config)
    argument = " ".join(args.message) if args.message else None
    if args.retry:
        if argument is not None or args.files or args.edit or piped_text(stdin):
            raise UsageError("--retry sends the session's last message again: give no MESSAGE, "
                             "piped text, -f or -e with it")
        message = None
    else:
        message = compose_message(argument, piped_text(stdin), args.files)
        message = require_text(edit_message(message) if args.edit else message)
    with signals_end_the_turn(), open_conversation(plan, config) as conversation:
        if message is None:
            _retry(conversation, config)
        else:
            _warn_if_cut_off(conversation.send(message, emit), config)
    if plan.session is None and plan.save and sys.stderr is not None and sys.stderr.isatty():
        note(f"session: {conversation.session.id}")
    return EXIT_OK


def _retry(conversation: Conversation, config: Config) -> None:
    """--retry and /retry; stopped, it says that the old reply stayed."""
    answered = conversation.retry_replaces()
    try:
        _warn_if_cut_off(conversation.retry(emit), config)
    except (KeyboardInterrupt, Terminated):
        if answered:
            note("synapse: the retry was stopped; the old reply was kept")
        raise


def edit_message(text: str) -> str:
    """``text`` as the user leaves it in their editor (SPEC §10): $VISUAL,
    else $EDITOR, else vi, on a private temporary .md file, on the terminal
    even when stdin or stdout is piped.  The file goes whatever happens."""
    import shlex
    import subprocess
    import tempfile

    command = (os.environ.get("VISUAL", "").strip() or os.environ.get("EDITOR", "").strip()
               or "vi")
    try:
        editor = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"cannot read the editor command {command!r}: {exc}") from None
    with contextlib.ExitStack() as cleanup:
        streams = {}
        for name, stream, mode in (("stdin", sys.stdin, "r"), ("stdout", sys.stdout, "w")):
            if stream is None or not stream.isatty():
                try:
                    streams[name] = cleanup.enter_context(open("/dev/tty", mode))
                except OSError:
                    raise UsageError("--edit needs a terminal for the editor, and there is "
                                     "none") from None
        try:
            fd, path = tempfile.mkstemp(prefix="synapse-", suffix=".md")  # mode 0600
            cleanup.callback(_remove_draft, path)
            with open(fd, "w", encoding="utf-8") as draft:
                draft.write(text)
        except OSError as exc:
            raise SynapseError(f"cannot write the editor's file ({exc.strerror or exc}); "
                               f"nothing was sent") from None
        try:
            finished = subprocess.run([*editor, path], **streams)  # type: ignore[call-overload]
        except OSError as exc:
            raise ConfigError(f"cannot run the editor {editor[0]!r} ({exc.strerror}); set VISUAL or "
                              f"EDITOR to one that is installed") from None
        if finished.returncode != 0:
            how = (f"was ended by signal {-finished.returncode}" if finished.returncode < 0
                   else f"exited with status {finished.returncode}")
            raise SynapseError(f"the editor {how}; nothing was sent")
        try:
            with open(path, encoding="utf-8", errors="replace") as edited:
                return edited.read().rstrip()
        except OSError:
            raise SynapseError("the editor left no file to send; nothing was sent") from None


def _remove_draft(path: str) -> None:
    """The editor's file goes, whatever the editor left there."""
    import shutil

    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _warn_if_cut_off(reply: Optional[StoredMessage], config: Config) -> None:
    warning = cut_off_warning(reply.stop_reason if reply else None, config.max_tokens)
    if warning:
        warn(warning)


# -- interactive mode --------------------------------------------------------------


REPL_HELP = """\
Type a message and press Enter.  A line that is just \"\"\" starts a message of
several lines, which another such line ends.  Commands:
  /help       this help
  /retry      ask again for your last message
  /undo [N]   remove the last N exchanges (default 1)
  /fork       go on in a copy of this session
  /edit       write the next message in your editor
  /name TEXT  name the session
  /new        start a new session
  /session    print the current session ID
  /exit       leave (also /quit or Ctrl-D)
Ctrl-C stops a reply (what arrived is kept); Ctrl-C at the prompt leaves.
"""
BLOCK_FENCE = '"""'  # a line of just this opens and closes a multi-line message


def _open_history(database: str) -> Optional[str]:
    """Turn on readline with a private history file beside the database."""
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows without pyreadline
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(database)), "history")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        readline.read_history_file(path)
    except OSError:
        return None
    readline.set_history_length(1000)
    return path


def _save_history(path: Optional[str]) -> None:
    if path is None:
        return
    import readline

    with contextlib.suppress(OSError):
        readline.write_history_file(path)
        os.chmod(path, 0o600)


def _read_line(interactive: bool, prompt: str = "> ") -> Optional[str]:
    """The next input line without its line end, or None at the end of input (Ctrl-D)."""
    if not interactive:
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None
    try:
        return input(prompt)
    except EOFError:
        note("")  # end the prompt's line before the shell's
        return None


def _read_message(interactive: bool) -> Optional[str]:
    """The next message typed: one line, or the lines of a \"\"\" block."""
    line = _read_line(interactive)
    if line is None or line.strip() != BLOCK_FENCE:
        return line
    lines: List[str] = []
    while True:
        line = _read_line(interactive, "... ")
        if line is None or line.strip() == BLOCK_FENCE:
            return "\n".join(lines)
        lines.append(line)


def command_repl(args: argparse.Namespace, config: Config) -> int:
    """Interactive mode: ``synapse -r``, a turn per line, in one session."""
    if sys.stdin is None:
        raise UsageError("interactive mode needs standard input")
    if args.message or args.files or args.edit or args.retry:
        raise UsageError("interactive mode takes no MESSAGE, -f, -e or --retry; type the "
                         "message, /edit or /retry at the prompt")
    plan = chat_plan(args, config)
    interactive = sys.stdin.isatty()
    if not interactive:  # piped lines are UTF-8, as piped text is in chat (SPEC §2)
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")  # type: ignore[attr-defined]
    with signals_end_the_turn(), open_conversation(plan, config) as conversation:
        # The line history lives beside the database: --no-save writes none.
        history_file = _open_history(conversation.store.path) \
            if interactive and conversation.saving else None
        if interactive:
            note(f"synapse {__version__}: {conversation.provider.name}/"
                 f"{conversation.provider.model}. /help for commands, Ctrl-D to leave.")
        try:
            _repl_loop(conversation, config, interactive)
        finally:
            _save_history(history_file)
            if conversation.stored and plan.save:
                note(f"session: {conversation.session.id}")
    return EXIT_OK


def _repl_loop(conversation: Conversation, config: Config, interactive: bool) -> None:
    """Read and send messages until /exit or the end of input.  A failed turn
    leaves the loop at its prompt; Ctrl-C at the prompt goes on to ``main``."""
    while True:
        message = _read_message(interactive)
        if message is None:
            return
        text = clean_text(message).strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        try:
            if re.match(r"/[A-Za-z]", text):
                text = _repl_command(text, conversation)
                if text is None:
                    continue
            _warn_if_cut_off(conversation.send(text, emit), config)
        except KeyboardInterrupt:
            note("(reply stopped; what arrived was kept)")
        except (ProviderError, UsageError) as exc:  # the next turn may go through
            report_error(str(exc), config)
        except SynapseError as exc:
            if isinstance(exc, (OutputError, StorageError)):
                raise
            report_error(str(exc), config)


def _repl_command(line: str, conversation: Conversation) -> Optional[str]:
    """Run a /command; returns a message it wrote to send (/edit), else None."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command == "/help":
        emit(REPL_HELP)
    elif command == "/session":
        emit(f"{conversation.session.id}\n" if conversation.stored
             else "no session yet: it starts with your first message\n")
    elif command == "/new":
        if conversation.stored and conversation.plan.save:
            note(f"session: {conversation.session.id}")
        conversation.start_new()
        note("Started a new session.")
    elif command == "/retry":
        answered = conversation.retry_replaces()
        try:
            _retry(conversation, conversation.config)
        except KeyboardInterrupt:  # back to the prompt, having said what stayed
            if not answered:
                note("(reply stopped; what arrived was kept)")
    elif command == "/undo":
        try:
            count = _positive_int(argument or "1")
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"/undo N: {exc}") from None
        removed = conversation.undo(count)
        if not removed:
            raise SynapseError("nothing to undo")
        note(removed_summary(conversation.session.id, removed).rstrip("\n"))
    elif command == "/fork":
        conversation.fork()
        kept = "the original is kept" if conversation.saving else "not stored: --no-save"
        note(f"session: {conversation.session.id} (a fork; {kept})")
    elif command == "/edit":
        return require_text(edit_message(""))
    elif command == "/name":
        conversation.rename(argument or None)
        note(f"Named the session {argument!r}." if argument else "Cleared the session's name.")
    else:
        note(f"synapse: error: unknown command {command}; nothing was sent\n{REPL_HELP.rstrip()}")
    return None


# ---------------------------------------------------------------------------
# 9. main: an exception that ends a command becomes one error line and its
#    exit code here.
# ---------------------------------------------------------------------------


def report_error(message: str, config: Optional[Config]) -> None:
    """The one error line (and, with SYNAPSE_DEBUG, the traceback), with every
    key that ``config`` or the environment holds redacted."""
    secrets = known_secrets(config, os.environ)
    if os.environ.get("SYNAPSE_DEBUG"):
        import traceback

        note(redact(traceback.format_exc(), secrets).rstrip("\n"))
    note(f"synapse: error: {redact(message, secrets)}")


def _prepare_streams() -> None:
    """Characters an encoding cannot hold are written as ``?``, never a crash."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one synapse command; returns its exit status (SPEC §2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config: Optional[Config] = None
    _prepare_streams()
    try:
        args = parse_arguments(argv)
        config = load_config(args.config)
        status = args.handler(args, config)
        emit("", exact=True)  # a stream that failed says so here, where it is reported
        return status
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated as exc:
        return exc.exit_code
    except BrokenPipeError:  # the reader went away (synapse ... | head): no message
        silence(sys.stdout)
        return EXIT_FAILURE
    except SynapseError as exc:
        if isinstance(exc, OutputError):
            silence(sys.stdout)
        report_error(str(exc), config)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, traceback on request
        report_error(f"unexpected {type(exc).__name__}: {exc} (run with SYNAPSE_DEBUG=1 "
                     f"for a traceback and report it)", config)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
