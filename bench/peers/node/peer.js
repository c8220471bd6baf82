'use strict';
/**
 * The Node peer: trio-mailer's SendPass as a team would build it on Node.js.
 *
 * - gRPC: @grpc/grpc-js, with the service loaded by @grpc/proto-loader from
 *   protos/trio_mailer/v1/mailer.proto;
 * - validation: a dot-atom address pattern and a code of 1 to 128 printable characters (the
 *   same patterns as the Python peer, bench/peers/aio_server.py);
 * - admission: a bounded array; when it is full the call is answered sent=false,
 *   reason="queue full" at once, before anything is built, as the API says;
 * - rendering: the shipped templates/mail/password.msg, its subject, text and html blocks cut
 *   out once at start-up, {{ name }} filled in per call (HTML-escaped in the html part, as
 *   Jinja2's autoescape does);
 * - durability: better-sqlite3 in WAL mode with synchronous=FULL; the mail's row is committed
 *   (synchronously, on the event loop, as better-sqlite3 works) before the reply, and its
 *   outcome after the relay's answer. Undelivered rows are queued again at start-up;
 * - delivery: nodemailer's pooled SMTP transport with one connection (maxConnections: 1),
 *   verified TLS (implicit or STARTTLS) and AUTH, recycled after MAILER_SESSION_MAX_MESSAGES
 *   mails (100, nodemailer's default), one mail at a time; a failed send is tried again after a
 *   backoff that doubles from MAILER_RETRY_BASE_S to MAILER_RETRY_MAX_S; a 5xx reply fails it.
 *
 * Configured by the MAILER_* variables trio-mailer reads (see aio_server.py for the list).
 * Prints "listening on HOST:PORT" and runs until SIGTERM or SIGINT.
 * `node peer.js --render TO CODE` prints the rendered subject, text and html as JSON instead.
 */

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..', '..', '..');
const PROTO_DIR = path.join(ROOT, 'protos');
const PROTO_FILE = 'trio_mailer/v1/mailer.proto';
const MAX_MESSAGE_BYTES = 4 * 1024; // the request limit trio-mailer applies
const MAX_ADDRESS_CHARS = 254;
const ATOM = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+";
const LABEL = '[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?';
const ADDRESS = new RegExp(`^${ATOM}(?:\\.${ATOM})*@${LABEL}(?:\\.${LABEL})+$`);
const CODE = /^[^\x00-\x1f\x7f]{1,128}$/u;
const FULL_LOG_INTERVAL_MS = 1000; // "queue full" is logged at most this often

function settingsFromEnv(env) {
  const remote = env.MAILER_REMOTE_HOST;
  if (!remote) throw new Error('MAILER_REMOTE_HOST: required');
  const colon = remote.lastIndexOf(':');
  const tls = env.MAILER_SMTP_TLS || 'implicit';
  if (tls !== 'implicit' && tls !== 'starttls') {
    throw new Error(`MAILER_SMTP_TLS: expected implicit or starttls, got ${tls}`);
  }
  const outbox = env.MAILER_OUTBOX || '';
  if (!outbox || outbox === 'memory' || outbox.includes('://')) {
    throw new Error(`MAILER_OUTBOX: expected a file path, got ${JSON.stringify(outbox)}`);
  }
  if (!env.MAILER_FROM) throw new Error('MAILER_FROM: required');
  return {
    relayHost: remote.slice(0, colon).replace(/^\[|\]$/g, ''),
    relayPort: Number(remote.slice(colon + 1)),
    implicitTls: tls === 'implicit',
    caFile: env.MAILER_SMTP_CA_FILE,
    user: env.MAILER_USER,
    password: env.MAILER_PASSWORD,
    smtpTimeoutMs: Number(env.MAILER_SMTP_TIMEOUT_S || '30') * 1000,
    fromAddress: env.MAILER_FROM,
    serviceName: env.MAILER_SERVICENAME || 'trio-mailer',
    serveHost: env.MAILER_SERVE_HOST || '127.0.0.1',
    servePort: Number(env.MAILER_SERVE_PORT || '20100'),
    queueSize: Number(env.MAILER_QUEUE_SIZE || '10'),
    outbox,
    templatesDir: env.MAILER_TEMPLATES_DIR || path.join(ROOT, 'templates'),
    retryBaseMs: Number(env.MAILER_RETRY_BASE_S || '1') * 1000,
    retryMaxMs: Number(env.MAILER_RETRY_MAX_S || '60') * 1000,
    sessionMaxMessages: Number(env.MAILER_SESSION_MAX_MESSAGES || '100'),
  };
}

function validate(to, code) {
  if (to.length > MAX_ADDRESS_CHARS || !ADDRESS.test(to)) {
    return 'to: expected one address such as user@example.com';
  }
  if (!CODE.test(code)) return 'code: expected 1 to 128 printable characters';
  return null;
}

const HTML_ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&#34;', "'": '&#39;' };

function escapeHtml(value) {
  return value.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]);
}

/** A block of the template as alternating literal text and variable names. */
function compileBlock(source, name) {
  const match = new RegExp(
    `\\{%-?\\s*block\\s+${name}\\s*-?%\\}([\\s\\S]*?)\\{%-?\\s*endblock\\s*-?%\\}`,
  ).exec(source);
  if (!match) throw new Error(`template: no block ${name}`);
  return match[1].split(/\{\{\s*(\w+)\s*\}\}/);
}

function fill(pieces, values, escape) {
  let out = '';
  for (let i = 0; i < pieces.length; i++) {
    if (i % 2 === 0) {
      out += pieces[i];
    } else {
      const value = values[pieces[i]];
      if (value === undefined) throw new Error(`template: ${pieces[i]} is undefined`);
      out += escape ? escapeHtml(value) : value;
    }
  }
  return out;
}

function tidy(part) {
  // One leading newline after "{% block text %}" is layout, not content.
  const body = part.startsWith('\n') ? part.slice(1) : part;
  return body.endsWith('\n') ? body : `${body}\n`;
}

function loadTemplate(templatesDir) {
  const source = fs.readFileSync(path.join(templatesDir, 'mail', 'password.msg'), 'utf8');
  const blocks = {
    subject: compileBlock(source, 'subject'),
    text: compileBlock(source, 'text'),
    html: compileBlock(source, 'html'),
  };
  return (values) => ({
    subject: fill(blocks.subject, values, false).trim(),
    text: tidy(fill(blocks.text, values, false)),
    html: tidy(fill(blocks.html, values, true)),
  });
}

function openOutbox(file) {
  const Database = require('better-sqlite3');
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = FULL');
  db.exec(
    'CREATE TABLE IF NOT EXISTS mail (message_id TEXT PRIMARY KEY, recipient TEXT NOT NULL, ' +
      'content TEXT NOT NULL, state TEXT NOT NULL, accepted_at REAL NOT NULL, finished_at REAL)',
  );
  // Outside a transaction each statement commits (and is synced) on its own.
  const add = db.prepare("INSERT INTO mail VALUES (?, ?, ?, 'queued', ?, NULL)");
  const finish = db.prepare('UPDATE mail SET state = ?, finished_at = ? WHERE message_id = ?');
  const unfinished = db.prepare(
    "SELECT content FROM mail WHERE state = 'queued' ORDER BY accepted_at LIMIT ?",
  );
  return {
    add: (mail) => add.run(mail.messageId, mail.to, JSON.stringify(mail), Date.now() / 1000),
    finish: (messageId, state) => finish.run(state, Date.now() / 1000, messageId),
    unfinished: (limit) => unfinished.all(limit).map((row) => JSON.parse(row.content)),
    close: () => db.close(),
  };
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function serve(settings) {
  const grpc = require('@grpc/grpc-js');
  const protoLoader = require('@grpc/proto-loader');
  const nodemailer = require('nodemailer');

  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    defaults: true,
  });
  const { Mailer } = grpc.loadPackageDefinition(definition).trio_mailer.v1;
  const render = loadTemplate(settings.templatesDir);
  const outbox = openOutbox(settings.outbox);
  const domain = settings.fromAddress.slice(settings.fromAddress.lastIndexOf('@') + 1);
  const from = { name: settings.serviceName, address: settings.fromAddress };
  const transporter = nodemailer.createTransport({
    pool: true,
    maxConnections: 1,
    maxMessages: settings.sessionMaxMessages,
    host: settings.relayHost,
    port: settings.relayPort,
    secure: settings.implicitTls,
    requireTLS: !settings.implicitTls,
    auth: settings.user ? { user: settings.user, pass: settings.password } : undefined,
    tls: settings.caFile ? { ca: [fs.readFileSync(settings.caFile)] } : {},
    connectionTimeout: settings.smtpTimeoutMs,
    greetingTimeout: settings.smtpTimeoutMs,
    socketTimeout: settings.smtpTimeoutMs,
  });

  const queue = outbox.unfinished(settings.queueSize);
  let wake = null; // resolves the sender's wait for mail
  let refused = 0;
  let lastFullLog = -Infinity;
  let stopping = false;

  function sendPass(call, callback) {
    const { to, code } = call.request;
    const problem = validate(to, code);
    if (problem) {
      callback({ code: grpc.status.INVALID_ARGUMENT, details: problem });
      return;
    }
    if (queue.length >= settings.queueSize) {
      refused += 1;
      const now = Date.now();
      if (now - lastFullLog >= FULL_LOG_INTERVAL_MS) {
        console.error(`refusing mail: queue full (${refused} so far)`);
        lastFullLog = now;
      }
      callback(null, { sent: false, reason: 'queue full' });
      return;
    }
    const content = render({ to, code, service_name: settings.serviceName });
    const mail = {
      messageId: `<${crypto.randomUUID().replaceAll('-', '')}@${domain}>`,
      to,
      date: new Date().toISOString(),
      ...content,
    };
    try {
      outbox.add(mail);
    } catch (err) {
      console.error(`cannot store a mail: ${err}`);
      callback({
        code: grpc.status.UNAVAILABLE,
        details: 'cannot store the mail right now; try again later',
      });
      return;
    }
    queue.push(mail);
    if (wake) {
      wake();
      wake = null;
    }
    callback(null, { sent: true, message_id: mail.messageId });
  }

  async function deliver(mail) {
    let delay = settings.retryBaseMs;
    while (!stopping) {
      try {
        await transporter.sendMail({
          from,
          to: mail.to,
          subject: mail.subject,
          text: mail.text,
          html: mail.html,
          messageId: mail.messageId,
          date: new Date(mail.date),
          headers: { 'Auto-Submitted': 'auto-generated', 'Content-Language': 'en' },
        });
        outbox.finish(mail.messageId, 'delivered');
        return;
      } catch (err) {
        if (err.responseCode >= 500) {
          console.error(`relay refused ${mail.messageId}: ${err.responseCode}`);
          outbox.finish(mail.messageId, 'failed');
          return;
        }
        console.error(`relay: ${err.message}; again in ${delay / 1000} s`);
        await sleep(delay);
        delay = Math.min(delay * 2, settings.retryMaxMs);
      }
    }
  }

  async function sendForever() {
    while (!stopping) {
      if (queue.length === 0) {
        await new Promise((resolve) => {
          wake = resolve;
        });
        continue;
      }
      await deliver(queue.shift());
    }
  }

  const server = new grpc.Server({ 'grpc.max_receive_message_length': MAX_MESSAGE_BYTES });
  const unimplemented = (call, callback) =>
    callback({ code: grpc.status.UNIMPLEMENTED, details: 'not in this peer' });
  server.addService(Mailer.service, {
    Send: unimplemented,
    SendPass: sendPass,
    SendRetrieve: unimplemented,
    GetStatus: unimplemented,
    WatchStatus: (call) => call.emit('error', { code: grpc.status.UNIMPLEMENTED }),
  });
  server.bindAsync(
    `${settings.serveHost}:${settings.servePort}`,
    grpc.ServerCredentials.createInsecure(),
    (err, port) => {
      if (err) {
        console.error(`cannot listen: ${err.message}`);
        process.exit(2);
      }
      console.log(`listening on ${settings.serveHost}:${port}`);
      sendForever();
    },
  );

  const stop = () => {
    if (stopping) return;
    stopping = true;
    if (wake) wake();
    const timer = setTimeout(() => server.forceShutdown(), 1000);
    server.tryShutdown(() => {
      clearTimeout(timer);
      transporter.close();
      outbox.close();
      process.exit(0);
    });
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

function main(argv) {
  let settings;
  if (argv[0] === '--render') {
    const env = process.env;
    const render = loadTemplate(env.MAILER_TEMPLATES_DIR || path.join(ROOT, 'templates'));
    const values = { to: argv[1], code: argv[2], service_name: env.MAILER_SERVICENAME || 'trio-mailer' };
    process.stdout.write(`${JSON.stringify(render(values))}\n`);
    return;
  }
  try {
    settings = settingsFromEnv(process.env);
  } catch (err) {
    console.error(`peer: bad configuration: ${err.message}`);
    process.exit(2);
  }
  serve(settings);
}

main(process.argv.slice(2));
