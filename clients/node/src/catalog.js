// rbee.catalog.v1.CatalogService: the models and worker types of a hive, and which worker can
// run which model. Messages are plain objects shaped as the .proto says (see protos.js).

import { resourceName, ServiceClient } from './client.js';

/**
 * @typedef {import('./client.js').ClientOptions} ClientOptions
 * @typedef {import('./client.js').CallOptions} CallOptions
 * @typedef {Record<string, any>} Model a rbee.catalog.v1.Model
 * @typedef {{ models: Model[], nextPageToken: string, totalSize: number }} ModelPage
 */

export class CatalogClient extends ServiceClient {
  /**
   * @param {string} target the catalog's `host:port` (default port 50061)
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    super((pkg) => pkg.rbee.catalog.v1.CatalogService, target, options);
  }

  /**
   * One model.
   * @param {string} model `models/x` or `x`
   * @param {CallOptions} [options]
   * @returns {Promise<Model>}
   */
  getModel(model, options) {
    return this.unary('GetModel', { name: resourceName('models', model) }, options);
  }

  /**
   * One page of models (ordered by name), or every page with `allPages`.
   * @param {{ filter?: string, pageSize?: number, pageToken?: string, allPages?: boolean }
   *   & CallOptions} [options] filter example: `format=gguf AND state=READY`
   * @returns {Promise<ModelPage>}
   */
  async listModels(options = {}) {
    const { filter = '', pageSize = 0, pageToken = '', allPages = false, ...call } = options;
    if (!allPages) return this.unary('ListModels', { filter, pageSize, pageToken }, call);
    /** @type {ModelPage} */
    const all = { models: [], nextPageToken: '', totalSize: 0 };
    let token = pageToken;
    do {
      const page = await this.unary('ListModels', { filter, pageSize, pageToken: token }, call);
      all.models.push(...page.models);
      all.totalSize = page.totalSize;
      token = page.nextPageToken;
    } while (token);
    return all;
  }

  /**
   * Every model matching `filter`, fetched page by page as the loop asks for them.
   * @param {{ filter?: string, pageSize?: number } & CallOptions} [options]
   * @returns {AsyncGenerator<Model, void, undefined>}
   */
  async *models(options = {}) {
    const { filter = '', pageSize = 0, ...call } = options;
    let pageToken = '';
    do {
      const page = await this.unary('ListModels', { filter, pageSize, pageToken }, call);
      yield* page.models;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /**
   * Delete a model from the catalog (and its files when the catalog owns them).
   * @param {string} model
   * @param {{ force?: boolean, etag?: string } & CallOptions} [options]
   * @returns {Promise<void>}
   */
  async deleteModel(model, options = {}) {
    const { force = false, etag = '', ...call } = options;
    await this.unary('DeleteModel', { name: resourceName('models', model), force, etag }, call);
  }

  /**
   * Every worker type (`worker-types/cpu-llm`, ...).
   * @param {{ filter?: string } & CallOptions} [options]
   * @returns {Promise<Record<string, any>[]>}
   */
  listWorkerTypes(options = {}) {
    const { filter = '', ...call } = options;
    return this.listAll('ListWorkerTypes', 'workerTypes', { filter }, call);
  }

  /**
   * Which worker types can run a model, with verdicts and memory numbers.
   * @param {string} model `models/x` or `x`
   * @param {{ workerTypes?: string[], device?: Record<string, any>, contextLength?: number,
   *   kvCacheType?: string, gpuLayers?: number } & CallOptions} [options]
   * @returns {Promise<{ results: Record<string, any>[], contextLengthUsed: number }>}
   */
  evaluateCompatibility(model, options = {}) {
    const { workerTypes = [], device, contextLength = 0, kvCacheType, gpuLayers, ...call } =
      options;
    return this.unary(
      'EvaluateCompatibility',
      {
        model: resourceName('models', model),
        workerTypes: workerTypes.map((t) => resourceName('worker-types', t)),
        device: device ?? null,
        contextLength,
        ...(kvCacheType === undefined ? {} : { kvCacheType }),
        ...(gpuLayers === undefined ? {} : { gpuLayers }),
      },
      call,
    );
  }
}
