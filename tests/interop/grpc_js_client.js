'use strict';
/*
 * A stock @grpc/grpc-js client for tests/test_interop_grpc_js.py: the traffic of issue 22's
 * table, on one channel (one HTTP/2 connection), as a busy Node service would make it.
 *
 *   node grpc_js_client.js cancels PORT MESSAGE_ID
 *       300 WatchStatus calls started within 1 s, then 250 a second for 5 s, each cancelled by
 *       the client as soon as its first status arrives; then 10 GetStatus and 10 SendPass
 *       calls on the same channel.
 *   node grpc_js_client.js deadlines PORT MESSAGE_ID SECONDS IN_FLIGHT
 *       IN_FLIGHT calls kept in flight for SECONDS, each with a 1-4 ms deadline, SendPass and
 *       GetStatus in turn.
 *
 * Prints one JSON object on stdout: every call's status counted by method and code, up to 10
 * examples of each unexpected status, and every connectivity state the channel went through
 * after its warm-up call (only READY means the connection was never closed). Run with
 * GRPC_TRACE=transport GRPC_VERBOSITY=DEBUG, stderr also tells every GOAWAY and close.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const WARM_UP_DEADLINE_MS = 5000;
const AFTER_DEADLINE_MS = 5000;
const EXAMPLES = 10;

function mailerClient(port) {
  const definition = protoLoader.loadSync(path.join(PROTOS, 'trio_mailer/v1/mailer.proto'), {
    keepCase: true,
    defaults: true,
    enums: String,
    includeDirs: [PROTOS],
  });
  const { Mailer } = grpc.loadPackageDefinition(definition).trio_mailer.v1;
  return new Mailer(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
}

/* Every connectivity state the channel enters from now on. */
function trackStates(client) {
  const channel = client.getChannel();
  const states = [];
  let stopped = false;
  const watch = () => {
    channel.watchConnectivityState(channel.getConnectivityState(false), Infinity, () => {
      if (stopped) return;
      states.push(grpc.connectivityState[channel.getConnectivityState(false)]);
      watch();
    });
  };
  watch();
  return {
    states,
    stop() {
      stopped = true;
    },
  };
}

function statusName(code) {
  return grpc.status[code];
}

/* One unary call: {code, details, reply}; never rejects. */
function unary(client, method, request, deadlineMs) {
  return new Promise((resolve) => {
    client[method](request, { deadline: Date.now() + deadlineMs }, (error, reply) => {
      if (error) resolve({ code: statusName(error.code), details: error.details });
      else resolve({ code: 'OK', details: '', reply });
    });
  });
}

/* A WatchStatus call cancelled by the client once its first status has come. */
function watchThenCancel(client, messageId) {
  return new Promise((resolve) => {
    const call = client.WatchStatus({ message_id: messageId });
    let answered = false;
    call.on('data', () => {
      if (!answered) {
        answered = true;
        call.cancel();
      }
    });
    call.on('error', () => {}); // the status event below says it all
    call.on('status', (status) => {
      resolve({ code: statusName(status.code), details: status.details, answered });
    });
  });
}

class Tally {
  constructor() {
    this.counts = {};
    this.unexpected = [];
  }

  add(method, result, expected) {
    const byCode = (this.counts[method] ??= {});
    byCode[result.code] = (byCode[result.code] ?? 0) + 1;
    if (!expected(result) && this.unexpected.length < EXAMPLES) {
      this.unexpected.push({ method, code: result.code, details: result.details });
    }
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function warmUp(client, messageId) {
  const result = await unary(client, 'GetStatus', { message_id: messageId }, WARM_UP_DEADLINE_MS);
  if (result.code !== 'OK') throw new Error(`warm-up GetStatus: ${result.code} ${result.details}`);
}

/* ``perTick`` watches every ``tickMs`` for ``durationMs``, each cancelled on its first status. */
async function cancelWave(client, messageId, tally, perTick, tickMs, durationMs) {
  const calls = [];
  const started = Date.now();
  for (let tick = 0; tick * tickMs < durationMs; tick++) {
    const wait = started + tick * tickMs - Date.now();
    if (wait > 0) await sleep(wait);
    for (let i = 0; i < perTick; i++) {
      calls.push(
        watchThenCancel(client, messageId).then((result) =>
          tally.add('WatchStatus', result, (r) => r.code === 'CANCELLED' && r.answered),
        ),
      );
    }
  }
  await Promise.all(calls);
  return Date.now() - started;
}

async function cancels(port, messageId) {
  const client = mailerClient(port);
  await warmUp(client, messageId);
  const tracker = trackStates(client);
  const tally = new Tally();
  // 300 within about 1 s (30 every 100 ms), then 250 a second for 5 s (5 every 20 ms).
  const burstMs = await cancelWave(client, messageId, tally, 30, 100, 1000);
  const steadyMs = await cancelWave(client, messageId, tally, 5, 20, 5000);
  const after = new Tally();
  const ok = (r) => r.code === 'OK';
  for (let i = 0; i < 10; i++) {
    const status = await unary(
      client,
      'GetStatus',
      { message_id: messageId },
      AFTER_DEADLINE_MS,
    );
    after.add('GetStatus', status, ok);
    const send = await unary(
      client,
      'SendPass',
      { to: `after${i}@example.com`, code: '123456' },
      AFTER_DEADLINE_MS,
    );
    after.add('SendPass', send, ok);
  }
  tracker.stop();
  client.close();
  return {
    watches: tally.counts,
    unexpected: tally.unexpected,
    after: after.counts,
    after_unexpected: after.unexpected,
    states: tracker.states,
    burst_ms: burstMs,
    steady_ms: steadyMs,
  };
}

async function deadlines(port, messageId, seconds, inFlight) {
  const client = mailerClient(port);
  await warmUp(client, messageId);
  const tracker = trackStates(client);
  const tally = new Tally();
  const allowed = (r) => r.code === 'OK' || r.code === 'DEADLINE_EXCEEDED';
  const endAt = Date.now() + seconds * 1000;
  let sent = 0;
  const worker = async (lane) => {
    for (let n = lane; Date.now() < endAt; n += inFlight) {
      const deadlineMs = 1 + (n % 4);
      const result =
        n % 2 === 0
          ? await unary(client, 'SendPass', { to: `user${n}@example.com`, code: '1' }, deadlineMs)
          : await unary(client, 'GetStatus', { message_id: messageId }, deadlineMs);
      const method = n % 2 === 0 ? 'SendPass' : 'GetStatus';
      tally.add(method, result, allowed);
      sent += 1;
    }
  };
  await Promise.all(Array.from({ length: inFlight }, (_, lane) => worker(lane)));
  tracker.stop();
  client.close();
  return { calls: tally.counts, unexpected: tally.unexpected, states: tracker.states, sent };
}

async function main(argv) {
  const [command, port, messageId, ...rest] = argv;
  let result;
  if (command === 'cancels') result = await cancels(Number(port), messageId);
  else if (command === 'deadlines') {
    result = await deadlines(Number(port), messageId, Number(rest[0]), Number(rest[1]));
  } else throw new Error(`unknown command ${command}`);
  process.stdout.write(JSON.stringify(result) + '\n');
}

main(process.argv.slice(2)).catch((error) => {
  process.stderr.write(`${error.stack}\n`);
  process.exit(1);
});
