"""`RewardJoiner`: match outcome events to the decisions they answer, inside each placement's wait.

A decision is registered when it is served (with the exact learner lines and slot probabilities). Outcome
events carrying its ``decision_id`` add reward to the offer they name, weighted by the placement's reward
definition; an ``order`` event for the same customer that buys a shown product counts as a conversion
of that offer. A ``refund`` event naming that order (all of it, or some of its lines) takes the conversion
back while the decision is still open: the order's contribution is removed, or for a ``value`` reward reduced
by the refunded amount. When the wait time ends the decision is closed: every shown offer gets its summed
reward, or the default if nothing happened, and the joined examples go to the learner. Late events are
counted, and so are refunds that find no open conversion of their order (past the window, or an order that
converted nothing): the learner is not corrected after the fact.
A refund that finds no conversion is also held (`REFUND_HOLD_GRACE_SECONDS`): webhooks are not ordered, and a
platform may deliver a cancellation before its order. Until every decision open when it came has closed (plus
the grace), an order of that id has its conversion taken back as it is credited.
With a `JoinJournal` every registration, credit, close and held refund is also journaled (embedded
durability), and `restore` brings the pending decisions and held refunds back after a restart.
"""

from __future__ import annotations

import contextlib
import heapq
from collections import deque
from collections.abc import Callable, Iterable

from kassa import schemas
from kassa.events.join import (
    MAX_HELD_REFUNDS,
    REFUND_HOLD_GRACE_SECONDS,
    JoinedExample,
    JoinJournal,
    PendingDecision,
    order_buyer,
    order_totals,
    refund_conversion,
)


class RewardJoiner:
    def __init__(self, definition: Callable[[str], schemas.RewardDefinition | None],
                 journal: JoinJournal | None = None) -> None:
        self._definition = definition
        self.journal = journal
        self._pending: dict[str, PendingDecision] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._by_customer: dict[str, list[str]] = {}
        self._by_email: dict[str, list[str]] = {}  # decisions of buyers known only by e-mail SHA-256
        self._by_order: dict[str, list[str]] = {}  # open decisions an order converted, for its refunds
        # refunds that came before their order: order id -> [(held until, refund event)], and every held one in
        # the order it came (its "until" never decreases: the latest deadline and the clock only grow)
        self._held: dict[str, list[tuple[float, schemas.Event]]] = {}
        self._held_queue: deque[tuple[float, str, str]] = deque()  # (until, order id, event id)
        self._latest_deadline = 0.0
        self._now = 0.0  # the latest time `expire` was given: the joiner's clock
        self.matched_events = 0
        self.late_events = 0
        self.refunds_taken_back = 0  # refund events that changed an open decision's reward
        self.refunds_unmatched = 0  # refund events of an order with no open conversion (late, or unknown)
        self.refunds_taken_back_on_order = 0  # orders that came after their refund, taken back by the held refund
        self.closed = 0
        self.closed_with_outcome = 0

    def __len__(self) -> int:
        return len(self._pending)

    def join_lag(self, now: float) -> float:
        """Seconds the oldest decision whose wait has ended has been waiting to be closed (0 when none)."""
        return max(0.0, now - self._deadlines[0][0]) if self._deadlines else 0.0

    def is_open(self, decision_id: str) -> bool:
        """Whether ``decision_id`` is a decision still waiting for its reward here."""
        return decision_id in self._pending

    @property
    def held_refunds(self) -> int:
        """Refunds held for an order not seen yet."""
        return len(self._held_queue)

    def restore(self, pending: list[PendingDecision],
                held: Iterable[tuple[float, schemas.Event]] = ()) -> None:
        """Put back decisions that were pending, and refunds held (``(until, event)``, oldest first), when the
        process stopped (not journaled again)."""
        journal, self.journal = self.journal, None
        try:
            for p in pending:
                self.register(p)
            for until, event in held:
                self._hold(event, until)
        finally:
            self.journal = journal

    def register(self, pending: PendingDecision) -> None:
        if self.journal is not None:
            self.journal.registered(pending)
        self._pending[pending.decision_id] = pending
        heapq.heappush(self._deadlines, (pending.deadline, pending.decision_id))
        self._latest_deadline = max(self._latest_deadline, pending.deadline)
        if pending.customer_id is not None:
            self._by_customer.setdefault(pending.customer_id, []).append(pending.decision_id)
        elif pending.email_sha256 is not None:
            self._by_email.setdefault(pending.email_sha256, []).append(pending.decision_id)
        for order_id in pending.conversions or ():
            self._by_order.setdefault(order_id, []).append(pending.decision_id)

    def _credit(self, pending: PendingDecision, offer_id: str, kind: str, value: float | None,
                order: tuple[str, int] | None = None) -> bool:
        """Add one outcome's weighted reward; ``order`` = (order id, quantity bought) for an order's
        conversion, kept per order so that its refund can take it back."""
        definition = self._definition(pending.placement)
        if definition is None or offer_id not in pending.offers:
            return False
        weight = definition.weights.get(kind)
        if weight is None:
            return False
        amount = (value or 0.0) if weight == "value" else float(weight)
        if order is not None:
            if pending.conversions is None:
                pending.conversions = {}
            by_offer = pending.conversions.get(order[0])
            if by_offer is None:
                by_offer = pending.conversions[order[0]] = {}
                self._by_order.setdefault(order[0], []).append(pending.decision_id)
            credit = by_offer.setdefault(offer_id, [0.0, 0.0, 0])
            credit[0] += amount
            credit[1] += value or 0.0
            credit[2] += order[1]
        else:
            if pending.rewards is None:
                pending.rewards = {}
            pending.rewards[offer_id] = pending.rewards.get(offer_id, 0.0) + amount
        pending.outcomes += 1
        if self.journal is not None:
            self.journal.credited(pending)
        return True

    def observe(self, event: schemas.Event) -> int:
        """Apply one outcome event; returns how many decisions it credited (a refund: whose reward it
        took back)."""
        if event.type == "refund" and event.order is not None:
            changed = self._take_back(event.order)
            if changed:
                self.refunds_taken_back += 1
            else:
                self.refunds_unmatched += 1
                # Its order may not have come yet: held until every decision open now has closed.
                self._hold(event, max(self._now, self._latest_deadline) + REFUND_HOLD_GRACE_SECONDS)
            return changed
        credited = 0
        if event.decision_id is not None:
            pending = self._pending.get(event.decision_id)
            if pending is None:
                if event.type != "order":
                    self.late_events += 1
            elif event.offer_id is not None and self._credit(pending, event.offer_id, event.type, event.value):
                credited += 1
        if event.type == "order" and event.order is not None:
            credited += self._attribute_order(event)
            held = self._held.get(event.order.id)
            # its refund came first: what it credited is taken back at once (a whole order: all of it)
            if held and credited and sum([self._take_back(refund.order) for _, refund in held
                                          if refund.order is not None]):
                self.refunds_taken_back_on_order += 1
        self.matched_events += bool(credited)
        return credited

    def _hold(self, event: schemas.Event, until: float) -> None:
        assert event.order is not None
        self._held.setdefault(event.order.id, []).append((until, event))
        self._held_queue.append((until, event.order.id, event.event_id))
        if self.journal is not None:
            self.journal.held_refund(event, until)
        while len(self._held_queue) > MAX_HELD_REFUNDS:
            self._let_go()

    def _let_go(self) -> None:
        """Forget the oldest held refund (its time is up, or too many are held)."""
        _, order_id, event_id = self._held_queue.popleft()
        held = self._held.get(order_id)
        if held is not None:
            held[:] = [h for h in held if h[1].event_id != event_id]
            if not held:
                del self._held[order_id]
        if self.journal is not None:
            self.journal.released_refund(event_id)

    def _attribute_order(self, event: schemas.Event) -> int:
        order = event.order
        assert order is not None
        # A known customer matches by id first, then by e-mail; a guest by e-mail SHA-256 (`order_buyer`).
        customer, email = order_buyer(event)
        ids: list[str] = []
        if customer is not None:
            ids = self._by_customer.get(customer, [])
        if email is not None and email in self._by_email:
            ids = ids + self._by_email[email] if ids else self._by_email[email]
        if not ids:
            return 0
        bought, quantities = order_totals(order)
        # An order placed before the decision (the one that led to the confirmation page, whose webhook
        # often arrives late) is not its conversion. No upper bound: the decision is still open, so the
        # order came inside its window as far as Kassa's clock goes, whatever the platform's clock says.
        created = order.created_at
        credited = 0
        for decision_id in ids:
            pending = self._pending.get(decision_id)
            if pending is None:
                continue
            if created is not None and created < pending.ts:
                continue
            for offer_id, key in zip(pending.offers, pending.product_keys, strict=False):
                if key is not None and key in bought:
                    credited += self._credit(pending, offer_id, "conversion", bought[key],
                                             (order.id, quantities[key]))
        return credited

    def _take_back(self, refund: schemas.Order) -> int:
        """A refund of ``refund.id``: its listed lines, or the whole order when it lists none (a
        cancellation). Open decisions that order converted lose that part of the conversion."""
        ids = self._by_order.get(refund.id)
        changed = 0
        if ids:
            amounts, quantities = order_totals(refund)
            for decision_id in list(ids):
                pending = self._pending.get(decision_id)
                by_offer = (pending.conversions or {}).get(refund.id) if pending is not None else None
                if pending is None or by_offer is None:
                    continue
                definition = self._definition(pending.placement)
                by_value = definition is not None and definition.weights.get("conversion") == "value"
                keys = dict(zip(pending.offers, pending.product_keys, strict=False))
                touched = False
                for offer_id, credit in list(by_offer.items()):
                    key = keys.get(offer_id)
                    if refund.items and (key is None or key not in quantities):
                        continue  # this product was kept
                    left = refund_conversion(credit, (amounts[key], quantities[key]) if refund.items and key
                                             else None, by_value)
                    if left is None:
                        del by_offer[offer_id]
                        pending.outcomes -= 1
                    else:
                        credit[0] = left
                    # taken back even when a fixed weight stays (a unit kept): a later refund finds fewer units
                    touched = True
                if not by_offer:
                    del pending.conversions[refund.id]  # type: ignore[union-attr]
                    self._forget(self._by_order, refund.id, decision_id)
                if touched:
                    changed += 1
                    if self.journal is not None:
                        self.journal.credited(pending)
        return changed

    def expire(self, now: float, limit: int = 10_000) -> list[JoinedExample]:
        """Close decisions whose wait ended; return their per-slot examples. Held refunds whose time is up
        are let go."""
        self._now = max(self._now, now)
        while self._held_queue and self._held_queue[0][0] <= now:
            self._let_go()
        out: list[JoinedExample] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now and limit > 0:
            _, decision_id = heapq.heappop(heap)
            pending = self._pending.pop(decision_id, None)
            if pending is None:
                continue
            limit -= 1
            if self.journal is not None:
                self.journal.closed(decision_id)
            self._forget_customer(pending)
            definition = self._definition(pending.placement)
            default = definition.default if definition else 0.0
            cap = definition.cap if definition else None
            self.closed += 1
            rewards = self._summed(pending)
            if rewards:
                self.closed_with_outcome += 1
            for slot, offer_id in enumerate(pending.offers):
                reward = default
                if offer_id in rewards:
                    reward = rewards[offer_id]
                    if cap is not None:
                        reward = min(reward, cap)
                out.append(
                    JoinedExample(pending.placement, decision_id, pending.shared, pending.actions[slot],
                                  offer_id, reward, pending.probabilities[slot], slot, pending.version,
                                  pending.candidates if slot == 0 else None, pending.top_index)
                )
        return out

    @staticmethod
    def _summed(pending: PendingDecision) -> dict[str, float]:
        """Each offer's reward: its outcome events' plus what the orders it converted (less their refunds)
        credited. An offer absent here had no outcome left and gets the placement's default."""
        if not pending.conversions:
            return pending.rewards or {}
        rewards = dict(pending.rewards or {})
        for by_offer in pending.conversions.values():
            for offer_id, credit in by_offer.items():
                rewards[offer_id] = rewards.get(offer_id, 0.0) + credit[0]
        return rewards

    def _forget_customer(self, pending: PendingDecision) -> None:
        for order_id in pending.conversions or ():
            self._forget(self._by_order, order_id, pending.decision_id)
        if pending.customer_id is not None:
            self._forget(self._by_customer, pending.customer_id, pending.decision_id)
        elif pending.email_sha256 is not None:
            self._forget(self._by_email, pending.email_sha256, pending.decision_id)

    @staticmethod
    def _forget(index: dict[str, list[str]], key: str, decision_id: str) -> None:
        ids = index.get(key)
        if ids is not None:
            with contextlib.suppress(ValueError):
                ids.remove(decision_id)
            if not ids:
                del index[key]
