"""FeatureRegistry: plan (diff), apply, refusal of destructive changes, load."""

from __future__ import annotations

from pathlib import Path

import pytest

from kassa.db import make_engine
from kassa.features.definitions import DefinitionError, Entity, FeatureRepo, FeatureView, Field, Source
from kassa.features.registry import DestructiveChangeError, FeatureRegistry, Retype

CUSTOMER = Entity(name="customer", join_key="customer_id")
PRODUCT = Entity(name="product", join_key="product_id")


def view(name: str = "customer_stats", *fields: Field, **kw: object) -> FeatureView:
    fields = fields or (Field(name="orders", dtype="int", default=0), Field(name="spend", dtype="float"))
    base: dict[str, object] = dict(name=name, kind="batch", entity="customer", fields=list(fields),
                                   source=Source(path="stats.parquet"), ttl="30d")
    base.update(kw)
    return FeatureView(**base)  # type: ignore[arg-type]


def repo(*views: FeatureView, entities: tuple[Entity, ...] = (CUSTOMER,)) -> FeatureRepo:
    return FeatureRepo(entities=list(entities), views=list(views))


@pytest.fixture
def registry(tmp_path: Path) -> FeatureRegistry:
    return FeatureRegistry(make_engine(tmp_path / "kassa.db"), clock=lambda: 1_700_000_000.0)


def test_first_plan_adds_everything_and_apply_stores_it(registry: FeatureRegistry) -> None:
    r = repo(view(), view("other"))
    diff = registry.plan(r)
    assert diff.added_entities == ["customer"]
    assert diff.added_views == ["customer_stats", "other"]
    assert diff.has_changes and not diff.destructive
    registry.apply(r)
    assert registry.load() == r


def test_reapplying_the_same_repo_changes_nothing(registry: FeatureRegistry) -> None:
    registry.apply(repo(view()))
    diff = registry.plan(repo(view()))
    assert not diff.has_changes
    assert diff.unchanged_views == ["customer_stats"] and diff.unchanged_entities == ["customer"]
    assert registry.apply(repo(view())).has_changes is False


def test_plan_names_added_removed_and_retyped_fields(registry: FeatureRegistry) -> None:
    registry.apply(repo(view()))
    changed = view("customer_stats", Field(name="orders", dtype="float"), Field(name="country", dtype="str"),
                   ttl="7d")
    diff = registry.plan(repo(changed))
    [change] = diff.changed_views
    assert change.added_fields == ["country"]
    assert change.removed_fields == ["spend"]
    assert change.retyped_fields == [Retype("orders", "int", "float")]
    assert "ttl" in change.settings
    assert diff.destructive == ["view 'customer_stats' field 'orders' would change type int -> float"]
    assert ("view", "customer_stats", "change", change.describe()) in diff.rows()


def test_adding_a_field_is_not_destructive(registry: FeatureRegistry) -> None:
    registry.apply(repo(view()))
    grown = view("customer_stats", Field(name="orders", dtype="int", default=0), Field(name="spend", dtype="float"),
                 Field(name="last_seen", dtype="float"))
    diff = registry.apply(repo(grown))
    assert diff.changed_views[0].added_fields == ["last_seen"]
    assert registry.load().views[0].field("last_seen") is not None


def test_retyping_a_field_is_refused_unless_allowed(registry: FeatureRegistry) -> None:
    registry.apply(repo(view()))
    retyped = repo(view("customer_stats", Field(name="orders", dtype="str"), Field(name="spend", dtype="float")))
    with pytest.raises(DestructiveChangeError, match=r"view 'customer_stats' field 'orders'.*int -> str"):
        registry.apply(retyped)
    assert registry.load().views[0].fields[0].dtype == "int"  # nothing was stored
    registry.apply(retyped, allow_destructive=True)
    assert registry.load().views[0].fields[0].dtype == "str"


def test_removing_a_view_is_refused_unless_allowed(registry: FeatureRegistry) -> None:
    registry.apply(repo(view(), view("other")))
    with pytest.raises(DestructiveChangeError, match=r"view 'other' would be removed.*--allow-destructive"):
        registry.apply(repo(view()))
    assert [v.name for v in registry.load().views] == ["customer_stats", "other"]
    diff = registry.apply(repo(view()), allow_destructive=True)
    assert diff.removed_views == ["other"]
    assert [v.name for v in registry.load().views] == ["customer_stats"]


def test_moving_a_view_to_another_entity_is_destructive(registry: FeatureRegistry) -> None:
    registry.apply(repo(view(), entities=(CUSTOMER, PRODUCT)))
    with pytest.raises(DestructiveChangeError, match="from entity 'customer' to 'product'"):
        registry.apply(repo(view(entity="product"), entities=(CUSTOMER, PRODUCT)))


def test_entities_added_changed_and_removed(registry: FeatureRegistry) -> None:
    registry.apply(repo(view(), entities=(CUSTOMER, PRODUCT)))
    diff = registry.plan(repo(view(), entities=(Entity(name="customer", join_key="buyer_id"),)))
    assert diff.changed_entities == ["customer"]
    assert diff.removed_entities == ["product"]
    assert not diff.destructive  # values are keyed by the key's value, not the column name
    registry.apply(repo(view(), entities=(Entity(name="customer", join_key="buyer_id"),)))
    assert [e.join_key for e in registry.load().entities] == ["buyer_id"]


def test_invalid_definitions_are_rejected_before_anything_is_stored(registry: FeatureRegistry) -> None:
    with pytest.raises(DefinitionError, match="unknown entity 'product'"):
        registry.apply(repo(view(entity="product")))
    assert registry.load().views == []


@pytest.mark.parametrize(("kw", "message"), [
    # past ~292 million years the Redis online store's PEXPIREAT failed every write of the view
    ({"ttl": "99999999999999d"}, "ttl: '99999999999999d' is longer than 100 years"),
    ({"freshness_target": "9999999w"}, "freshness_target: '9999999w' is longer than 100 years"),
    ({"ttl": "0s"}, "keeps no value"),  # accepted, and every write was gone at once (404, defaults)
    ({"ttl": "soon"}, "ttl: not a duration"),
])
def test_durations_a_view_cannot_use_are_rejected(registry: FeatureRegistry, kw: dict, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        registry.apply(repo(view(**kw)))
    assert registry.load().views == []


def test_a_stream_window_longer_than_100_years_is_rejected(registry: FeatureRegistry) -> None:
    field = Field(name="orders", dtype="int", agg="count", window="99999999999d", default=0)
    stream = view("activity", field, kind="stream", source=Source(events=["order"]))
    with pytest.raises(DefinitionError, match="window: '99999999999d' is longer than 100 years"):
        registry.apply(repo(stream))
    assert registry.apply(repo(view("activity", Field(name="orders", dtype="int", agg="count", window="36500d",
                                                     default=0), kind="stream", source=Source(events=["order"]))))


def test_applied_at_and_schema_hash_are_recorded(registry: FeatureRegistry) -> None:
    from sqlalchemy import select

    from kassa.db import feature_views_table

    registry.apply(repo(view()))
    with registry.engine.connect() as conn:
        row = conn.execute(select(feature_views_table)).one()
    assert row.schema_hash == view().schema_hash()
    assert row.applied_at == 1_700_000_000.0


@pytest.mark.parametrize(("kw", "message"), [
    # both were applied, and then `kassa serve` (or the view's values) failed: a traceback at start for the
    # path, a view at its defaults for ever for the event type
    ({"of": "order.totl"}, "field 'spend': unknown event path 'order.totl'"),
    ({"events": ["ordr"]}, "unknown event type 'ordr' in source.events \\(known: impression, click"),
])
def test_a_stream_view_with_a_typo_is_rejected_at_apply(registry: FeatureRegistry, kw: dict, message: str) -> None:
    field = Field(name="spend", dtype="float", agg="sum", of=kw.get("of", "order.total"), window="7d", default=0.0)
    stream = view("activity", field, kind="stream", source=Source(events=kw.get("events", ["order"])))
    with pytest.raises(DefinitionError, match=message):
        registry.plan(repo(stream))
    with pytest.raises(DefinitionError, match=message):
        registry.apply(repo(stream))
    assert registry.load().views == []
