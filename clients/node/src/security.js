// How a client proves itself and checks the server: the Node twin of the Python SDK's
// services/common/channels.py ChannelSecurity, reading the same RBEE_* variables.
//
// The token travels as `authorization: Bearer TOKEN` metadata on every call. It is added per
// call rather than as call credentials because grpc-js refuses call credentials on an insecure
// channel, and a loopback mesh with auth on has no TLS.

import { readFileSync } from 'node:fs';

import * as grpc from '@grpc/grpc-js';

const TRUE_WORDS = new Set(['1', 'true', 'yes', 'on']);

/**
 * @typedef {object} SecurityOptions
 * @property {string} [token] bearer token sent on every call ('' = none)
 * @property {boolean} [tls] use TLS (implied by any certificate file below)
 * @property {string} [caFile] PEM roots to check the server with (unset = the system roots)
 * @property {string} [certFile] this client's certificate, for mutual TLS (with keyFile)
 * @property {string} [keyFile] this client's private key, for mutual TLS (with certFile)
 * @property {string} [serverName] the name the server's certificate is checked against, when it
 *   differs from the host in the address
 */

export class ChannelSecurity {
  // A private field, so the token never shows in console.log or util.inspect.
  #token;

  /** @param {SecurityOptions} [options] */
  constructor(options = {}) {
    if (Boolean(options.certFile) !== Boolean(options.keyFile)) {
      throw new Error('mutual TLS needs both a certificate file and a key file');
    }
    this.#token = options.token ?? '';
    this.tls = Boolean(options.tls);
    this.caFile = options.caFile ?? '';
    this.certFile = options.certFile ?? '';
    this.keyFile = options.keyFile ?? '';
    this.serverName = options.serverName ?? '';
  }

  /**
   * RBEE_TOKEN, RBEE_TLS (1/true/yes/on), RBEE_TLS_CA, RBEE_TLS_CERT, RBEE_TLS_KEY,
   * RBEE_TLS_SERVER_NAME.
   * @param {Record<string, string | undefined>} [env]
   */
  static fromEnv(env = process.env) {
    const get = (/** @type {string} */ key) => (env[key] ?? '').trim();
    return new ChannelSecurity({
      token: get('RBEE_TOKEN'),
      tls: TRUE_WORDS.has(get('RBEE_TLS').toLowerCase()),
      caFile: get('RBEE_TLS_CA'),
      certFile: get('RBEE_TLS_CERT'),
      keyFile: get('RBEE_TLS_KEY'),
      serverName: get('RBEE_TLS_SERVER_NAME'),
    });
  }

  /** The bearer token ('' = none). */
  get token() {
    return this.#token;
  }

  /** Whether the channel uses TLS. */
  get usesTls() {
    return this.tls || Boolean(this.caFile) || Boolean(this.certFile);
  }

  /** The channel credentials (reads the PEM files now). */
  channelCredentials() {
    if (!this.usesTls) return grpc.credentials.createInsecure();
    const read = (/** @type {string} */ path) => (path ? readFileSync(path) : null);
    return grpc.credentials.createSsl(read(this.caFile), read(this.keyFile), read(this.certFile));
  }

  /**
   * Channel options this security adds.
   * @returns {grpc.ChannelOptions}
   */
  channelOptions() {
    return this.usesTls && this.serverName
      ? { 'grpc.ssl_target_name_override': this.serverName, 'grpc.default_authority': this.serverName }
      : {};
  }

  /** The metadata of one call: the bearer token, when there is one. */
  callMetadata() {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    return metadata;
  }
}
