// What every service client shares: the channel, deadlines, the bearer token, typed errors,
// retries of UNAVAILABLE for unary calls, and server streams as async iterators.

import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import { errorFromGrpc, RbeeError } from './errors.js';
import { loadRbee } from './protos.js';
import { ChannelSecurity } from './security.js';

/** Unary calls: 30 s unless the client or the call says otherwise. */
export const DEFAULT_TIMEOUT_MS = 30_000;
/** Streams (pulls, spawns, generations): one hour unless the client or the call says otherwise. */
export const DEFAULT_STREAM_TIMEOUT_MS = 3_600_000;
/** Attempts of a unary call that keeps failing with UNAVAILABLE. */
export const DEFAULT_MAX_ATTEMPTS = 4;
const FIRST_RETRY_DELAY_MS = 200;

/**
 * @typedef {object} ClientOptions
 * @property {ChannelSecurity | import('./security.js').SecurityOptions} [security] TLS and token
 *   (default: plain, no token; `ChannelSecurity.fromEnv()` reads RBEE_TOKEN and RBEE_TLS*)
 * @property {string} [token] shorthand for `security: { token }`, on top of `security`
 * @property {number} [timeoutMs] deadline of unary calls (default 30 s)
 * @property {number} [streamTimeoutMs] deadline of streams (default 1 h; Infinity = none)
 * @property {number} [maxAttempts] attempts of a unary call on UNAVAILABLE (default 4)
 * @property {grpc.ChannelOptions} [channelOptions] extra grpc-js channel options
 * @property {string} [protoDir] the protos/ folder (default RBEE_PROTOS_DIR or the repository's)
 */

/**
 * @typedef {object} CallOptions
 * @property {number} [timeoutMs] this call's deadline, in milliseconds from now
 * @property {AbortSignal} [signal] cancels the call (streams end with a CANCELLED RbeeError)
 */

/**
 * A grpc-js deadline `ms` from now (Infinity: none).
 * @param {number} ms
 */
function deadlineAfter(ms) {
  return Number.isFinite(ms) ? Date.now() + ms : Infinity;
}

/**
 * @param {ClientOptions} options
 * @returns {ChannelSecurity}
 */
function securityFrom(options) {
  const given = options.security;
  const base =
    given instanceof ChannelSecurity
      ? given
      : given !== undefined
        ? new ChannelSecurity(given)
        : new ChannelSecurity();
  if (options.token === undefined) return base;
  return new ChannelSecurity({
    token: options.token,
    tls: base.tls,
    caFile: base.caFile,
    certFile: base.certFile,
    keyFile: base.keyFile,
    serverName: base.serverName,
  });
}

/**
 * The resource name `collection/id` for `id` or an already full name.
 * @param {string} collection e.g. `models`
 * @param {string} id `x` or `models/x`
 */
export function resourceName(collection, id) {
  return id.startsWith(`${collection}/`) ? id : `${collection}/${id}`;
}

/** The base of the service clients; not used directly. */
export class ServiceClient {
  /**
   * @param {(pkg: any) => typeof grpc.Client} service picks the service constructor
   * @param {string} target `host:port`
   * @param {ClientOptions} [options]
   */
  constructor(service, target, options = {}) {
    this.target = target;
    this.security = securityFrom(options);
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.streamTimeoutMs = options.streamTimeoutMs ?? DEFAULT_STREAM_TIMEOUT_MS;
    this.maxAttempts = Math.max(1, options.maxAttempts ?? DEFAULT_MAX_ATTEMPTS);
    const Ctor = service(loadRbee({ protoDir: options.protoDir }));
    /** @type {any} */
    this.stub = new Ctor(target, this.security.channelCredentials(), {
      ...this.security.channelOptions(),
      ...options.channelOptions,
    });
  }

  /** Close the channel; calls in flight are cancelled. */
  close() {
    this.stub.close();
  }

  /** `using client = new CatalogClient(...)` closes it at the end of the block. */
  [Symbol.dispose]() {
    this.close();
  }

  /**
   * One unary call with a deadline. UNAVAILABLE is retried with backoff (RetryInfo's delay
   * first), nothing else is: the other codes mean retrying would fail the same way.
   * @param {string} method the RPC's name, e.g. `GetModel`
   * @param {object} request
   * @param {CallOptions} [options]
   * @returns {Promise<any>}
   */
  async unary(method, request, options = {}) {
    let delay = FIRST_RETRY_DELAY_MS;
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this.#unaryOnce(method, request, options);
      } catch (raw) {
        const err = errorFromGrpc(raw);
        const retryable = err instanceof RbeeError && err.code === grpc.status.UNAVAILABLE;
        if (!retryable || attempt >= this.maxAttempts || options.signal?.aborted) throw err;
        await sleep(err.retryAfterMs ?? delay);
        delay *= 2;
      }
    }
  }

  /**
   * @param {string} method
   * @param {object} request
   * @param {CallOptions} options
   * @returns {Promise<any>}
   */
  #unaryOnce(method, request, options) {
    return new Promise((resolve, reject) => {
      const abort = () => call.cancel();
      const call = this.stub[method](
        request,
        this.security.callMetadata(),
        { deadline: deadlineAfter(options.timeoutMs ?? this.timeoutMs) },
        (/** @type {Error | null} */ err, /** @type {any} */ response) => {
          options.signal?.removeEventListener('abort', abort);
          if (err) reject(err);
          else resolve(response);
        },
      );
      if (options.signal?.aborted) abort();
      else options.signal?.addEventListener('abort', abort, { once: true });
    });
  }

  /**
   * A server stream as an async iterator of its messages. Errors are RbeeErrors; leaving the
   * loop early (break, return, throw) cancels the call. Streams are never retried: a retry
   * could repeat events the caller has already acted on.
   * @param {string} method
   * @param {object} request
   * @param {CallOptions} [options]
   * @returns {AsyncGenerator<any, void, undefined>}
   */
  async *stream(method, request, options = {}) {
    const call = this.stub[method](request, this.security.callMetadata(), {
      deadline: deadlineAfter(options.timeoutMs ?? this.streamTimeoutMs),
    });
    const abort = () => call.cancel();
    if (options.signal?.aborted) abort();
    else options.signal?.addEventListener('abort', abort, { once: true });
    let finished = false;
    try {
      for await (const message of call) yield message;
      finished = true;
    } catch (err) {
      finished = true;
      throw errorFromGrpc(err);
    } finally {
      options.signal?.removeEventListener('abort', abort);
      if (!finished) {
        // The caller left early: cancel the call; its CANCELLED error has no one to report to.
        call.on('error', () => {});
        call.cancel();
      }
    }
  }

  /**
   * Every item of a paginated List, page after page.
   * @param {string} method e.g. `ListWorkers`
   * @param {string} field the repeated field of the response, e.g. `workers`
   * @param {{ filter?: string, pageSize?: number }} request
   * @param {CallOptions} [options] applies to each page
   * @returns {Promise<any[]>}
   */
  async listAll(method, field, request, options = {}) {
    const items = [];
    let pageToken = '';
    do {
      const page = await this.unary(method, { ...request, pageToken }, options);
      items.push(...page[field]);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return items;
  }
}
