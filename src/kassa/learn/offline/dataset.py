"""Logged bandit data for training and evaluation: decisions from the decision log, joined with their
rewards from the event log exactly the way the online joiner joins them.

`load_logged` reads one placement's decisions in ``[since, until)`` (Parquet via DuckDB), then replays
them and the events of the same period, in time order, through a fresh `RewardJoiner` with the
placement's reward definition: outcome events credit the offer they name, order events attribute
conversions of shown products, and each decision closes when its wait ends. Decisions whose wait had
not ended when the data ends are left out (their reward is not known yet), so training and evaluation
never count a pending decision as a zero.

Each row keeps what off-policy evaluation needs: the feature vector the policy scored, every candidate
with the logging policy's probability, the offers shown with each slot's probability, and the reward of
each shown offer. Known gap: offer-entity feature-view tokens (namespace ``g``) are not in the log, so
learner lines rebuilt from it carry the offers' catalog features only.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from kassa import schemas
from kassa.events.decision_log import read_decisions
from kassa.events.join import PendingDecision
from kassa.features.featurize import shared_line
from kassa.learn.online.rewards import RewardJoiner


@dataclass(slots=True)
class LoggedDecisions:
    placement: str
    decision_ids: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    model_versions: list[str] = field(default_factory=list)
    customer_ids: list[str | None] = field(default_factory=list)
    features: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[list[str]] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)  # logging policy, first slot, per candidate
    chosen: list[list[str]] = field(default_factory=list)
    chosen_probabilities: list[list[float]] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)  # per shown offer, slot order
    fallback: list[bool] = field(default_factory=list)
    # per candidate, its retrieval signals suffix (`kassa.decide.retrieval.signals`), or None when none were logged
    signals: list[list[str] | None] = field(default_factory=list)
    # per candidate, its offer feature views' suffix (`kassa.features.offer_features`), or None when none were logged
    offer_features: list[list[str] | None] = field(default_factory=list)
    pending: int = 0  # decisions left out because their reward window had not closed
    events_replayed: int = 0

    def __len__(self) -> int:
        return len(self.decision_ids)

    def _logged(self, i: int) -> tuple[list[str] | None, list[str] | None]:
        return (self.offer_features[i] if i < len(self.offer_features) else None,
                self.signals[i] if i < len(self.signals) else None)

    def action_suffix(self, i: int, offer_id: str) -> str:
        """What row ``i``'s decision appended to ``offer_id``'s catalog line: its offer feature views' namespace,
        then its retrieval signals, as logged ("" for what was not logged), so the line is the one it scored."""
        views, sig = self._logged(i)
        if not sig and not views:
            return ""
        try:
            k = self.candidates[i].index(offer_id)
        except ValueError:
            return ""
        return (views[k] if views else "") + (sig[k] if sig else "")

    def action_suffixes(self, i: int) -> list[str] | None:
        """`action_suffix` of each of row ``i``'s logged candidates, in their order (None when nothing was
        logged): one pass for a whole row instead of a search per candidate."""
        views, sig = self._logged(i)
        if views and sig:
            return [v + r for v, r in zip(views, sig, strict=True)]
        return views or sig or None

    def top_slot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(reward, logged probability, number of candidates) of every row's first slot."""
        reward = np.fromiter((r[0] for r in self.rewards), dtype=np.float64, count=len(self))
        prob = np.fromiter((p[0] for p in self.chosen_probabilities), dtype=np.float64, count=len(self))
        n = np.fromiter((len(c) for c in self.candidates), dtype=np.int64, count=len(self))
        return reward, prob, n

    def split(self, holdout: float) -> tuple[LoggedDecisions, LoggedDecisions]:
        """Time split: the first ``1 - holdout`` of rows and the last ``holdout``."""
        cut = round(len(self) * (1.0 - holdout))
        return self._slice(0, cut), self._slice(cut, len(self))

    def _slice(self, a: int, b: int) -> LoggedDecisions:
        out = LoggedDecisions(self.placement)
        for name in ("decision_ids", "ts", "model_versions", "customer_ids", "features", "candidates",
                     "probabilities", "chosen", "chosen_probabilities", "rewards", "fallback", "signals",
                     "offer_features"):
            setattr(out, name, getattr(self, name)[a:b])
        return out


def _restored(features: dict[str, Any]) -> dict[str, Any]:
    """The log stores list features (categories) joined with ``|``; split back so the tokens equal the ones
    the live decision used."""
    return {k: (v.split("|") if isinstance(v, str) and "|" in v else v) for k, v in features.items()}


def logged_shared_line(features: dict[str, Any]) -> str:
    """The shared line the live decision used (`kassa.features.featurize.shared_line`), from its logged features."""
    return shared_line(_restored(features))


def _events(path: Path, since: float, until: float) -> Iterator[tuple[float, schemas.Event]]:
    if not path.exists():
        return
    decoder = msgspec.json.Decoder(schemas.Event)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cur = conn.execute("SELECT body FROM events WHERE received_at >= ? AND received_at < ? ORDER BY seq",
                           (since, until))
        while True:
            rows = cur.fetchmany(5000)
            if not rows:
                break
            for (body,) in rows:
                ev = decoder.decode(body)
                yield (ev.timestamp or 0.0), ev
    finally:
        conn.close()


def load_logged(
    data_dir: Path,
    placement: schemas.Placement,
    product_key: Callable[[str], str | None],
    since: float | None = None,
    until: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoggedDecisions:
    """One placement's logged decisions in ``[since, until)`` with their joined rewards.

    ``product_key(offer_id)`` gives the product id/sku an offer sells (for order attribution)."""
    table = read_decisions(Path(data_dir), placement.id, since, until)
    out = LoggedDecisions(placement.id)
    n = table.num_rows
    if n == 0:
        return out
    cols = {name: table.column(name).to_pylist() for name in (
        "decision_id", "ts", "model_version", "customer_id", "features_json", "candidates", "probabilities",
        "chosen", "chosen_probabilities", "fallback", "candidate_signals", "candidate_offer_features")}
    wait = placement.reward.wait_seconds
    first_ts, last_ts = cols["ts"][0], cols["ts"][-1]
    events = list(_events(Path(data_dir) / "events.db", first_ts - 1.0, last_ts + wait + 3600.0))
    events.sort(key=lambda te: te[0])
    # The data ends where the window ends (or now): a decision whose wait is over by then and got no
    # event got none. Never before the last thing observed.
    data_end = max([last_ts, until if until is not None else time.time()] + [t for t, _ in events[-1:]])
    joiner = RewardJoiner(lambda _p: placement.reward)
    rewards: dict[str, list[float]] = {}
    keys_cache: dict[str, str | None] = {}
    # Most decisions get no outcome at all: only those an event names, or whose buyer placed an order,
    # go through the joiner; the rest close with the default reward once their wait has ended.
    named = {ev.decision_id for _, ev in events if ev.decision_id is not None}
    buyers = {(ev.customer.id if ev.customer else None) or (ev.order.customer_id if ev.order else None)
              for _, ev in events if ev.type == "order"}
    buyers.discard(None)
    default = placement.reward.default

    def close(now: float) -> None:
        for ex in joiner.expire(now, 1 << 30):
            rewards.setdefault(ex.decision_id, []).append(ex.reward)

    ei = 0
    n_events = len(events)
    for i in range(n):
        ts = cols["ts"][i]
        # An event stamped at the same instant as the decision came after it (a beacon cannot precede
        # the decision it answers), so only strictly earlier events are applied first.
        while ei < n_events and events[ei][0] < ts:
            close(events[ei][0])
            joiner.observe(events[ei][1])
            ei += 1
        close(ts)
        chosen = cols["chosen"][i] or []
        if not chosen:
            continue
        did = cols["decision_id"][i]
        if did not in named and cols["customer_id"][i] not in buyers:
            if ts + wait <= data_end:
                rewards[did] = [default] * len(chosen)
            continue
        keys = []
        for o in chosen:
            if o not in keys_cache:
                keys_cache[o] = product_key(o)
            keys.append(keys_cache[o])
        joiner.register(PendingDecision(cols["decision_id"][i], placement.id, ts, ts + wait, "", list(chosen),
                                        list(chosen), list(cols["chosen_probabilities"][i]),
                                        cols["customer_id"][i], keys))
        if progress is not None and i % 5000 == 0:
            progress(i, n)
    while ei < n_events:
        close(events[ei][0])
        joiner.observe(events[ei][1])
        ei += 1
    close(data_end)
    out.events_replayed = n_events
    decode = msgspec.json.Decoder(dict[str, Any]).decode
    for i in range(n):
        did = cols["decision_id"][i]
        r = rewards.get(did)
        chosen = cols["chosen"][i] or []
        if not chosen:
            continue
        if r is None or len(r) != len(chosen):
            out.pending += 1
            continue
        probs = cols["chosen_probabilities"][i]
        if not probs or any(not (p > 0.0) or math.isnan(p) for p in probs):
            out.pending += 1
            continue
        out.decision_ids.append(did)
        out.ts.append(cols["ts"][i])
        out.model_versions.append(cols["model_version"][i])
        out.customer_ids.append(cols["customer_id"][i])
        out.features.append(decode(cols["features_json"][i]))
        out.candidates.append(cols["candidates"][i])
        out.probabilities.append(cols["probabilities"][i])
        out.chosen.append(chosen)
        out.chosen_probabilities.append(probs)
        out.rewards.append(r)
        out.fallback.append(cols["fallback"][i])
        out.signals.append(cols["candidate_signals"][i])
        out.offer_features.append(cols["candidate_offer_features"][i])
    if progress is not None:
        progress(n, n)
    return out
