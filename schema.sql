-- Synapse schema migrations.
--
-- Each migration starts at a line "-- migration: N <title>", N = 1, 2, ...
-- synapse.py applies, on every open, each migration numbered above
-- PRAGMA user_version, each in its own transaction together with the update
-- of user_version.  Never edit a migration that has shipped: add a new one.

-- migration: 1 sessions and messages
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    system_prompt TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    timestamp TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_messages_session ON messages(session_id);
CREATE INDEX IF NOT EXISTS idx_messages_timestamp ON messages(timestamp);
CREATE INDEX IF NOT EXISTS idx_sessions_updated ON sessions(updated_at);

-- migration: 2 who wrote each reply, its tokens and stop reason; where a fork came from
-- All nullable: user messages and the rows of version 1 have none of it.
-- forked_from is plain text, not a foreign key: the source may be deleted later.
ALTER TABLE messages ADD COLUMN provider TEXT;
ALTER TABLE messages ADD COLUMN model TEXT;
ALTER TABLE messages ADD COLUMN input_tokens INTEGER;
ALTER TABLE messages ADD COLUMN output_tokens INTEGER;
ALTER TABLE messages ADD COLUMN stop_reason TEXT;
ALTER TABLE sessions ADD COLUMN forked_from TEXT;
