// rbee.provisioner.v1.ProvisionerService: pulls models onto the hive (HF Hub, CivitAI, URLs,
// local files), each pull a stream of progress events ending with the catalog model.

import { resourceName, ServiceClient } from './client.js';

/**
 * @typedef {import('./client.js').ClientOptions} ClientOptions
 * @typedef {import('./client.js').CallOptions} CallOptions
 * @typedef {Record<string, any>} Model a rbee.catalog.v1.Model
 * @typedef {Record<string, any>} PullProgress a rbee.provisioner.v1.PullProgress
 * @typedef {{ event: 'progress', progress: PullProgress, model: null }
 *   | { event: 'model', model: Model, progress: null }} PullEvent
 *   one PullModelResponse: progress events, then exactly one `model`
 * @typedef {{ options?: Record<string, any>, pullId?: string } & CallOptions} PullOptions
 *   `options` is a rbee.provisioner.v1.PullOptions (revision, files, force, modelId, ...)
 */

export class ProvisionerClient extends ServiceClient {
  /**
   * @param {string} target the provisioner's `host:port` (default port 50081)
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    super((pkg) => pkg.rbee.provisioner.v1.ProvisionerService, target, options);
  }

  /**
   * Pull a model: progress events, then the READY model. Leaving the loop early stops
   * watching; the pull itself goes on (cancel it with cancelPull).
   * @param {string} source `hf:ORG/REPO[:FILE][@REV]`, `civitai:ID`, `https://...`, `file:PATH`
   * @param {PullOptions} [options]
   * @returns {AsyncGenerator<PullEvent, void, undefined>}
   */
  pullModel(source, options = {}) {
    const { options: pullOptions = null, pullId = '', ...call } = options;
    return this.stream('PullModel', { source, options: pullOptions, pullId }, call);
  }

  /**
   * Pull a model to the end and return it; `onProgress` sees every progress event.
   * @param {string} source
   * @param {PullOptions & { onProgress?: (progress: PullProgress) => void }} [options]
   * @returns {Promise<Model>}
   */
  async pull(source, options = {}) {
    const { onProgress, ...rest } = options;
    for await (const event of this.pullModel(source, rest)) {
      if (event.event === 'model') return event.model;
      onProgress?.(event.progress);
    }
    throw new Error(`the pull of ${source} ended without a model`);
  }

  /**
   * Watch a pull that is already running (or finished): the same events as pullModel.
   * @param {string} pull `pulls/x` or `x`
   * @param {CallOptions} [options]
   * @returns {AsyncGenerator<PullEvent, void, undefined>}
   */
  watchPull(pull, options) {
    return this.stream('WatchPull', { name: resourceName('pulls', pull) }, options);
  }

  /**
   * @param {string} pull
   * @param {CallOptions} [options]
   * @returns {Promise<Record<string, any>>} a rbee.provisioner.v1.Pull
   */
  getPull(pull, options) {
    return this.unary('GetPull', { name: resourceName('pulls', pull) }, options);
  }

  /**
   * Every pull (all pages).
   * @param {{ filter?: string } & CallOptions} [options]
   * @returns {Promise<Record<string, any>[]>}
   */
  listPulls(options = {}) {
    const { filter = '', ...call } = options;
    return this.listAll('ListPulls', 'pulls', { filter }, call);
  }

  /**
   * Cancel a running pull; the partial download is kept for a resume unless `discardPartial`.
   * @param {string} pull
   * @param {{ discardPartial?: boolean } & CallOptions} [options]
   * @returns {Promise<Record<string, any>>}
   */
  cancelPull(pull, options = {}) {
    const { discardPartial = false, ...call } = options;
    return this.unary('CancelPull', { name: resourceName('pulls', pull), discardPartial }, call);
  }
}
