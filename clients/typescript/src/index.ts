/**
 * A typed client for Kassa's decision API, for server-side JavaScript (Node 18+, or any runtime with
 * `fetch` and `AbortController`: a checkout extension's backend, an edge function). No dependencies.
 *
 * - Requests and responses are typed after Kassa's wire types (`kassa/schemas.py`).
 * - Every attempt has a timeout (`timeoutMs`, enforced with an AbortController); a call as a whole
 *   has an optional `deadlineMs`, retries included.
 * - Connection failures, timeouts and 429/502/503/504 answers are retried with exponential backoff and
 *   full jitter (`Retry-After` honoured, capped). A decision gets a `request_id` (generated when none
 *   is given) that is sent unchanged on every attempt, so a retry after a lost answer returns the
 *   decision already made instead of making a second one; events are deduplicated by `event_id`.
 * - Error answers (`application/problem+json`) are thrown as `ProblemError` with `type`, `title`,
 *   `status`, `detail` and the failing `field`; a call that never got an answer throws
 *   `TransportError` (`TimeoutError` when it timed out).
 *
 *     const kassa = new KassaClient({baseUrl: 'http://127.0.0.1:8000', key: 'demo-publishable', timeoutMs: 300});
 *     const decision = await kassa.decide({placement: 'order_confirmation', order: {id: '1001', total: 59.99}});
 */

// ------------------------------------------------------------------------------------------ wire types
export type FeatureValue = number | string | boolean | null;
export type OfferKind = 'product' | 'partner' | 'subscription' | 'warranty' | 'discount';
export type EventType = 'impression' | 'click' | 'accept' | 'dismiss' | 'conversion' | 'order' | 'refund';

export interface Customer {
  id?: string;
  email_sha256?: string;
}

export interface OrderItem {
  sku: string;
  product_id?: string;
  category?: string;
  qty?: number;
  price?: number;
}

export interface Order {
  id: string;
  platform?: string;
  currency?: string;
  total?: number;
  ship_country?: string;
  items?: OrderItem[];
  created_at?: number;
  customer_id?: string;
}

export interface Context {
  device?: string;
  locale?: string;
  timezone?: string;
  referrer?: string;
  [extra: string]: unknown;
}

export interface DecisionRequest {
  placement: string;
  request_id?: string;
  customer?: Customer;
  session_id?: string;
  order?: Order;
  context?: Context;
  candidates?: string[];
  limit?: number;
}

/** What the page renders of an offer, localised by Kassa (`price_display`, `disclosure` when set). */
export interface OfferContent {
  headline?: string;
  cta?: string;
  price?: number;
  currency?: string;
  price_display?: string;
  disclosure?: string;
  [field: string]: unknown;
}

export interface OfferOut {
  offer_id: string;
  rank: number;
  score: number;
  probability: number;
  content: OfferContent;
}

export interface DecisionResponse {
  decision_id: string;
  placement: string;
  model_version: string;
  offers: OfferOut[];
  explored: boolean;
  fallback: boolean;
  took_ms: number;
}

export interface Event {
  event_id: string;
  type: EventType;
  decision_id?: string;
  offer_id?: string;
  value?: number;
  timestamp?: number;
  customer?: Customer;
  order?: Order;
}

export interface EventAck {
  accepted: number;
  duplicates: number;
  [extra: string]: unknown;
}

export interface FeatureRow {
  key: string;
  values: Record<string, unknown>;
  timestamp?: number;
}

export interface FeatureAck {
  view: string;
  written: number;
}

export interface Offer {
  id: string;
  kind: OfferKind;
  title: string;
  content?: Record<string, unknown>;
  content_by_locale?: Record<string, Record<string, unknown>>;
  prices?: Record<string, number>;
  disclosure?: string;
  value?: number;
  sku?: string;
  product_id?: string;
  category?: string;
  stock?: number;
  features?: Record<string, FeatureValue>;
  eligibility?: Record<string, unknown>;
  active?: boolean;
}

/** RFC 9457 problem details, as Kassa sends them. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  field?: string;
  instance?: string;
}

// ------------------------------------------------------------------------------------------ errors
/** An error answer: what was wrong and, when Kassa knows it, the failing field. */
export class ProblemError extends Error implements Problem {
  readonly type: string;
  readonly title: string;
  readonly status: number;
  readonly detail: string;
  readonly field?: string;
  readonly instance?: string;

  constructor(problem: Problem) {
    super(`${problem.status} ${problem.title}: ${problem.detail}${problem.field ? ` (field ${problem.field})` : ''}`);
    this.name = 'ProblemError';
    this.type = problem.type;
    this.title = problem.title;
    this.status = problem.status;
    this.detail = problem.detail;
    if (problem.field !== undefined && problem.field !== null) this.field = problem.field;
    if (problem.instance !== undefined && problem.instance !== null) this.instance = problem.instance;
  }
}

/** The call got no answer (refused, reset, DNS, ...) after every attempt. */
export class TransportError extends Error {
  readonly attempts: number;

  constructor(message: string, attempts: number, options?: {cause?: unknown}) {
    super(message, options);
    this.name = 'TransportError';
    this.attempts = attempts;
  }
}

/** No answer within the attempt's timeout or the call's deadline. */
export class TimeoutError extends TransportError {
  constructor(message: string, attempts: number, options?: {cause?: unknown}) {
    super(message, attempts, options);
    this.name = 'TimeoutError';
  }
}

// ------------------------------------------------------------------------------------------ client
export interface RetryOptions {
  /** Attempts in all (1: no retry). Default 3. */
  attempts: number;
  /** First backoff in ms, doubled per attempt, full jitter. Default 50. */
  backoffMs: number;
  /** Cap of one backoff (and of a `Retry-After`) in ms. Default 1000. */
  maxBackoffMs: number;
}

export interface ClientOptions {
  baseUrl: string;
  /** `Authorization: Bearer <key>`: publishable, secret or admin, as the call needs. */
  key?: string;
  /** Timeout of one attempt in ms. Default 2000. */
  timeoutMs?: number;
  /** Bound of a whole call in ms, retries included. Default: attempts x (timeout + max backoff). */
  deadlineMs?: number;
  retry?: Partial<RetryOptions>;
  /** The fetch to use (default: the global one); tests and custom agents pass their own. */
  fetch?: typeof fetch;
  headers?: Record<string, string>;
}

export const RETRY_STATUSES: ReadonlySet<number> = new Set([429, 502, 503, 504]);
const DEFAULT_RETRY: RetryOptions = {attempts: 3, backoffMs: 50, maxBackoffMs: 1000};

/** A fresh idempotency key for a decision (sent unchanged on every retry of that decision). */
export function newRequestId(): string {
  const c = (globalThis as {crypto?: {randomUUID?: () => string}}).crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID().replace(/-/g, '');
  let id = '';
  for (let i = 0; i < 32; i++) id += Math.floor(Math.random() * 16).toString(16);
  return id;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
const seg = (value: string) => encodeURIComponent(value);

export class KassaClient {
  readonly baseUrl: string;
  readonly timeoutMs: number;
  readonly deadlineMs: number | undefined;
  readonly retry: RetryOptions;
  private readonly fetchImpl: typeof fetch;
  private readonly headers: Record<string, string>;

  constructor(options: ClientOptions) {
    this.baseUrl = options.baseUrl.replace(/\/+$/, '');
    this.timeoutMs = options.timeoutMs ?? 2000;
    this.deadlineMs = options.deadlineMs;
    this.retry = {...DEFAULT_RETRY, ...options.retry};
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== 'function') throw new Error('no fetch in this runtime: pass options.fetch');
    this.fetchImpl = f;
    this.headers = {accept: 'application/json', ...options.headers};
    if (options.key) this.headers.authorization = `Bearer ${options.key}`;
  }

  /** `POST /v1/decisions`; a missing `request_id` is generated, so retries return the same decision. */
  decide(request: DecisionRequest): Promise<DecisionResponse> {
    const body = {...request, request_id: request.request_id || newRequestId()};
    return this.request<DecisionResponse>('POST', '/v1/decisions', body);
  }

  /** `POST /v1/events` (up to 1,000; a repeated `event_id` is counted once). */
  sendEvents(events: Event[]): Promise<EventAck> {
    return this.request<EventAck>('POST', '/v1/events', {events});
  }

  putFeature(view: string, entityKey: string, values: Record<string, unknown>, timestamp?: number): Promise<FeatureAck> {
    const body = timestamp === undefined ? {values} : {values, timestamp};
    return this.request<FeatureAck>('PUT', `/v1/features/${seg(view)}/${seg(entityKey)}`, body);
  }

  pushFeatures(view: string, rows: FeatureRow[]): Promise<FeatureAck> {
    return this.request<FeatureAck>('POST', '/v1/features/push', {view, rows});
  }

  getFeature(view: string, entityKey: string): Promise<Record<string, unknown>> {
    return this.request('GET', `/v1/features/${seg(view)}/${seg(entityKey)}`);
  }

  /** A served decision as logged (secret or admin key). */
  getDecision(decisionId: string): Promise<Record<string, unknown>> {
    return this.request('GET', `/v1/decisions/${seg(decisionId)}`);
  }

  async listOffers(): Promise<Offer[]> {
    return (await this.request<{offers: Offer[]}>('GET', '/v1/offers')).offers;
  }

  getOffer(offerId: string): Promise<Offer> {
    return this.request<Offer>('GET', `/v1/offers/${seg(offerId)}`);
  }

  putOffer(offer: Offer): Promise<Offer> {
    return this.request<Offer>('PUT', `/v1/offers/${seg(offer.id)}`, offer);
  }

  async deleteOffer(offerId: string): Promise<void> {
    await this.request<void>('DELETE', `/v1/offers/${seg(offerId)}`);
  }

  /** Whether the server is ready to decide (`GET /readyz`). */
  async ready(): Promise<boolean> {
    try {
      await this.request('GET', '/readyz');
      return true;
    } catch (e) {
      if (e instanceof ProblemError || e instanceof TransportError) return false;
      throw e;
    }
  }

  /** Send one call, retrying what may be retried within the deadline; the decoded answer or an error. */
  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const payload = body === undefined ? undefined : JSON.stringify(body); // the same bytes on every attempt
    const headers: Record<string, string> = {...this.headers};
    if (payload !== undefined) headers['content-type'] = 'application/json';
    const budget = this.deadlineMs ?? this.retry.attempts * (this.timeoutMs + this.retry.maxBackoffMs);
    const end = Date.now() + budget;
    for (let attempt = 1; ; attempt++) {
      const remaining = end - Date.now();
      const controller = new AbortController();
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        controller.abort();
      }, Math.max(1, Math.min(this.timeoutMs, remaining)));
      let response: Response;
      try {
        const init: RequestInit = {method, headers, signal: controller.signal};
        if (payload !== undefined) init.body = payload;
        response = await this.fetchImpl(this.baseUrl + path, init);
        if (RETRY_STATUSES.has(response.status) && attempt < this.retry.attempts) {
          const pause = this.backoff(attempt, response.headers.get('retry-after'));
          if (Date.now() + pause < end) {
            await response.body?.cancel().catch(() => undefined);
            clearTimeout(timer);
            await sleep(pause);
            continue;
          }
        }
        const text = await response.text(); // still under the attempt's timeout
        clearTimeout(timer);
        return decode<T>(response, text);
      } catch (e) {
        clearTimeout(timer);
        if (e instanceof ProblemError) throw e;
        const pause = this.backoff(attempt, null);
        if (attempt >= this.retry.attempts || Date.now() + pause >= end) {
          const what = `${method} ${path} failed after ${attempt} attempt${attempt > 1 ? 's' : ''}`;
          if (timedOut) throw new TimeoutError(`${what}: timed out`, attempt, {cause: e});
          throw new TransportError(`${what}: ${e instanceof Error ? e.message : String(e)}`, attempt, {cause: e});
        }
        await sleep(pause);
      }
    }
  }

  private backoff(attempt: number, retryAfter: string | null): number {
    if (retryAfter !== null && retryAfter.trim() !== '' && !Number.isNaN(Number(retryAfter))) {
      return Math.min(Number(retryAfter) * 1000, this.retry.maxBackoffMs);
    }
    return Math.random() * Math.min(this.retry.maxBackoffMs, this.retry.backoffMs * 2 ** (attempt - 1));
  }
}

function decode<T>(response: Response, text: string): T {
  if (response.status >= 400) {
    let problem: Partial<Problem> | undefined;
    try {
      problem = JSON.parse(text) as Partial<Problem>;
    } catch {
      problem = undefined;
    }
    if (problem && typeof problem.title === 'string' && typeof problem.detail === 'string') {
      throw new ProblemError({...problem, status: problem.status ?? response.status} as Problem);
    }
    // not a problem document (a proxy's error page): keep what there is
    throw new ProblemError({type: 'about:blank', title: response.statusText || 'Error', status: response.status,
                            detail: text.slice(0, 200).trim()});
  }
  if (!text) return undefined as T;
  return JSON.parse(text) as T;
}
