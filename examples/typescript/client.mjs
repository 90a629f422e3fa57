#!/usr/bin/env node
// @ts-check
/**
 * claude-agent-http from Node.js (20 or later): the built-in fetch and a small
 * Server-Sent Events parser (Node 20 has no EventSource, and EventSource cannot
 * POST or send an Authorization header anyway). Plain JavaScript with JSDoc
 * types, so it runs without a build step or any dependency; `npm install &&
 * npm run typecheck` in this directory checks it with TypeScript (strict).
 *
 * Creates a session, streams a chat turn over SSE, drops the connection on
 * purpose and picks the turn up again with Last-Event-ID, reads the session's
 * history, resumes the session and sends a follow-up message.
 *
 *   BASE_URL=http://127.0.0.1:8000 TOKEN=cah_... node examples/typescript/client.mjs
 *
 * Environment:
 *   BASE_URL          the server (default http://127.0.0.1:8000)
 *   TOKEN             a user's API token (required)
 *   MESSAGE           the streamed message (default: a short greeting request)
 *   FOLLOW_UP         the message sent after the resume
 *   DISCONNECT_AFTER  text frames read before dropping the first connection (default 2)
 *   KEEP_SESSION      1: do not delete the session at the end
 *
 * Prints one line per step and exits non-zero on the first failure.
 */

/**
 * A frame of the chat stream (`data:` of each event).
 * @typedef {{type: string, text?: string | null, error?: string | null, is_error?: boolean,
 *            total_cost_usd?: number, [key: string]: unknown}} Frame
 * @typedef {{id: string | null, data: Frame}} SseEvent
 */

const BASE_URL = (process.env.BASE_URL ?? 'http://127.0.0.1:8000').replace(/\/+$/, '');
const TOKEN = process.env.TOKEN ?? '';
const MESSAGE = process.env.MESSAGE ?? 'Say hello in one short sentence.';
const FOLLOW_UP = process.env.FOLLOW_UP ?? 'Now say goodbye in one short sentence.';
const DISCONNECT_AFTER = Number(process.env.DISCONNECT_AFTER ?? '2');
const KEEP_SESSION = process.env.KEEP_SESSION === '1';
/** Milliseconds a plain request may take. */
const REQUEST_TIMEOUT = 150_000;

class Failure extends Error {}

/**
 * A request to the API; fails on a non-2xx status with the server's JSON error.
 * @param {string} method
 * @param {string} path
 * @param {{body?: unknown, headers?: Record<string, string>, signal?: AbortSignal}} [options]
 * @returns {Promise<Response>}
 */
async function api(method, path, options = {}) {
  /** @type {Record<string, string>} */
  const headers = { Authorization: `Bearer ${TOKEN}`, ...options.headers };
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(`${BASE_URL}${path}`, {
    method,
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    signal: options.signal ?? AbortSignal.timeout(REQUEST_TIMEOUT),
  });
  if (!response.ok) {
    throw new Failure(`${method} ${path} answered ${response.status}: ${await response.text()}`);
  }
  return response;
}

/**
 * Parses a `text/event-stream` body as it arrives. Comments (keep-alives) are skipped.
 * @param {Response} response
 * @returns {AsyncGenerator<SseEvent>}
 */
async function* sseEvents(response) {
  if (!response.body) throw new Failure('the stream has no body');
  const decoder = new TextDecoder();
  let buffer = '';
  /** @type {string | null} */
  let id = null;
  /** @type {string[]} */
  let data = [];
  for await (const chunk of response.body) {
    buffer += decoder.decode(chunk, { stream: true });
    let newline;
    while ((newline = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, '');
      buffer = buffer.slice(newline + 1);
      if (line === '') {
        if (data.length > 0) yield { id, data: JSON.parse(data.join('\n')) };
        id = null;
        data = [];
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'id') id = value;
        else if (field === 'data') data.push(value);
      }
    }
  }
}

/** What the client knows of one turn, across connections. */
class Turn {
  /** @type {string | null} */ lastId = null;
  reply = '';
  /** @type {Frame | null} */ result = null;
  /** @type {'done' | 'error' | null} */ terminal = null;

  /**
   * Reads frames until the turn's end or, if `stopAfterDeltas` > 0, until that
   * many text frames arrived; then closes the connection. Returns the frames read.
   * @param {string} method
   * @param {string} path
   * @param {{body?: unknown, headers?: Record<string, string>}} options
   * @param {number} [stopAfterDeltas]
   */
  async read(method, path, options, stopAfterDeltas = 0) {
    const controller = new AbortController();
    const response = await api(method, path, {
      ...options,
      headers: { Accept: 'text/event-stream', ...options.headers },
      signal: controller.signal,
    });
    let count = 0;
    let deltas = 0;
    try {
      for await (const event of sseEvents(response)) {
        count += 1;
        if (event.id !== null) this.lastId = event.id;
        const frame = event.data;
        if (frame.type === 'text_delta') {
          this.reply += frame.text ?? '';
          deltas += 1;
          console.log(`  frame ${event.id}: text_delta ${JSON.stringify(frame.text ?? '')}`);
        } else if (frame.type === 'result') {
          this.result = frame;
          console.log(`  frame ${event.id}: result (is_error ${frame.is_error}, cost $${frame.total_cost_usd})`);
        } else if (frame.type === 'gap') {
          console.log(`  gap: ${frame.error}`);
        } else if (frame.type === 'done' || frame.type === 'error') {
          this.terminal = frame.type;
          console.log(`  frame ${event.id}: ${frame.type}${frame.type === 'error' ? ` ${frame.error}` : ''}`);
          break;
        } else {
          console.log(`  frame ${event.id}: ${frame.type}`);
        }
        if (stopAfterDeltas > 0 && deltas >= stopAfterDeltas) break;
      }
    } finally {
      controller.abort(); // hang up (a no-op when the server already ended the stream)
    }
    return count;
  }
}

async function run() {
  if (!TOKEN) throw new Failure('set TOKEN to a user API token');

  // 1. Is the server up? (/health needs no token.)
  const healthResponse = await fetch(`${BASE_URL}/health`, { signal: AbortSignal.timeout(REQUEST_TIMEOUT) });
  if (!healthResponse.ok) throw new Failure(`GET /health answered ${healthResponse.status}`);
  const health = await healthResponse.json();
  console.log(`health: ${health.status} (version ${health.version}, storage ${health.storage_type})`);

  // 2. A session (in the user's directory; metadata is free-form).
  const session = await (await api('POST', '/api/v1/sessions', { body: { metadata: { example: 'typescript' } } })).json();
  const sessionId = session.session_id;
  if (typeof sessionId !== 'string') throw new Failure(`no session_id in ${JSON.stringify(session)}`);
  console.log(`session: created ${sessionId}`);

  // 3. A streamed turn; hang up after a few text frames.
  const turn = new Turn();
  console.log('stream: POST /api/v1/chat/stream');
  let count = await turn.read(
    'POST',
    '/api/v1/chat/stream',
    { body: { session_id: sessionId, message: MESSAGE, timeout: 120 } },
    DISCONNECT_AFTER,
  );
  if (count === 0) throw new Failure('the stream sent no frame');
  if (turn.terminal === null) {
    console.log(`stream: ${count} frames, last id ${turn.lastId}; disconnected on purpose`);
  } else {
    console.log(`stream: ${count} frames, the turn ended (${turn.terminal}) before the planned disconnect`);
  }

  // 4. Reconnect: the frames after lastId still buffered, then live ones until the end.
  const streamPath = `/api/v1/sessions/${sessionId}/stream`;
  console.log(`reconnect: GET ${streamPath} with Last-Event-ID ${turn.lastId}`);
  count = await turn.read('GET', streamPath, { headers: { 'Last-Event-ID': turn.lastId ?? '0' } });
  console.log(`reconnect: ${count} more frames, turn ended with ${turn.terminal}`);
  if (turn.terminal !== 'done' || turn.result === null) throw new Failure('the turn did not end with a result and done');
  if (turn.reply !== turn.result.text) {
    throw new Failure(`streamed text ${JSON.stringify(turn.reply)} differs from the result ${JSON.stringify(turn.result.text)}`);
  }
  console.log(`reply: ${turn.reply}`);

  // 5. The stored history, oldest first (paginate with `after` = next_after).
  const history = await (await api('GET', `/api/v1/sessions/${sessionId}/messages`)).json();
  /** @type {{kind: string, content: {result?: string}}[]} */
  const messages = history.messages;
  console.log(`history: ${messages.length} messages (${messages.map((m) => m.kind).join(', ')})`);
  if (messages.at(-1)?.content.result !== turn.reply) throw new Failure("the history's last result is not the reply");

  // 6. Resume (reopens an expired session; a no-op for an open one) and go on.
  const resumed = await (await api('POST', `/api/v1/sessions/${sessionId}/resume`)).json();
  console.log(`resume: status ${resumed.status}`);
  const answer = await (
    await api('POST', '/api/v1/chat', { body: { session_id: sessionId, message: FOLLOW_UP, timeout: 120 } })
  ).json();
  if (answer.is_error) throw new Failure(`the follow-up failed: ${JSON.stringify(answer)}`);
  console.log(`follow-up: ${answer.text}`);

  // 7. Clean up (the directory stays on the server).
  if (KEEP_SESSION) {
    console.log(`kept: ${sessionId}`);
  } else {
    await api('DELETE', `/api/v1/sessions/${sessionId}`);
    console.log(`deleted: ${sessionId}`);
  }
  console.log('ok');
}

run().catch((error) => {
  console.error(`error: ${error instanceof Error ? error.message : error}`);
  if (!(error instanceof Failure) && error instanceof Error && error.cause) console.error(`  cause: ${error.cause}`);
  process.exitCode = 1;
});
