// Loads the mesh's contract, protos/rbee/*/v1/*.proto, at run time with @grpc/proto-loader.
//
// No generated code is committed: the .proto files are the single source of truth, so this
// client can never go stale against them. Loader options (one choice for the whole SDK):
//   keepCase: false  field names are lowerCamelCase, as JavaScript expects (`sizeBytes`,
//                    `nextPageToken`); proto-loader accepts the same names in requests.
//   longs: Number    64-bit integers are plain numbers. Exact below 2**53 (8 PiB of bytes);
//                    above that (a random 64-bit seed) precision is lost: send seeds < 2**53.
//   enums: String    enum values are their names (`MODEL_STATE_READY`); requests take names.
//   defaults: true   unset scalar fields read as their zero value, unset messages as null.
//   oneofs: true     each oneof adds a field naming the member that is set (`event: 'model'`).

import { readdirSync, existsSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const HERE = dirname(fileURLToPath(import.meta.url));

/** The googleapis protos this SDK needs (google.rpc.Status and its error details). */
export const GOOGLEAPIS_DIR = resolve(HERE, '..', 'third_party', 'googleapis');

/** The repository's protos/ folder, used unless RBEE_PROTOS_DIR or `protoDir` says otherwise. */
export const DEFAULT_PROTOS_DIR = resolve(HERE, '..', '..', '..', 'protos');

/** @type {protoLoader.Options} */
export const LOADER_OPTIONS = Object.freeze({
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});

/** @type {Map<string, grpc.GrpcObject>} */
const loaded = new Map();

/**
 * Every rbee .proto file under `root`, relative to it (`rbee/catalog/v1/catalog.proto`).
 * @param {string} root
 * @returns {string[]}
 */
function rbeeProtoFiles(root) {
  /** @type {string[]} */
  const found = [];
  /** @param {string} dir */
  const walk = (dir) => {
    for (const entry of readdirSync(dir).sort()) {
      const path = join(dir, entry);
      if (statSync(path).isDirectory()) walk(path);
      else if (entry.endsWith('.proto')) found.push(relative(root, path));
    }
  };
  walk(join(root, 'rbee'));
  return found;
}

/**
 * The protos folder to load: `protoDir`, else RBEE_PROTOS_DIR, else the repository's protos/.
 * @param {string | undefined} protoDir
 * @returns {string}
 */
export function protosDir(protoDir) {
  const dir = resolve(protoDir ?? process.env.RBEE_PROTOS_DIR ?? DEFAULT_PROTOS_DIR);
  if (!existsSync(join(dir, 'rbee'))) {
    throw new Error(`no rbee protos under ${dir} (set RBEE_PROTOS_DIR to the repository's protos/)`);
  }
  return dir;
}

/**
 * The loaded gRPC package object (`rbee.catalog.v1.CatalogService`, ...), loaded once per folder.
 * @param {{ protoDir?: string }} [options]
 * @returns {any} the grpc package tree; its shape follows the .proto files
 */
export function loadRbee(options = {}) {
  const dir = protosDir(options.protoDir);
  let pkg = loaded.get(dir);
  if (pkg === undefined) {
    const definition = protoLoader.loadSync(rbeeProtoFiles(dir), {
      ...LOADER_OPTIONS,
      includeDirs: [dir, GOOGLEAPIS_DIR],
    });
    pkg = grpc.loadPackageDefinition(definition);
    loaded.set(dir, pkg);
  }
  return pkg;
}
