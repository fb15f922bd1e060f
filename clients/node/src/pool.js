// rbee.worker.v1.PoolService: the devices of a hive, and the worker processes on them.

import { resourceName, ServiceClient } from './client.js';

/**
 * @typedef {import('./client.js').ClientOptions} ClientOptions
 * @typedef {import('./client.js').CallOptions} CallOptions
 * @typedef {Record<string, any>} Worker a rbee.worker.v1.Worker
 * @typedef {{ event: 'progress', progress: Record<string, any>, worker: null }
 *   | { event: 'worker', worker: Worker, progress: null }} SpawnEvent
 *   one SpawnWorkerResponse: progress events (stage VALIDATING ... READY), then the worker
 */

export class PoolClient extends ServiceClient {
  /**
   * @param {string} target the pool's `host:port` (default port 50091)
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    super((pkg) => pkg.rbee.worker.v1.PoolService, target, options);
  }

  /**
   * Every device of the hive (`devices/cpu`, `devices/cuda-0`, ...).
   * @param {{ filter?: string } & CallOptions} [options]
   * @returns {Promise<Record<string, any>[]>}
   */
  listDevices(options = {}) {
    const { filter = '', ...call } = options;
    return this.listAll('ListDevices', 'devices', { filter }, call);
  }

  /**
   * Spawn a worker for a model: progress events, then the READY worker (its `endpoint` is the
   * address a WorkerClient talks to).
   * @param {Record<string, any>} request a rbee.worker.v1.SpawnWorkerRequest, e.g.
   *   `{ model: 'models/x', device: 'devices/cpu', workerId: 'w1', reuse: true }`
   * @param {CallOptions} [options]
   * @returns {AsyncGenerator<SpawnEvent, void, undefined>}
   */
  spawnWorker(request, options) {
    const model = request.model ? resourceName('models', request.model) : '';
    return this.stream('SpawnWorker', { ...request, model }, options);
  }

  /**
   * @param {string} worker `workers/x` or `x`
   * @param {CallOptions} [options]
   * @returns {Promise<Worker>}
   */
  getWorker(worker, options) {
    return this.unary('GetWorker', { name: resourceName('workers', worker) }, options);
  }

  /**
   * Every worker (all pages).
   * @param {{ filter?: string } & CallOptions} [options] filter example: `state=READY`
   * @returns {Promise<Worker[]>}
   */
  listWorkers(options = {}) {
    const { filter = '', ...call } = options;
    return this.listAll('ListWorkers', 'workers', { filter }, call);
  }

  /**
   * Stop a worker: it drains for `graceSeconds` (the pool's default when unset), then exits.
   * @param {string} worker
   * @param {{ graceSeconds?: number, force?: boolean } & CallOptions} [options]
   * @returns {Promise<Worker>}
   */
  stopWorker(worker, options = {}) {
    const { graceSeconds, force = false, ...call } = options;
    const grace =
      graceSeconds === undefined
        ? null
        : { seconds: Math.floor(graceSeconds), nanos: Math.round((graceSeconds % 1) * 1e9) };
    return this.unary('StopWorker', { name: resourceName('workers', worker), grace, force }, call);
  }

  /**
   * Forget a stopped worker (`force` stops it first).
   * @param {string} worker
   * @param {{ force?: boolean, allowMissing?: boolean } & CallOptions} [options]
   * @returns {Promise<void>}
   */
  async deleteWorker(worker, options = {}) {
    const { force = false, allowMissing = false, ...call } = options;
    const name = resourceName('workers', worker);
    await this.unary('DeleteWorker', { name, force, allowMissing }, call);
  }

  /**
   * A worker's output, line by line (`follow` keeps the stream open for new lines).
   * @param {string} worker
   * @param {{ follow?: boolean, tailLines?: number } & CallOptions} [options]
   * @returns {AsyncGenerator<Record<string, any>, void, undefined>} rbee.common.v1.LogLine
   */
  async *workerLogs(worker, options = {}) {
    const { follow = false, tailLines = 0, ...call } = options;
    const request = { name: resourceName('workers', worker), follow, tailLines };
    for await (const response of this.stream('GetWorkerLogs', request, call)) {
      yield* response.lines;
    }
  }
}
