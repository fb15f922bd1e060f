// Against a real mesh (catalog, provisioner, pool, and the llama worker the pool spawns), started
// by tests/e2e/test_node_sdk.py, which passes the addresses in RBEE_TEST_* variables:
//   RBEE_TEST_CATALOG_ADDR, RBEE_TEST_PROVISIONER_ADDR, RBEE_TEST_POOL_ADDR  host:port
//   RBEE_TEST_PULL_SOURCE   a GGUF on the fake Hub, `hf:ORG/REPO:FILE`
//   RBEE_TEST_PULL_SHA256   its sha256
//   RBEE_TEST_TOKEN         the mesh's bearer token (optional: unset = a mesh without auth)
// Without them the test is skipped (`npm test` alone runs the SDK's own tests only).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  CatalogClient,
  collectText,
  PoolClient,
  ProvisionerClient,
  RbeeError,
  WorkerClient,
} from '../src/index.js';

const env = process.env;
const REQUIRED = [
  'RBEE_TEST_CATALOG_ADDR',
  'RBEE_TEST_PROVISIONER_ADDR',
  'RBEE_TEST_POOL_ADDR',
  'RBEE_TEST_PULL_SOURCE',
  'RBEE_TEST_PULL_SHA256',
];
const missing = REQUIRED.filter((key) => !env[key]);
const skip = missing.length ? `no mesh: ${missing.join(', ')} unset` : false;

test('list, pull with progress, spawn, stream tokens', { skip, timeout: 100_000 }, async (t) => {
  const token = env.RBEE_TEST_TOKEN ?? '';
  const options = { token, timeoutMs: 10_000, streamTimeoutMs: 60_000 };
  const catalog = new CatalogClient(env.RBEE_TEST_CATALOG_ADDR ?? '', options);
  const provisioner = new ProvisionerClient(env.RBEE_TEST_PROVISIONER_ADDR ?? '', options);
  const pool = new PoolClient(env.RBEE_TEST_POOL_ADDR ?? '', options);
  /** @type {WorkerClient | undefined} */
  let worker;
  /** @type {string} */
  let workerName = '';
  t.after(async () => {
    if (workerName) await pool.stopWorker(workerName, { graceSeconds: 0 }).catch(() => {});
    for (const client of [catalog, provisioner, pool, worker]) client?.close();
  });

  await t.test('the mesh wants the token', { skip: !token && 'no token' }, async () => {
    const anonymous = new CatalogClient(env.RBEE_TEST_CATALOG_ADDR ?? '', { timeoutMs: 10_000 });
    try {
      await assert.rejects(anonymous.listModels(), (err) => {
        assert.ok(err instanceof RbeeError, String(err));
        assert.equal(err.codeName, 'UNAUTHENTICATED');
        return true;
      });
    } finally {
      anonymous.close();
    }
  });

  await t.test('an empty catalog lists no models; a missing one is MODEL_NOT_FOUND', async () => {
    const page = await catalog.listModels();
    assert.deepEqual(page.models, []);
    assert.equal(page.totalSize, 0);
    assert.equal(page.nextPageToken, '');
    await assert.rejects(catalog.getModel('no-such-model'), (err) => {
      assert.ok(err instanceof RbeeError, String(err));
      assert.equal(err.codeName, 'NOT_FOUND');
      assert.equal(err.reason, 'MODEL_NOT_FOUND');
      assert.equal(err.domain, 'rbee.dev');
      return true;
    });
  });

  /** @type {Record<string, any>} */
  let model = {};
  await t.test('pulls a model from the fake Hub with progress events', async () => {
    const progress = [];
    const models = [];
    for await (const event of provisioner.pullModel(env.RBEE_TEST_PULL_SOURCE ?? '')) {
      if (event.event === 'progress') progress.push(event.progress);
      else models.push(event.model);
    }
    assert.ok(progress.length > 0, 'no progress events');
    assert.equal(models.length, 1, 'exactly one model ends the stream');
    const states = new Set(progress.map((p) => p.state));
    assert.ok(states.has('PULL_STATE_DOWNLOADING'), `states seen: ${[...states]}`);
    const done = progress.filter((p) => p.totalBytes?.totalBytes > 0).at(-1);
    assert.ok(done, 'no progress event counted bytes');
    assert.equal(done.totalBytes.completedBytes, done.totalBytes.totalBytes);
    [model] = models;
    assert.equal(model.state, 'MODEL_STATE_READY');
    assert.equal(model.sha256, env.RBEE_TEST_PULL_SHA256);
    assert.equal(model.metadata.format, 'MODEL_FORMAT_GGUF');
    assert.equal(model.sizeBytes, done.totalBytes.totalBytes);
  });

  await t.test('the pulled model is listed, and runs on cpu-llm', async () => {
    const names = [];
    for await (const m of catalog.models({ pageSize: 1 })) names.push(m.name);
    assert.deepEqual(names, [model.name]);
    assert.equal((await catalog.getModel(model.name)).sha256, model.sha256);
    const { results } = await catalog.evaluateCompatibility(model.name, {
      workerTypes: ['cpu-llm'],
    });
    assert.equal(results.length, 1);
    assert.equal(results[0].workerType, 'worker-types/cpu-llm');
    assert.ok(results[0].runnable, JSON.stringify(results[0]));
  });

  await t.test('spawns a worker through the pool', async () => {
    const stages = [];
    /** @type {Record<string, any> | undefined} */
    let spawned;
    const request = { model: model.name, device: 'devices/cpu', workerId: 'node-sdk' };
    for await (const event of pool.spawnWorker(request)) {
      if (event.event === 'progress') stages.push(event.progress.stage);
      else spawned = event.worker;
    }
    assert.ok(spawned, 'the spawn ended without a worker');
    workerName = spawned.name;
    assert.equal(spawned.state, 'WORKER_STATE_READY');
    assert.ok(stages.length > 0, 'no spawn progress');
    const listed = await pool.listWorkers();
    assert.deepEqual(
      listed.map((w) => w.name),
      [spawned.name],
    );
    worker = new WorkerClient(spawned.endpoint, options);
    assert.equal((await worker.getWorker()).model, model.name);
  });

  await t.test('streams tokens from the worker: generate and chat', async () => {
    assert.ok(worker);
    const deltas = [];
    /** @type {Record<string, any> | undefined} */
    let result;
    const stream = worker.generate('Once upon a time', {
      sampling: { seed: 7, temperature: 0 },
      stopping: { maxTokens: 8, ignoreEos: true },
    });
    for await (const event of stream) {
      if (event.event === 'delta') deltas.push(event.delta);
      else result = event.result;
    }
    assert.ok(deltas.length > 0, 'no token deltas');
    assert.ok(result, 'no result');
    assert.equal(result.finishReason, 'FINISH_REASON_LENGTH');
    assert.equal(result.usage.completionTokens, 8);
    assert.equal(
      deltas.reduce((n, d) => n + d.tokenIds.length, 0),
      8,
    );

    const chunks = [];
    const chat = await collectText(
      worker.chat([['user', 'hello']], { stopping: { maxTokens: 4 } }),
      (text) => chunks.push(text),
    );
    assert.ok(chunks.length > 0, 'no chat deltas');
    assert.equal(chat.text, chunks.join(''));
    assert.notEqual(chat.result.finishReason, 'FINISH_REASON_UNSPECIFIED');
  });

  await t.test('leaving a stream early cancels it; the worker serves the next one', async () => {
    assert.ok(worker);
    let seen = 0;
    const long = worker.generate('a', { stopping: { maxTokens: 200, ignoreEos: true } });
    for await (const event of long) {
      if (event.event === 'delta') seen += 1;
      if (seen === 2) break;
    }
    assert.equal(seen, 2);
    const after = await collectText(worker.generate('b', { stopping: { maxTokens: 2 } }));
    assert.ok(after.result.finishReason);
    assert.equal((await worker.getWorker()).state, 'WORKER_STATE_READY');
  });
});
