"""The shared outbox's schema in PostgreSQL: versioned, with forward migrations.

``MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1``. ``PostgresOutbox.open``
applies the missing ones in one transaction under an advisory lock, so replicas that start
together on an empty database create it once; a database whose version is newer than
``SCHEMA_VERSION`` is refused (an older trio-mailer must not write a schema it does not know).

The tables mirror the SQLite outbox's (``outbox.py``, ``admission_tables.py``), plus the lease:
``owner`` is the replica that holds an unfinished mail in memory and ``lease_until`` (unix
seconds, the database's clock) how long that claim stands without renewal.

``trio_mailer_apply(changes jsonb, me text, lease_s float8)`` writes one group commit: every
change of a batch in one call, so a batch costs one round trip. Each change runs in its own
sub-transaction (a ``BEGIN ... EXCEPTION`` block), so one that breaks the rules fails alone and
the rest commits; it returns one outcome per change (see ``postgres_outbox._outcome``). Its
admission rules (a live key, the suppression list, the rate limits) are those of
``admission_tables.refusal``, run here for the replicas' sake; ``tests/test_admission_stores.py``
requires the same answers from every store.

Version 2 replaces ``trio_mailer_apply_one``: a status change is written only while the row's
``owner`` is still the writing replica, and a row another replica holds answers ``lost`` (its
lease was taken: the writer must not send the mail). See ``_RECORD_V2``.

Version 3 adds ``mail.traceparent`` (the accepting call's W3C trace context, ``''`` for the mail
stored before) and has an add write it (``_INSERT_V3``); a status change leaves it as it is.
"""

from __future__ import annotations

SCHEMA_LOCK_ID = 0x544D_4F42  # pg_advisory_xact_lock key held while migrating ("TMOB")
STATUS_CHANNEL = "trio_mailer_status"  # NOTIFY payload: a message_id whose status changed
WORK_CHANNEL = "trio_mailer_work"  # NOTIFY: mail was released and may be claimed

_TABLES = """
CREATE TABLE mail (
    message_id text PRIMARY KEY,
    kind text NOT NULL,
    envelope_from text NOT NULL,
    envelope_to text NOT NULL,
    data bytea NOT NULL,
    accepted_at_unix double precision NOT NULL,
    state text NOT NULL
        CHECK (state IN ('queued', 'sending', 'retry_wait', 'delivered', 'failed', 'expired')),
    attempts integer NOT NULL CHECK (attempts >= 0),
    last_reply_code integer,
    last_reply_text text NOT NULL,
    last_attempt_at_unix double precision,
    finished_at_unix double precision,
    possible_duplicate boolean NOT NULL,
    owner text,
    lease_until double precision,
    CHECK ((finished_at_unix IS NOT NULL) = (state IN ('delivered', 'failed', 'expired')))
);
CREATE INDEX mail_unfinished ON mail (accepted_at_unix, message_id)
    WHERE finished_at_unix IS NULL;
CREATE INDEX mail_finished ON mail (finished_at_unix) WHERE finished_at_unix IS NOT NULL;
CREATE INDEX mail_owner ON mail (owner) WHERE finished_at_unix IS NULL;

CREATE TABLE idempotency_key (
    caller text NOT NULL,
    key text NOT NULL,
    fingerprint text NOT NULL,
    message_id text NOT NULL,
    created_at_unix double precision NOT NULL,
    PRIMARY KEY (caller, key)
);
CREATE INDEX idempotency_key_age ON idempotency_key (created_at_unix);
CREATE INDEX idempotency_key_mail ON idempotency_key (message_id);

CREATE TABLE accept_log (
    message_id text PRIMARY KEY,
    recipient text NOT NULL,
    caller text NOT NULL,
    accepted_at_unix double precision NOT NULL
);
CREATE INDEX accept_log_age ON accept_log (accepted_at_unix);
CREATE INDEX accept_log_recipient ON accept_log (recipient, accepted_at_unix);
CREATE INDEX accept_log_caller ON accept_log (caller, accepted_at_unix);

CREATE TABLE suppressed (
    address text PRIMARY KEY,
    since_unix double precision NOT NULL,
    until_unix double precision NOT NULL,
    reply_code integer NOT NULL,
    reply_text text NOT NULL,
    message_id text NOT NULL
);
"""

# Version 1 of the record branch (shipped; kept as it was).
_RECORD_V1 = """\
    IF c->>'op' = 'record' THEN
        -- Applied only to the row the replica read (state and attempts unchanged since), and
        -- only while no other replica holds it: else "stale", and the caller reads again.
        UPDATE mail SET
            state = m->>'state',
            attempts = (m->>'attempts')::integer,
            last_reply_code = (m->>'last_reply_code')::integer,
            last_reply_text = m->>'last_reply_text',
            last_attempt_at_unix = (m->>'last_attempt_at_unix')::double precision,
            finished_at_unix = (m->>'finished_at_unix')::double precision,
            possible_duplicate = (m->>'possible_duplicate')::boolean,
            owner = CASE WHEN m->>'finished_at_unix' IS NULL THEN me END,
            lease_until = CASE WHEN m->>'finished_at_unix' IS NULL THEN now_unix + lease_s END
        WHERE message_id = m->>'message_id'
            AND state = c->>'expect_state' AND attempts = (c->>'expect_attempts')::integer
            AND finished_at_unix IS NULL
            AND (owner IS NULL OR owner = me OR lease_until < now_unix);
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written = 0 THEN
            RETURN '{"stale": true}';
        END IF;
        PERFORM pg_notify('trio_mailer_status', m->>'message_id');
        RETURN '{"ok": true}';
    END IF;

"""

# Version 2 of the record branch: a change is applied only while this replica still holds the
# mail (``owner = me``). A lease that lapsed with nobody taking it still counts: the UPDATE's row
# lock orders it against a claim, which sets another owner. Another owner means the lease was
# lost: "lost", that replica's writes stand, and this one must not send the mail. (Version 1
# also wrote over a row whose lease had lapsed under another owner.)
_RECORD_V2 = """\
    IF c->>'op' = 'record' THEN
        -- Applied only to the row the replica read (state and attempts unchanged since), and
        -- only while it holds it: else "lost" (another replica does) or "stale" (read again).
        UPDATE mail SET
            state = m->>'state',
            attempts = (m->>'attempts')::integer,
            last_reply_code = (m->>'last_reply_code')::integer,
            last_reply_text = m->>'last_reply_text',
            last_attempt_at_unix = (m->>'last_attempt_at_unix')::double precision,
            finished_at_unix = (m->>'finished_at_unix')::double precision,
            possible_duplicate = (m->>'possible_duplicate')::boolean,
            owner = CASE WHEN m->>'finished_at_unix' IS NULL THEN me END,
            lease_until = CASE WHEN m->>'finished_at_unix' IS NULL THEN now_unix + lease_s END
        WHERE message_id = m->>'message_id'
            AND state = c->>'expect_state' AND attempts = (c->>'expect_attempts')::integer
            AND finished_at_unix IS NULL
            AND owner = me;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written = 0 THEN
            PERFORM 1 FROM mail WHERE message_id = m->>'message_id'
                AND finished_at_unix IS NULL AND owner IS DISTINCT FROM me;
            IF FOUND THEN
                RETURN '{"lost": true}';
            END IF;
            RETURN '{"stale": true}';
        END IF;
        PERFORM pg_notify('trio_mailer_status', m->>'message_id');
        RETURN '{"ok": true}';
    END IF;

"""

# One change: {"op": "add" | "record" | "withdraw", ...}; see postgres_outbox._change_json.
_APPLY_ONE = """
{create} trio_mailer_apply_one(c jsonb, me text, lease_s double precision,
                                      now_unix double precision)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a jsonb := c->'acceptance';
    m jsonb := c->'mail';
    hit idempotency_key%ROWTYPE;
    counted integer;
    oldest double precision;
    written integer;
BEGIN
    IF c->>'op' = 'withdraw' THEN
        DELETE FROM mail WHERE message_id = c->>'message_id'
            AND state = 'queued' AND attempts = 0 AND owner = me;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written > 0 THEN
            DELETE FROM idempotency_key WHERE message_id = c->>'message_id';
            DELETE FROM accept_log WHERE message_id = c->>'message_id';
        END IF;
        RETURN '{"ok": true}';
    END IF;

{record}    -- An add: the live key first (a hit writes nothing), then the suppression list and the
    -- rate limits as every replica has counted them, then the rows.
    IF a IS NOT NULL AND a->>'key' IS NOT NULL THEN
        SELECT * INTO hit FROM idempotency_key
            WHERE caller = a->>'caller' AND key = a->>'key'
            AND created_at_unix > (a->>'accepted_at_unix')::double precision
                                  - (a->>'key_window_s')::double precision;
        IF FOUND THEN
            RETURN jsonb_build_object('hit', to_jsonb(hit));
        END IF;
    END IF;
    IF a IS NOT NULL AND (a->>'check_suppressed')::boolean THEN
        PERFORM 1 FROM suppressed WHERE address = a->>'recipient'
            AND until_unix > (a->>'accepted_at_unix')::double precision;
        IF FOUND THEN
            RETURN '{"suppressed": true}';
        END IF;
    END IF;
    IF a IS NOT NULL AND a->'recipient_limit' <> 'null' THEN
        SELECT count(*), min(accepted_at_unix) INTO counted, oldest FROM accept_log
            WHERE recipient = a->>'recipient'
            AND accepted_at_unix > (a->>'accepted_at_unix')::double precision
                                   - (a->'recipient_limit'->>1)::double precision;
        IF counted >= (a->'recipient_limit'->>0)::integer THEN
            RETURN jsonb_build_object('limited', 'recipient', 'retry_after_s',
                oldest + (a->'recipient_limit'->>1)::double precision
                - (a->>'accepted_at_unix')::double precision);
        END IF;
    END IF;
    IF a IS NOT NULL AND a->'caller_limit' <> 'null' THEN
        SELECT count(*), min(accepted_at_unix) INTO counted, oldest FROM accept_log
            WHERE caller = a->>'caller'
            AND accepted_at_unix > (a->>'accepted_at_unix')::double precision
                                   - (a->'caller_limit'->>1)::double precision;
        IF counted >= (a->'caller_limit'->>0)::integer THEN
            RETURN jsonb_build_object('limited', 'caller', 'retry_after_s',
                oldest + (a->'caller_limit'->>1)::double precision
                - (a->>'accepted_at_unix')::double precision);
        END IF;
    END IF;
    IF a IS NOT NULL AND a->>'key' IS NOT NULL THEN
        -- Another replica may have stored the same key since the look-up above: the insert
        -- waits for its commit, and then finds the row live.
        INSERT INTO idempotency_key (caller, key, fingerprint, message_id, created_at_unix)
            VALUES (a->>'caller', a->>'key', a->>'fingerprint', a->>'message_id',
                    (a->>'accepted_at_unix')::double precision)
            ON CONFLICT (caller, key) DO UPDATE SET
                fingerprint = EXCLUDED.fingerprint, message_id = EXCLUDED.message_id,
                created_at_unix = EXCLUDED.created_at_unix
            WHERE idempotency_key.created_at_unix <= EXCLUDED.created_at_unix
                                                     - (a->>'key_window_s')::double precision;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written = 0 THEN
            SELECT * INTO hit FROM idempotency_key WHERE caller = a->>'caller' AND key = a->>'key';
            RETURN jsonb_build_object('hit', to_jsonb(hit));
        END IF;
    END IF;
{insert}    IF a IS NOT NULL AND (a->>'log_for_limits')::boolean THEN
        INSERT INTO accept_log (message_id, recipient, caller, accepted_at_unix)
            VALUES (a->>'message_id', a->>'recipient', a->>'caller',
                    (a->>'accepted_at_unix')::double precision)
            ON CONFLICT (message_id) DO NOTHING;
    END IF;
    RETURN '{"ok": true}';
END $$;
"""

# The mail row of an add, as versions 1 and 2 wrote it (shipped; kept as it was).
_INSERT_V1 = """\
    INSERT INTO mail (message_id, kind, envelope_from, envelope_to, data, accepted_at_unix,
                      state, attempts, last_reply_code, last_reply_text, last_attempt_at_unix,
                      finished_at_unix, possible_duplicate, owner, lease_until)
    VALUES (m->>'message_id', m->>'kind', m->>'envelope_from', m->>'envelope_to',
            decode(m->>'data', 'base64'), (m->>'accepted_at_unix')::double precision,
            m->>'state', (m->>'attempts')::integer, (m->>'last_reply_code')::integer,
            m->>'last_reply_text', (m->>'last_attempt_at_unix')::double precision,
            (m->>'finished_at_unix')::double precision, (m->>'possible_duplicate')::boolean,
            CASE WHEN m->>'finished_at_unix' IS NULL THEN me END,
            CASE WHEN m->>'finished_at_unix' IS NULL THEN now_unix + lease_s END);
"""

# Version 3: the row also stores the accepting call's trace context ("" when the add has none).
_INSERT_V3 = """\
    INSERT INTO mail (message_id, kind, envelope_from, envelope_to, data, accepted_at_unix,
                      state, attempts, last_reply_code, last_reply_text, last_attempt_at_unix,
                      finished_at_unix, possible_duplicate, traceparent, owner, lease_until)
    VALUES (m->>'message_id', m->>'kind', m->>'envelope_from', m->>'envelope_to',
            decode(m->>'data', 'base64'), (m->>'accepted_at_unix')::double precision,
            m->>'state', (m->>'attempts')::integer, (m->>'last_reply_code')::integer,
            m->>'last_reply_text', (m->>'last_attempt_at_unix')::double precision,
            (m->>'finished_at_unix')::double precision, (m->>'possible_duplicate')::boolean,
            coalesce(m->>'traceparent', ''),
            CASE WHEN m->>'finished_at_unix' IS NULL THEN me END,
            CASE WHEN m->>'finished_at_unix' IS NULL THEN now_unix + lease_s END);
"""

_TRACEPARENT_COLUMN = """
ALTER TABLE mail ADD COLUMN traceparent text NOT NULL DEFAULT '';
"""

_APPLY = """
CREATE FUNCTION trio_mailer_apply(changes jsonb, me text, lease_s double precision)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    c jsonb;
    outcomes jsonb := '[]';
    now_unix double precision := extract(epoch FROM clock_timestamp());
BEGIN
    -- The recipients and callers whose limits this batch counts, locked in one order: two
    -- replicas' batches on the same address take turns, and cannot deadlock.
    PERFORM pg_advisory_xact_lock(h) FROM (
        SELECT DISTINCT hashtextextended(s.name, 0) AS h FROM (
            SELECT 'recipient:' || (e->'acceptance'->>'recipient') AS name
                FROM jsonb_array_elements(changes) e
                WHERE e->'acceptance'->'recipient_limit' <> 'null'
            UNION
            SELECT 'caller:' || (e->'acceptance'->>'caller')
                FROM jsonb_array_elements(changes) e
                WHERE e->'acceptance'->'caller_limit' <> 'null'
        ) s ORDER BY 1
    ) locks;
    FOR c IN SELECT value FROM jsonb_array_elements(changes) LOOP
        BEGIN
            outcomes := outcomes || jsonb_build_array(
                trio_mailer_apply_one(c, me, lease_s, now_unix));
        EXCEPTION WHEN unique_violation THEN
            outcomes := outcomes || jsonb_build_array(
                jsonb_build_object('conflict', 'already in the outbox'));
        END;
    END LOOP;
    RETURN outcomes;
END $$;
"""


def _apply_one(create: str, record: str, insert: str = _INSERT_V1) -> str:
    return (
        _APPLY_ONE.replace("{create}", create)
        .replace("{record}", record)
        .replace("{insert}", insert)
    )


# MIGRATIONS[n]: from schema version n to n + 1. Never edit one that has shipped: add the next.
MIGRATIONS: tuple[str, ...] = (
    _TABLES + _apply_one("CREATE FUNCTION", _RECORD_V1) + _APPLY,
    _apply_one("CREATE OR REPLACE FUNCTION", _RECORD_V2),
    _TRACEPARENT_COLUMN + _apply_one("CREATE OR REPLACE FUNCTION", _RECORD_V2, _INSERT_V3),
)
SCHEMA_VERSION = len(MIGRATIONS)
