// Unit tests of the client's retry, timeout and error handling, with a fake fetch (no server needed).
import assert from 'node:assert/strict';
import {test} from 'node:test';

import {KassaClient, ProblemError, TimeoutError, TransportError} from '../src/index.js';

const FAST = {attempts: 3, backoffMs: 1, maxBackoffMs: 5};
const json = (status: number, body: unknown, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body), {status, headers: {'content-type': 'application/json', ...headers}});
const decision = {decision_id: 'd-1', placement: 'p', model_version: 'baseline', offers: [], explored: false,
                  fallback: false, took_ms: 0.5};

function recording(answers: Array<() => Response | Promise<Response>>) {
  const bodies: Array<Record<string, unknown>> = [];
  const fetchImpl = (async (_url: string | URL | Request, init?: RequestInit) => {
    bodies.push(JSON.parse(String(init?.body ?? '{}')));
    const next = answers[Math.min(bodies.length, answers.length) - 1];
    return next();
  }) as typeof fetch;
  return {bodies, fetchImpl};
}

test('a decision gets a request_id that every retry sends unchanged', async () => {
  const {bodies, fetchImpl} = recording([
    () => json(503, {type: 't', title: 'Unavailable', status: 503, detail: 'busy'}, {'retry-after': '0'}),
    () => { throw new TypeError('fetch failed'); },
    () => json(200, decision),
  ]);
  const kassa = new KassaClient({baseUrl: 'http://kassa.test', key: 'k', retry: FAST, fetch: fetchImpl});
  const got = await kassa.decide({placement: 'p'});
  assert.equal(got.decision_id, 'd-1');
  assert.equal(bodies.length, 3);
  assert.match(String(bodies[0].request_id), /^[0-9a-f]{32}$/);
  assert.deepEqual(new Set(bodies.map((b) => b.request_id)).size, 1);
});

test('a request_id given by the caller is kept', async () => {
  const {bodies, fetchImpl} = recording([() => json(502, {}), () => json(200, decision)]);
  const kassa = new KassaClient({baseUrl: 'http://kassa.test', retry: FAST, fetch: fetchImpl});
  await kassa.decide({placement: 'p', request_id: 'checkout-9'});
  assert.deepEqual(bodies.map((b) => b.request_id), ['checkout-9', 'checkout-9']);
});

test('problem answers throw ProblemError with type, title, status, detail and field; no retry', async () => {
  const {bodies, fetchImpl} = recording([() => json(422, {
    type: 'https://kassa.dev/problems/invalid', title: 'Invalid field', status: 422,
    detail: 'Expected `int` >= 1', field: 'limit'}, {'content-type': 'application/problem+json'})]);
  const kassa = new KassaClient({baseUrl: 'http://kassa.test', retry: FAST, fetch: fetchImpl});
  await assert.rejects(kassa.decide({placement: 'p', limit: 0}), (e: unknown) => {
    assert.ok(e instanceof ProblemError);
    assert.equal(e.status, 422);
    assert.equal(e.field, 'limit');
    assert.equal(e.title, 'Invalid field');
    assert.equal(e.type, 'https://kassa.dev/problems/invalid');
    assert.match(e.detail, /int/);
    return true;
  });
  assert.equal(bodies.length, 1);
});

test('an error page that is not a problem document still throws ProblemError with its status', async () => {
  const fetchImpl = (async () => new Response('<h1>Bad gateway</h1>', {status: 502, statusText: 'Bad Gateway'})) as
    typeof fetch;
  const kassa = new KassaClient({baseUrl: 'http://kassa.test', retry: {attempts: 1}, fetch: fetchImpl});
  await assert.rejects(kassa.sendEvents([]), (e: unknown) =>
    e instanceof ProblemError && e.status === 502 && e.detail === '<h1>Bad gateway</h1>');
});

test('an attempt that does not answer is aborted at its timeout, and the call fails as TimeoutError', async () => {
  let aborted = 0;
  const fetchImpl = ((_url: string | URL | Request, init?: RequestInit) => new Promise<Response>((_resolve, reject) => {
    init?.signal?.addEventListener('abort', () => {
      aborted++;
      reject(new DOMException('aborted', 'AbortError'));
    });
  })) as typeof fetch;
  const kassa = new KassaClient({baseUrl: 'http://kassa.test', timeoutMs: 30, retry: FAST, fetch: fetchImpl});
  const t0 = Date.now();
  await assert.rejects(kassa.decide({placement: 'p'}), (e: unknown) =>
    e instanceof TimeoutError && e.attempts === 3 && /timed out/.test(e.message));
  assert.equal(aborted, 3);
  assert.ok(Date.now() - t0 < 1000);
});

test('the deadline bounds a whole call, retries included', async () => {
  const fetchImpl = ((_url: string | URL | Request, init?: RequestInit) => new Promise<Response>((_r, reject) => {
    init?.signal?.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError')));
  })) as typeof fetch;
  const kassa = new KassaClient({baseUrl: 'http://kassa.test', timeoutMs: 5000, deadlineMs: 80,
                                 retry: {attempts: 5, backoffMs: 1, maxBackoffMs: 1}, fetch: fetchImpl});
  const t0 = Date.now();
  await assert.rejects(kassa.decide({placement: 'p'}), TimeoutError);
  assert.ok(Date.now() - t0 < 1000, `took ${Date.now() - t0} ms`);
});

test('a refused connection is a TransportError after the attempts, not a timeout', async () => {
  const kassa = new KassaClient({baseUrl: 'http://127.0.0.1:9', retry: {attempts: 2, backoffMs: 1, maxBackoffMs: 2}});
  await assert.rejects(kassa.decide({placement: 'p'}), (e: unknown) =>
    e instanceof TransportError && !(e instanceof TimeoutError) && e.attempts === 2);
});

test('keys travel as a bearer token and paths are escaped', async () => {
  const seen: Array<{url: string; auth: string | null}> = [];
  const fetchImpl = (async (url: string | URL | Request, init?: RequestInit) => {
    seen.push({url: String(url), auth: new Headers(init?.headers).get('authorization')});
    return json(200, {view: 'v', written: 1});
  }) as typeof fetch;
  const kassa = new KassaClient({baseUrl: 'http://kassa.test/', key: 'sk', fetch: fetchImpl});
  await kassa.putFeature('customer_signals', 'c 1?', {segment: 'gold'});
  assert.deepEqual(seen, [{url: 'http://kassa.test/v1/features/customer_signals/c%201%3F', auth: 'Bearer sk'}]);
});
