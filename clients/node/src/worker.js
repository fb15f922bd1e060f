// rbee.worker.v1.WorkerService: one worker process, one model. Generation is a stream of
// token deltas ending with one result (finish reason, usage, timings).

import { ServiceClient } from './client.js';

/**
 * @typedef {import('./client.js').ClientOptions} ClientOptions
 * @typedef {import('./client.js').CallOptions} CallOptions
 * @typedef {{ text: string, tokenIds: number[] } & Record<string, any>} TokenDelta
 * @typedef {{ finishReason: string, usage: Record<string, any> | null } & Record<string, any>}
 *   GenerationResult finishReason: `FINISH_REASON_LENGTH`, `FINISH_REASON_END_OF_SEQUENCE`, ...
 * @typedef {{ event: 'delta', delta: TokenDelta, result: null }
 *   | { event: 'result', result: GenerationResult, delta: null }} GenerateEvent
 * @typedef {'system' | 'user' | 'assistant' | 'tool'} Role
 * @typedef {{ role: Role | string, content: string } & Record<string, any>} ChatMessage
 *   role: a short name (`user`) or the enum name (`CHAT_ROLE_USER`)
 * @typedef {{ model?: string, sampling?: Record<string, any>, stopping?: Record<string, any> }
 *   & CallOptions} GenerateOptions sampling: rbee.worker.v1.SamplingParams (temperature, topK,
 *   seed, ...); stopping: rbee.worker.v1.StoppingCriteria (maxTokens, stop)
 */

/**
 * The wire name of a chat role.
 * @param {string} role
 */
function chatRole(role) {
  return role.startsWith('CHAT_ROLE_') ? role : `CHAT_ROLE_${role.toUpperCase()}`;
}

/**
 * Read a generation stream to its end: the whole text and the result.
 * @param {AsyncIterable<GenerateEvent>} events from WorkerClient.generate or .chat
 * @param {(text: string) => void} [onText] called with each delta's text as it arrives
 * @returns {Promise<{ text: string, result: GenerationResult }>}
 */
export async function collectText(events, onText) {
  let text = '';
  for await (const event of events) {
    if (event.event === 'result') return { text, result: event.result };
    text += event.delta.text;
    onText?.(event.delta.text);
  }
  throw new Error('the generation stream ended without a result');
}

export class WorkerClient extends ServiceClient {
  /**
   * @param {string} target the worker's `host:port` (a spawned worker's `endpoint`)
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    super((pkg) => pkg.rbee.worker.v1.WorkerService, target, options);
  }

  /**
   * The worker's state, model, device and counters.
   * @param {CallOptions} [options]
   * @returns {Promise<Record<string, any>>} a rbee.worker.v1.Worker
   */
  getWorker(options) {
    return this.unary('GetWorker', {}, options);
  }

  /**
   * Complete a prompt: token deltas, then one result.
   * @param {string} prompt
   * @param {GenerateOptions} [options]
   * @returns {AsyncGenerator<GenerateEvent, void, undefined>}
   */
  generate(prompt, options = {}) {
    const { model = '', sampling = null, stopping = null, ...call } = options;
    return this.stream('Generate', { model, prompt, sampling, stopping }, call);
  }

  /**
   * Chat with the model's template: token deltas of the assistant's reply, then one result.
   * @param {Array<ChatMessage | [string, string]>} messages `{ role, content }` or
   *   `[role, content]`; role `system`, `user` or `assistant`
   * @param {GenerateOptions} [options]
   * @returns {AsyncGenerator<GenerateEvent, void, undefined>}
   */
  chat(messages, options = {}) {
    const { model = '', sampling = null, stopping = null, ...call } = options;
    const wire = messages.map((m) =>
      Array.isArray(m)
        ? { role: chatRole(m[0]), content: m[1] }
        : { ...m, role: chatRole(String(m.role)) },
    );
    return this.stream('Chat', { model, messages: wire, sampling, stopping }, call);
  }

  /**
   * The model's token ids for `text`.
   * @param {string} text
   * @param {{ addSpecial?: boolean } & CallOptions} [options]
   * @returns {Promise<number[]>}
   */
  async tokenize(text, options = {}) {
    const { addSpecial, ...call } = options;
    const request = addSpecial === undefined ? { text } : { text, addSpecial };
    return (await this.unary('Tokenize', request, call)).tokenIds;
  }

  /**
   * The text of token ids.
   * @param {number[]} tokenIds
   * @param {CallOptions} [options]
   * @returns {Promise<string>}
   */
  async detokenize(tokenIds, options) {
    return (await this.unary('Detokenize', { tokenIds }, options)).text;
  }

  /**
   * Generate an image (image workers): step progress events, then one result with the PNG.
   * @param {Record<string, any>} params a rbee.worker.v1.ImageParams (prompt, steps, ...)
   * @param {{ model?: string } & CallOptions} [options]
   * @returns {AsyncGenerator<Record<string, any>, void, undefined>}
   */
  generateImage(params, options = {}) {
    const { model = '', ...call } = options;
    return this.stream('GenerateImage', { model, params }, call);
  }
}
