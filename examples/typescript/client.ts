/**
 * claude-agent-http from Node.js (18 or later), in TypeScript: the built-in
 * fetch for the streamed chat turn (`POST /api/v1/chat/stream`: an
 * EventSource can neither POST nor send an Authorization header), and an
 * EventSource (the `eventsource` package; Node has no global one before 22)
 * to pick the turn up again on `GET /api/v1/sessions/{id}/stream`, the
 * authorization added by the `fetch` it is given.
 *
 * Creates a session, streams a chat turn over SSE, drops the connection on
 * purpose and picks the turn up again from the last event id, reads the
 * session's history, resumes the session and sends a follow-up message.
 *
 *   cd examples/typescript && npm ci && npm run build
 *   BASE_URL=http://127.0.0.1:8000 TOKEN=cah_... node examples/typescript/dist/client.js
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

import { EventSource, type EventSourceFetchInit } from 'eventsource';

/** A frame of the chat stream (the JSON `data:` of each event). */
interface Frame {
  type: string;
  text?: string | null;
  error?: string | null;
  is_error?: boolean;
  total_cost_usd?: number;
  last_event_id?: number;
  [key: string]: unknown;
}

interface SseEvent {
  id: string | null;
  data: Frame;
}

interface Health {
  status: string;
  version: string;
  storage_type: string;
}

interface Session {
  session_id: string;
  status: string;
}

interface HistoryMessage {
  kind: string;
  content: { result?: string };
}

interface History {
  messages: HistoryMessage[];
  next_after?: string | null;
}

interface ChatAnswer {
  text: string;
  is_error?: boolean;
}

interface RequestOptions {
  body?: unknown;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

const BASE_URL = (process.env.BASE_URL ?? 'http://127.0.0.1:8000').replace(/\/+$/, '');
const TOKEN = process.env.TOKEN ?? '';
const MESSAGE = process.env.MESSAGE ?? 'Say hello in one short sentence.';
const FOLLOW_UP = process.env.FOLLOW_UP ?? 'Now say goodbye in one short sentence.';
const DISCONNECT_AFTER = Number(process.env.DISCONNECT_AFTER ?? '2');
const KEEP_SESSION = process.env.KEEP_SESSION === '1';
/** Milliseconds a plain request, or a whole reconnected stream, may take. */
const REQUEST_TIMEOUT = 150_000;
/** Reconnects the EventSource may make on its own (after a `lagged` frame or a dropped connection). */
const MAX_RECONNECTS = 5;

class Failure extends Error {}

/** A request to the API; fails on a non-2xx status with the server's JSON error. */
async function api(method: string, path: string, options: RequestOptions = {}): Promise<Response> {
  const headers: Record<string, string> = { Authorization: `Bearer ${TOKEN}`, ...options.headers };
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

/** `api` with a JSON answer of type `T`. */
async function apiJson<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
  return (await (await api(method, path, options)).json()) as T;
}

/**
 * Parses a `text/event-stream` body as it arrives (the POST stream, which an
 * EventSource cannot open). Comments (keep-alives) are skipped.
 */
async function* sseEvents(response: Response): AsyncGenerator<SseEvent> {
  if (!response.body) throw new Failure('the stream has no body');
  const decoder = new TextDecoder();
  let buffer = '';
  let id: string | null = null;
  let data: string[] = [];
  for await (const chunk of response.body) {
    buffer += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, '');
      buffer = buffer.slice(newline + 1);
      if (line === '') {
        if (data.length > 0) yield { id, data: JSON.parse(data.join('\n')) as Frame };
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
  lastId: string | null = null;
  reply = '';
  result: Frame | null = null;
  terminal: 'done' | 'error' | null = null;
  deltas = 0;

  /** Records one event and prints it; true when it ends the turn. */
  handle(id: string | null, frame: Frame): boolean {
    if (id !== null && id !== '') this.lastId = id;
    switch (frame.type) {
      case 'text_delta':
        this.reply += frame.text ?? '';
        this.deltas += 1;
        console.log(`  frame ${id}: text_delta ${JSON.stringify(frame.text ?? '')}`);
        return false;
      case 'result':
        this.result = frame;
        console.log(`  frame ${id}: result (is_error ${frame.is_error}, cost $${frame.total_cost_usd})`);
        return false;
      case 'gap':
        console.log(`  gap: ${frame.error}`);
        return false;
      case 'lagged':
        // The server closes the stream; the EventSource reconnects with Last-Event-ID.
        console.log(`  lagged: reconnecting after ${frame.last_event_id}`);
        return false;
      case 'done':
      case 'error':
        this.terminal = frame.type;
        console.log(`  frame ${id}: ${frame.type}${frame.type === 'error' ? ` ${frame.error}` : ''}`);
        return true;
      default:
        console.log(`  frame ${id}: ${frame.type}`);
        return false;
    }
  }

  /**
   * Sends a message as a streamed turn with fetch and reads its frames until
   * the end or, if `stopAfterDeltas` > 0, until that many text frames
   * arrived; then closes the connection. Returns the frames read.
   */
  async post(sessionId: string, message: string, stopAfterDeltas: number): Promise<number> {
    const controller = new AbortController();
    const response = await api('POST', '/api/v1/chat/stream', {
      body: { session_id: sessionId, message, timeout: 120 },
      headers: { Accept: 'text/event-stream' },
      signal: controller.signal,
    });
    let count = 0;
    const start = this.deltas;
    try {
      for await (const event of sseEvents(response)) {
        count += 1;
        if (this.handle(event.id, event.data)) break;
        if (stopAfterDeltas > 0 && this.deltas - start >= stopAfterDeltas) break;
      }
    } finally {
      controller.abort(); // hang up (a no-op when the server already ended the stream)
    }
    return count;
  }

  /**
   * Follows the session's stream with an EventSource from `lastId` (the
   * `last_event_id` query parameter; on its own reconnects the EventSource
   * sends the `Last-Event-ID` header, which wins) until the turn's `done` or
   * `error`. `?follow=true` would keep it open across turns. Returns the
   * frames read.
   */
  follow(path: string): Promise<number> {
    const query = this.lastId === null ? '' : `?last_event_id=${encodeURIComponent(this.lastId)}`;
    const authorized = (url: string | URL, init: EventSourceFetchInit) =>
      fetch(url, { ...init, headers: { ...init.headers, Authorization: `Bearer ${TOKEN}` } });
    const source = new EventSource(`${BASE_URL}${path}${query}`, { fetch: authorized });
    return new Promise<number>((resolve, reject) => {
      let count = 0;
      let reconnects = 0;
      const finish = (error?: Failure) => {
        clearTimeout(timer);
        source.close();
        if (error) reject(error);
        else resolve(count);
      };
      const timer = setTimeout(
        () => finish(new Failure(`no end of the turn on ${path} within ${REQUEST_TIMEOUT} ms`)),
        REQUEST_TIMEOUT,
      );
      source.onmessage = (event: MessageEvent) => {
        count += 1;
        let frame: Frame;
        try {
          frame = JSON.parse(String(event.data)) as Frame;
        } catch {
          finish(new Failure(`a frame is not JSON: ${String(event.data)}`));
          return;
        }
        if (this.handle(event.lastEventId, frame)) finish();
      };
      source.onerror = (event) => {
        const why = `${event.message ?? 'connection error'}${event.code === undefined ? '' : ` (HTTP ${event.code})`}`;
        if (source.readyState === EventSource.CLOSED) {
          finish(new Failure(`GET ${path}: ${why}`));
        } else if (++reconnects > MAX_RECONNECTS) {
          finish(new Failure(`GET ${path}: ${why}; gave up after ${MAX_RECONNECTS} reconnects`));
        } else {
          console.log(`  connection lost (${why}); the EventSource reconnects from ${this.lastId}`);
        }
      };
    });
  }
}

async function run(): Promise<void> {
  if (!TOKEN) throw new Failure('set TOKEN to a user API token');

  // 1. Is the server up? (/health needs no token.)
  const healthResponse = await fetch(`${BASE_URL}/health`, { signal: AbortSignal.timeout(REQUEST_TIMEOUT) });
  if (!healthResponse.ok) throw new Failure(`GET /health answered ${healthResponse.status}`);
  const health = (await healthResponse.json()) as Health;
  console.log(`health: ${health.status} (version ${health.version}, storage ${health.storage_type})`);

  // 2. A session (in the user's directory; metadata is free-form).
  const session = await apiJson<Session>('POST', '/api/v1/sessions', { body: { metadata: { example: 'typescript' } } });
  const sessionId = session.session_id;
  if (typeof sessionId !== 'string') throw new Failure(`no session_id in ${JSON.stringify(session)}`);
  console.log(`session: created ${sessionId}`);

  // 3. A streamed turn with fetch; hang up after a few text frames.
  const turn = new Turn();
  console.log('stream: POST /api/v1/chat/stream');
  let count = await turn.post(sessionId, MESSAGE, DISCONNECT_AFTER);
  if (count === 0) throw new Failure('the stream sent no frame');
  if (turn.terminal === null) {
    console.log(`stream: ${count} frames, last id ${turn.lastId}; disconnected on purpose`);
  } else {
    console.log(`stream: ${count} frames, the turn ended (${turn.terminal}) before the planned disconnect`);
  }

  // 4. Reconnect with an EventSource: the frames after lastId still buffered, then live ones until the end.
  const streamPath = `/api/v1/sessions/${sessionId}/stream`;
  console.log(`reconnect: EventSource GET ${streamPath} from event ${turn.lastId}`);
  count = await turn.follow(streamPath);
  console.log(`reconnect: ${count} more frames, turn ended with ${turn.terminal}`);
  if (turn.terminal !== 'done' || turn.result === null) throw new Failure('the turn did not end with a result and done');
  if (turn.reply !== turn.result.text) {
    throw new Failure(`streamed text ${JSON.stringify(turn.reply)} differs from the result ${JSON.stringify(turn.result.text)}`);
  }
  console.log(`reply: ${turn.reply}`);

  // 5. The stored history, oldest first (paginate with `after` = next_after).
  const history = await apiJson<History>('GET', `/api/v1/sessions/${sessionId}/messages`);
  const messages = history.messages;
  console.log(`history: ${messages.length} messages (${messages.map((m) => m.kind).join(', ')})`);
  if (messages.at(-1)?.content.result !== turn.reply) throw new Failure("the history's last result is not the reply");

  // 6. Resume (reopens an expired session; a no-op for an open one) and go on.
  const resumed = await apiJson<Session>('POST', `/api/v1/sessions/${sessionId}/resume`);
  console.log(`resume: status ${resumed.status}`);
  const answer = await apiJson<ChatAnswer>('POST', '/api/v1/chat', {
    body: { session_id: sessionId, message: FOLLOW_UP, timeout: 120 },
  });
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

run().catch((error: unknown) => {
  console.error(`error: ${error instanceof Error ? error.message : String(error)}`);
  if (!(error instanceof Failure) && error instanceof Error && error.cause) console.error(`  cause: ${String(error.cause)}`);
  process.exitCode = 1;
});
