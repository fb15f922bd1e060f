// The SDK's own mechanics against an in-process grpc-js CatalogService (no mesh needed):
// the bearer token, TLS, deadlines, typed errors from the google.rpc.Status trailer, retries
// of UNAVAILABLE honouring RetryInfo, and pagination.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { inspect } from 'node:util';

import * as grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';

import { CatalogClient, ChannelSecurity, loadRbee, RbeeError, status } from '../src/index.js';
import { GOOGLEAPIS_DIR } from '../src/protos.js';

const TOKEN = 'test-token';
const MODELS = ['a', 'b', 'c', 'd', 'e'].map((id) => ({ name: `models/${id}`, displayName: id }));

const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) =>
  target.startsWith('google/rpc/') ? join(GOOGLEAPIS_DIR, target) : target;
rpc.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);

/**
 * A status trailer as the mesh's servers send it.
 * @param {number} code
 * @param {string} message
 * @param {Array<[string, object]>} details [type name, fields]
 */
function statusError(code, message, details) {
  const Status = rpc.lookupType('google.rpc.Status');
  const packed = details.map(([typeName, fields]) => {
    const type = rpc.lookupType(typeName);
    return {
      type_url: `type.googleapis.com/${typeName}`,
      value: type.encode(type.create(fields)).finish(),
    };
  });
  const metadata = new grpc.Metadata();
  metadata.set(
    'grpc-status-details-bin',
    Buffer.from(Status.encode(Status.create({ code, message, details: packed })).finish()),
  );
  return { code, details: message, metadata };
}

let server;
let address = '';
let unavailableLeft = 0;
const seenAuthorization = [];

before(async () => {
  const pkg = loadRbee();
  server = new grpc.Server();
  server.addService(pkg.rbee.catalog.v1.CatalogService.service, {
    GetModel(call, callback) {
      seenAuthorization.push(call.metadata.get('authorization')[0] ?? '');
      if (unavailableLeft > 0) {
        unavailableLeft -= 1;
        callback(
          statusError(status.UNAVAILABLE, 'catalog is starting', [
            ['google.rpc.RetryInfo', { retryDelay: { seconds: 0, nanos: 50_000_000 } }],
          ]),
        );
        return;
      }
      const found = MODELS.find((m) => m.name === call.request.name);
      if (found) {
        callback(null, found);
        return;
      }
      callback(
        statusError(status.NOT_FOUND, `no model ${call.request.name}`, [
          [
            'google.rpc.ErrorInfo',
            {
              reason: 'MODEL_NOT_FOUND',
              domain: 'rbee.dev',
              metadata: { resource_name: call.request.name, request_id: 'r-1' },
            },
          ],
          ['google.rpc.ResourceInfo', { resourceType: 'models', resourceName: call.request.name }],
        ]),
      );
    },
    ListModels(call, callback) {
      const size = call.request.pageSize || 50;
      const start = call.request.pageToken ? Number(call.request.pageToken) : 0;
      const end = Math.min(start + size, MODELS.length);
      callback(null, {
        models: MODELS.slice(start, end),
        nextPageToken: end < MODELS.length ? String(end) : '',
        totalSize: MODELS.length,
      });
    },
    InspectModel(_call, callback) {
      setTimeout(() => callback(null, MODELS[0]), 2_000); // slower than the test's deadline
    },
  });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) =>
      err ? reject(err) : resolve(p),
    ),
  );
  address = `127.0.0.1:${port}`;
});

after(() => server.forceShutdown());

test('the bearer token travels on every call', async () => {
  const catalog = new CatalogClient(address, { token: TOKEN });
  try {
    assert.equal((await catalog.getModel('a')).name, 'models/a');
    assert.equal(seenAuthorization.at(-1), `Bearer ${TOKEN}`);
  } finally {
    catalog.close();
  }
});

test('errors carry the code and the ErrorInfo reason', async () => {
  const catalog = new CatalogClient(address);
  try {
    await assert.rejects(catalog.getModel('nope'), (err) => {
      assert.ok(err instanceof RbeeError);
      assert.equal(err.code, status.NOT_FOUND);
      assert.equal(err.codeName, 'NOT_FOUND');
      assert.equal(err.reason, 'MODEL_NOT_FOUND');
      assert.equal(err.domain, 'rbee.dev');
      assert.equal(err.metadata.resource_name, 'models/nope');
      assert.equal(err.requestId, 'r-1');
      assert.equal(err.resourceName, 'models/nope');
      assert.equal(err.message, 'no model models/nope');
      return true;
    });
  } finally {
    catalog.close();
  }
});

test('UNAVAILABLE is retried after the RetryInfo delay, and gives up after maxAttempts', async () => {
  const catalog = new CatalogClient(address, { maxAttempts: 3 });
  try {
    unavailableLeft = 2;
    const started = Date.now();
    assert.equal((await catalog.getModel('b')).name, 'models/b');
    assert.ok(Date.now() - started >= 100, 'two retries of 50 ms each');
    unavailableLeft = 3;
    await assert.rejects(catalog.getModel('b'), (err) => {
      assert.ok(err instanceof RbeeError);
      assert.equal(err.codeName, 'UNAVAILABLE');
      assert.equal(err.retryAfterMs, 50);
      return true;
    });
  } finally {
    unavailableLeft = 0;
    catalog.close();
  }
});

test('every call has a deadline', async () => {
  const catalog = new CatalogClient(address, { timeoutMs: 200 });
  try {
    const started = Date.now();
    await assert.rejects(
      catalog.unary('InspectModel', { name: 'models/a' }),
      (err) => err instanceof RbeeError && err.codeName === 'DEADLINE_EXCEEDED',
    );
    assert.ok(Date.now() - started < 1_500);
  } finally {
    catalog.close();
  }
});

test('an AbortSignal cancels a call', async () => {
  const catalog = new CatalogClient(address);
  try {
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 50);
    await assert.rejects(
      catalog.unary('InspectModel', { name: 'models/a' }, { signal: controller.signal }),
      (err) => err instanceof RbeeError && err.codeName === 'CANCELLED',
    );
    await assert.rejects(
      catalog.getModel('a', { signal: AbortSignal.abort() }),
      (err) => err instanceof RbeeError && err.codeName === 'CANCELLED',
    );
  } finally {
    catalog.close();
  }
});

test('listModels pages, allPages and the models() iterator', async () => {
  const catalog = new CatalogClient(address);
  try {
    const first = await catalog.listModels({ pageSize: 2 });
    assert.deepEqual(
      first.models.map((m) => m.name),
      ['models/a', 'models/b'],
    );
    assert.equal(first.nextPageToken, '2');
    assert.equal(first.totalSize, 5);
    const second = await catalog.listModels({ pageSize: 2, pageToken: first.nextPageToken });
    assert.deepEqual(
      second.models.map((m) => m.name),
      ['models/c', 'models/d'],
    );
    const all = await catalog.listModels({ pageSize: 2, allPages: true });
    assert.equal(all.models.length, 5);
    assert.equal(all.nextPageToken, '');
    const names = [];
    for await (const model of catalog.models({ pageSize: 2 })) names.push(model.name);
    assert.deepEqual(
      names,
      MODELS.map((m) => m.name),
    );
  } finally {
    catalog.close();
  }
});

test('TLS: the server is checked against the CA and the server name', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'rbee-node-tls-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const openssl = spawnSync(
    'openssl',
    [
      'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=rbee-catalog',
      '-addext', 'subjectAltName=DNS:rbee-catalog',
      '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
    ],
    { encoding: 'utf8' },
  );
  if (openssl.error || openssl.status !== 0) {
    t.skip(`openssl cannot make a test certificate: ${openssl.error ?? openssl.stderr}`);
    return;
  }
  const tlsServer = new grpc.Server();
  tlsServer.addService(loadRbee().rbee.catalog.v1.CatalogService.service, {
    GetModel(call, callback) {
      callback(null, { name: call.request.name, displayName: 'over TLS' });
    },
  });
  const port = await new Promise((resolve, reject) =>
    tlsServer.bindAsync(
      '127.0.0.1:0',
      grpc.ServerCredentials.createSsl(null, [
        {
          private_key: readFileSync(join(dir, 'key.pem')),
          cert_chain: readFileSync(join(dir, 'cert.pem')),
        },
      ]),
      (err, p) => (err ? reject(err) : resolve(p)),
    ),
  );
  t.after(() => tlsServer.forceShutdown());
  const trusted = new CatalogClient(`127.0.0.1:${port}`, {
    security: { caFile: join(dir, 'cert.pem'), serverName: 'rbee-catalog' },
    timeoutMs: 5_000,
  });
  const plain = new CatalogClient(`127.0.0.1:${port}`, { timeoutMs: 2_000, maxAttempts: 1 });
  try {
    assert.equal(trusted.security.usesTls, true);
    assert.equal((await trusted.getModel('x')).displayName, 'over TLS');
    await assert.rejects(plain.getModel('x'), (err) => err instanceof RbeeError);
  } finally {
    trusted.close();
    plain.close();
  }
});

test('ChannelSecurity.fromEnv reads the RBEE_* variables and never shows the token', () => {
  const security = ChannelSecurity.fromEnv({
    RBEE_TOKEN: ' s3cret ',
    RBEE_TLS: 'yes',
    RBEE_TLS_CA: '/ca.pem',
    RBEE_TLS_SERVER_NAME: 'rbee-pool',
  });
  assert.equal(security.token, 's3cret');
  assert.equal(security.usesTls, true);
  assert.equal(security.caFile, '/ca.pem');
  assert.equal(security.serverName, 'rbee-pool');
  assert.equal(security.callMetadata().get('authorization')[0], 'Bearer s3cret');
  assert.ok(!inspect(security).includes('s3cret'));
  assert.ok(!JSON.stringify(security).includes('s3cret'));
  assert.equal(ChannelSecurity.fromEnv({}).callMetadata().get('authorization').length, 0);
  assert.throws(() => new ChannelSecurity({ certFile: '/c.pem' }), /both a certificate/);
});
