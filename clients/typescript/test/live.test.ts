// The client against a live `kassa serve`: started by tests/test_typescript_client.py, which passes its URL
// and keys (KASSA_URL, KASSA_PUBLISHABLE_KEY, KASSA_SECRET_KEY). Without them these tests fail, saying so.
import assert from 'node:assert/strict';
import http from 'node:http';
import type {AddressInfo} from 'node:net';
import {test} from 'node:test';

import {KassaClient, ProblemError} from '../src/index.js';

const url = process.env.KASSA_URL;
const publishable = process.env.KASSA_PUBLISHABLE_KEY;
const secret = process.env.KASSA_SECRET_KEY;
if (!url || !publishable || !secret) {
  throw new Error('set KASSA_URL, KASSA_PUBLISHABLE_KEY and KASSA_SECRET_KEY to a running Kassa ' +
                  '(`pytest tests/test_typescript_client.py` starts one and runs these tests)');
}

const order = {id: 'ts-1001', currency: 'USD', total: 80, ship_country: 'US',
               items: [{sku: 'SKU-0', category: 'electronics', qty: 1, price: 80}]};
const kassa = new KassaClient({baseUrl: url, key: publishable, timeoutMs: 5000});

test('a decision comes back typed, and repeating its request_id returns the same decision', async () => {
  const request = {placement: 'order_confirmation', request_id: `ts-${Date.now()}`, customer: {id: 'c-ts'}, order,
                   context: {device: 'mobile', locale: 'en-US'}};
  const first = await kassa.decide(request);
  assert.equal(first.placement, 'order_confirmation');
  assert.ok(first.offers.length > 0);
  assert.equal(first.offers[0].rank, 1);
  const again = await kassa.decide(request);
  assert.equal(again.decision_id, first.decision_id);
});

test('a Dutch order in euros gets Dutch text, a euro price and the sponsored label', async () => {
  const decision = await kassa.decide({placement: 'localised', order: {...order, currency: 'EUR', ship_country: 'NL'},
                                       context: {locale: 'nl-NL'}});
  const content = decision.offers[0].content;
  assert.equal(content.cta, 'Toevoegen voor €\u00a023,99');
  assert.equal(content.currency, 'EUR');
  assert.equal(content.disclosure, 'Gesponsord');
});

test('events for a real decision are accepted, once', async () => {
  const decision = await kassa.decide({placement: 'order_confirmation', customer: {id: 'c-ts'}, order});
  const events = [{event_id: `ts-imp-${decision.decision_id}`, type: 'impression' as const,
                   decision_id: decision.decision_id, offer_id: decision.offers[0].offer_id}];
  const ack = await kassa.sendEvents(events);
  assert.equal(ack.accepted, 1);
  assert.equal(ack.duplicates, 0);
  const repeat = await kassa.sendEvents(events);
  assert.equal(repeat.duplicates, 1);
  const backend = new KassaClient({baseUrl: url, key: secret});
  const logged = await backend.getDecision(decision.decision_id);
  assert.equal(logged.decision_id, decision.decision_id);
});

test('problem answers from the server throw ProblemError naming the field', async () => {
  await assert.rejects(kassa.decide({placement: 'no-such-placement', order}), (e: unknown) =>
    e instanceof ProblemError && e.status === 404 && e.field === 'placement' && e.type.endsWith('/not-found'));
  await assert.rejects(kassa.decide({placement: 'order_confirmation', limit: 0}), (e: unknown) =>
    e instanceof ProblemError && e.status === 422 && e.field === 'limit');
  const stranger = new KassaClient({baseUrl: url, key: 'not-a-key'});
  await assert.rejects(stranger.decide({placement: 'order_confirmation'}), (e: unknown) =>
    e instanceof ProblemError && e.status === 401 && e.field === 'Authorization');
});

test('a retry after a lost answer returns the decision the server already made', async () => {
  // A proxy in front of the live server that forwards the first attempt, then drops its answer.
  let attempts = 0;
  const requestIds: string[] = [];
  const served: string[] = [];
  const proxy = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', async () => {
      attempts++;
      const body = Buffer.concat(chunks).toString();
      requestIds.push(JSON.parse(body).request_id);
      const upstream = await fetch(url + (req.url ?? ''), {method: req.method, body,
        headers: {authorization: String(req.headers.authorization), 'content-type': 'application/json'}});
      const text = await upstream.text();
      served.push(JSON.parse(text).decision_id);
      if (attempts === 1) {
        res.socket?.destroy(); // the answer is lost after the server made the decision
        return;
      }
      res.writeHead(upstream.status, {'content-type': 'application/json'}).end(text);
    });
  });
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  try {
    const port = (proxy.address() as AddressInfo).port;
    const viaProxy = new KassaClient({baseUrl: `http://127.0.0.1:${port}`, key: publishable,
                                      retry: {attempts: 3, backoffMs: 1, maxBackoffMs: 5}});
    const decision = await viaProxy.decide({placement: 'order_confirmation', customer: {id: 'c-lost'}, order});
    assert.equal(attempts, 2);
    assert.equal(requestIds[0], requestIds[1]);
    assert.equal(decision.decision_id, served[0]);
  } finally {
    proxy.closeAllConnections();
    await new Promise<void>((resolve) => proxy.close(() => resolve()));
  }
});
