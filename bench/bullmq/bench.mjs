// BullMQ counterpart of crates/fanout-queue/examples/queue_bench.rs: no-op jobs/s with 1 and 2
// worker processes and Redis commands per job (INFO commandstats call deltas).
//
//   node bench.mjs <redis port> [jobs=50000] [concurrency=64]
//
// It uses the Redis on 127.0.0.1:<port> (bench/bullmq/run.sh starts a private one), resets its
// INFO statistics and leaves keys under bull:bench*. It measures; it does not pass or fail.
//
// Method, matching queue_bench where the two can match:
// - enqueue: Queue.addBulk in chunks of 1000, each job with a caller id (`job-<i>`, as queue_bench
//   gives each job an idempotency id) and removeOnComplete (queue_bench deletes acked entries).
// - process: 1, then 2 forked worker processes, each one Worker with the given concurrency and a
//   no-op processor, until the `wait` and `active` lists are empty. The clock starts once every
//   child has its Worker connected (Node start-up and module loading are not counted; queue_bench
//   counts its children's start-up, a few ms).
// - commands: CONFIG RESETSTAT before enqueue, then the sum of `calls` over INFO commandstats,
//   commands run inside Lua scripts included (Redis counts them), less this bench's own INFO,
//   CONFIG and polling LLENs (counted exactly), and less SCRIPT LOAD as queue_bench does.

import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Queue, Worker } from 'bullmq';
import { Redis } from 'ioredis';

const CHUNK = 1000;

if (process.argv[2] === '--child') {
  await child(process.argv[3], process.argv[4], Number(process.argv[5]));
} else {
  await main();
}

async function main() {
  const port = Number(process.argv[2]);
  if (!Number.isInteger(port) || port <= 0) {
    console.error('usage: node bench.mjs <redis port> [jobs] [concurrency]');
    process.exit(2);
  }
  const jobs = Number(process.argv[3] ?? 50000);
  const concurrency = Number(process.argv[4] ?? 64);
  const connection = { host: '127.0.0.1', port };
  const monitor = new Redis(connection);
  // Own LLENs since the last RESETSTAT, subtracted from the `llen` calls.
  let ownLlen = 0;

  const info = await monitor.info('server');
  const version = /redis_version:(\S+)/.exec(info)?.[1];
  const bullmqVersion = (await import('bullmq/package.json', { with: { type: 'json' } })).default
    .version;
  console.log(
    `bullmq_bench: ${jobs} no-op jobs, concurrency ${concurrency} per process, ` +
      `bullmq ${bullmqVersion}, redis ${version} at redis://127.0.0.1:${port}\n`,
  );
  console.log(
    '| worker processes | jobs | enqueue jobs/s | process jobs/s | Redis cmds/job (total) | enqueue | worker |',
  );
  console.log('|---:|---:|---:|---:|---:|---:|---:|');

  const breakdowns = [];
  for (const processes of [1, 2]) {
    const name = `bench${processes}`;
    const queue = new Queue(name, { connection });
    await queue.waitUntilReady();
    await monitor.config('RESETSTAT');
    ownLlen = 0;

    let t = performance.now();
    for (let start = 0; start < jobs; start += CHUNK) {
      const batch = [];
      for (let i = start; i < Math.min(start + CHUNK, jobs); i++) {
        batch.push({
          name: 'noop',
          data: { i },
          opts: { jobId: `job-${i}`, removeOnComplete: true },
        });
      }
      await queue.addBulk(batch);
    }
    const enqueueSecs = (performance.now() - t) / 1000;
    const enqueueCalls = sum(await callsByCommand(monitor, ownLlen));

    const children = [];
    for (let p = 0; p < processes; p++) {
      children.push(spawnChild(port, name, concurrency));
    }
    await Promise.all(children.map((c) => c.ready));
    t = performance.now();
    for (const c of children) c.proc.send('run');
    for (;;) {
      const [[, wait], [, active]] = await monitor
        .pipeline()
        .llen(`bull:${name}:wait`)
        .llen(`bull:${name}:active`)
        .exec();
      ownLlen += 2;
      if (wait === 0 && active === 0) break;
      await new Promise((r) => setTimeout(r, 5));
    }
    const secs = (performance.now() - t) / 1000;
    const byCommand = await callsByCommand(monitor, ownLlen);
    const totalCalls = sum(byCommand);
    const processed = (await Promise.all(children.map((c) => c.stop()))).reduce((a, b) => a + b, 0);
    await queue.close();

    breakdowns.push(
      `${processes} process(es), calls per job: ` +
        byCommand.map(([n, c]) => `${n} ${(c / jobs).toFixed(3)}`).join(', ') +
        (processed === jobs ? '' : ` (WARNING: workers processed ${processed} of ${jobs})`),
    );
    console.log(
      `| ${processes} | ${jobs} | ${(jobs / enqueueSecs).toFixed(0)} | ${(jobs / secs).toFixed(0)} | ` +
        `${(totalCalls / jobs).toFixed(2)} | ${(enqueueCalls / jobs).toFixed(2)} | ` +
        `${((totalCalls - enqueueCalls) / jobs).toFixed(2)} |`,
    );
  }
  console.log();
  for (const b of breakdowns) console.log(`- ${b}`);
  await monitor.quit();
}

/** [command, calls] from INFO commandstats, largest first, less the bench's own commands. */
async function callsByCommand(monitor, ownLlen) {
  const info = await monitor.info('commandstats');
  const out = [];
  for (const line of info.split(/\r?\n/)) {
    const m = /^cmdstat_([^:]+):calls=(\d+)/.exec(line);
    if (!m) continue;
    const name = m[1];
    let calls = Number(m[2]);
    if (['info', 'config', 'config|resetstat', 'script|load'].includes(name)) continue;
    if (name === 'llen') calls -= ownLlen;
    if (calls > 0) out.push([name, calls]);
  }
  return out.sort((a, b) => b[1] - a[1]);
}

function sum(byCommand) {
  return byCommand.reduce((a, [, c]) => a + c, 0);
}

/** Forks a worker process; `ready` resolves once its Worker is connected. */
function spawnChild(port, name, concurrency) {
  const proc = fork(fileURLToPath(import.meta.url), [
    '--child',
    String(port),
    name,
    String(concurrency),
  ]);
  let onReady;
  let onDone;
  const ready = new Promise((r) => (onReady = r));
  const done = new Promise((r) => (onDone = r));
  proc.on('message', (m) => {
    if (m.ready) onReady();
    if (m.processed !== undefined) onDone(m.processed);
  });
  proc.on('exit', (code) => {
    if (code !== 0) {
      console.error(`worker process exited with ${code}`);
      process.exit(1);
    }
  });
  return {
    proc,
    ready,
    stop: async () => {
      proc.send('stop');
      const processed = await done;
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
      return processed;
    },
  };
}

async function child(port, name, concurrency) {
  let processed = 0;
  const worker = new Worker(
    name,
    async () => {
      processed++;
    },
    { connection: { host: '127.0.0.1', port: Number(port) }, concurrency, autorun: false },
  );
  worker.on('error', (err) => console.error(`worker error: ${err.message}`));
  await worker.waitUntilReady();
  process.on('message', async (m) => {
    if (m === 'run') {
      worker.run().catch((err) => {
        console.error(`worker run failed: ${err.message}`);
        process.exit(1);
      });
    } else if (m === 'stop') {
      await worker.close();
      process.send({ processed }, () => process.exit(0));
    }
  });
  process.send({ ready: true });
}
