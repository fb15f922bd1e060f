// Typed errors from the server's status and its google.rpc details.
//
// The mesh's servers end a failed call with a non-OK status whose `grpc-status-details-bin`
// trailer is a google.rpc.Status carrying ErrorInfo (domain "rbee.dev", a reason from
// rbee.common.v1.ErrorReason without its prefix), and where they help BadRequest, ResourceInfo
// and RetryInfo. Nothing here parses message strings: switch on `code` and `reason`.

import { join } from 'node:path';

import * as grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';

import { GOOGLEAPIS_DIR } from './protos.js';

const DETAILS_TRAILER = 'grpc-status-details-bin';
const TYPE_PREFIX = 'type.googleapis.com/';

/** @type {protobuf.Root | undefined} */
let rpcRoot;

/** google.rpc.* types, loaded on the first error that carries details. */
function rpcTypes() {
  if (rpcRoot === undefined) {
    const root = new protobuf.Root();
    root.resolvePath = (_origin, target) =>
      target.startsWith('google/rpc/') ? join(GOOGLEAPIS_DIR, target) : target;
    root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
    rpcRoot = root;
  }
  return rpcRoot;
}

/** gRPC status names by number (`5` -> `NOT_FOUND`). */
export const CODE_NAMES = Object.freeze(
  Object.fromEntries(
    Object.entries(grpc.status)
      .filter(([, value]) => typeof value === 'number')
      .map(([name, value]) => [value, name]),
  ),
);

/**
 * @typedef {{ field: string, description: string }} FieldViolation
 */

/** A failed call: the gRPC status and what the server's ErrorInfo said about it. */
export class RbeeError extends Error {
  /**
   * @param {string} message
   * @param {{ code: number, reason?: string, domain?: string,
   *           metadata?: Record<string, string>, fieldViolations?: FieldViolation[],
   *           resourceType?: string, resourceName?: string, retryAfterMs?: number | null,
   *           cause?: unknown }} fields
   */
  constructor(message, fields) {
    super(message, { cause: fields.cause });
    this.name = 'RbeeError';
    /** The gRPC status code (a number, see `grpc.status`). */
    this.code = fields.code;
    /** The status name: `NOT_FOUND`, `UNAVAILABLE`, ... */
    this.codeName = CODE_NAMES[fields.code] ?? 'UNKNOWN';
    /** The ErrorInfo reason (`MODEL_NOT_FOUND`), or '' when the server sent none. */
    this.reason = fields.reason ?? '';
    /** The ErrorInfo domain (`rbee.dev`). */
    this.domain = fields.domain ?? '';
    /** ErrorInfo metadata: resource_name, field, request_id, ... */
    this.metadata = fields.metadata ?? {};
    /** BadRequest field violations. */
    this.fieldViolations = fields.fieldViolations ?? [];
    /** ResourceInfo. */
    this.resourceType = fields.resourceType ?? '';
    this.resourceName = fields.resourceName ?? '';
    /** RetryInfo's delay in milliseconds, or null when the server gave none. */
    this.retryAfterMs = fields.retryAfterMs ?? null;
  }

  /** The server's request id, for matching a failure with the server log. */
  get requestId() {
    return this.metadata.request_id ?? '';
  }
}

/**
 * Decode the google.rpc.Status trailer into the fields RbeeError keeps.
 * @param {Buffer} bytes
 */
export function decodeStatusDetails(bytes) {
  const types = rpcTypes();
  const status = types.lookupType('google.rpc.Status').decode(bytes);
  /** @type {ConstructorParameters<typeof RbeeError>[1]} */
  const fields = { code: /** @type {any} */ (status).code };
  for (const any of /** @type {any} */ (status).details ?? []) {
    // protobufjs keeps google.protobuf.Any's field name as written in its .proto: type_url.
    const typeName = String(any.type_url ?? any.typeUrl ?? '').replace(TYPE_PREFIX, '');
    if (!typeName.startsWith('google.rpc.')) continue;
    let detail;
    try {
      const type = types.lookupType(typeName);
      detail = /** @type {any} */ (type.toObject(type.decode(any.value), { longs: Number }));
    } catch {
      continue; // a detail this SDK does not know (or cannot read): skipped, as the protocol allows
    }
    switch (typeName) {
      case 'google.rpc.ErrorInfo':
        fields.reason = detail.reason ?? '';
        fields.domain = detail.domain ?? '';
        fields.metadata = detail.metadata ?? {};
        break;
      case 'google.rpc.BadRequest':
        fields.fieldViolations = (detail.fieldViolations ?? []).map(
          (/** @type {any} */ v) => ({ field: v.field ?? '', description: v.description ?? '' }),
        );
        break;
      case 'google.rpc.ResourceInfo':
        fields.resourceType = detail.resourceType ?? '';
        fields.resourceName = detail.resourceName ?? '';
        break;
      case 'google.rpc.RetryInfo': {
        const delay = detail.retryDelay ?? {};
        fields.retryAfterMs = (delay.seconds ?? 0) * 1000 + (delay.nanos ?? 0) / 1e6;
        break;
      }
      default:
        break;
    }
  }
  return fields;
}

/**
 * Turn a grpc-js ServiceError into an RbeeError (anything else is returned as is).
 * @param {unknown} err
 * @returns {unknown}
 */
export function errorFromGrpc(err) {
  if (err instanceof RbeeError) return err;
  const serviceError = /** @type {Partial<grpc.ServiceError>} */ (err);
  if (err === null || typeof err !== 'object' || typeof serviceError.code !== 'number') return err;
  const code = serviceError.code;
  const message = serviceError.details || CODE_NAMES[code] || 'UNKNOWN';
  /** @type {ConstructorParameters<typeof RbeeError>[1]} */
  let fields = { code };
  const trailer = serviceError.metadata?.get(DETAILS_TRAILER)?.[0];
  if (Buffer.isBuffer(trailer)) {
    try {
      fields = { ...decodeStatusDetails(trailer), code };
    } catch {
      // A malformed trailer must not hide the status itself.
    }
  }
  return new RbeeError(message, { ...fields, cause: err });
}
