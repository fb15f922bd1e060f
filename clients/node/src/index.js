// @rbee/mesh-client: the rbee mesh from Node.js. See README.md.

export { CatalogClient } from './catalog.js';
export {
  DEFAULT_MAX_ATTEMPTS,
  DEFAULT_STREAM_TIMEOUT_MS,
  DEFAULT_TIMEOUT_MS,
  resourceName,
  ServiceClient,
} from './client.js';
export { CODE_NAMES, errorFromGrpc, RbeeError } from './errors.js';
export { PoolClient } from './pool.js';
export { DEFAULT_PROTOS_DIR, LOADER_OPTIONS, loadRbee } from './protos.js';
export { ProvisionerClient } from './provisioner.js';
export { ChannelSecurity } from './security.js';
export { collectText, WorkerClient } from './worker.js';
export { status } from '@grpc/grpc-js';
