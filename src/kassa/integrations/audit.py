"""API-access audit: what the configured credentials can reach on a platform, per capability.

Owns ``run_audit`` (calls ``Connector.audit`` and normalises the answer to every capability in a fixed
order, so a report always has the same five rows) and its rendering: a Rich table for people, one JSON
object for machines, and the platform's confirmation-page snippet and webhook setup steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kassa.integrations.base import CAPABILITIES, AuditCheck, Connector, IntegrationError

STATUS_STYLE = {"ok": "green", "missing_scope": "yellow", "unreachable": "red", "unsupported": "dim"}
CAPABILITY_TITLE = {
    "read_products": "read products",
    "read_orders": "read orders (how far back)",
    "order_webhooks": "subscribe to order webhooks",
    "inventory": "inventory",
    "customer_data": "customer data",
}


@dataclass
class AuditReport:
    platform: str
    checks: list[AuditCheck]
    snippet_steps: list[str] = field(default_factory=list)
    webhook_steps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status == "ok" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "snippet_steps": self.snippet_steps,
            "webhook_steps": self.webhook_steps,
        }


def run_audit(connector: Connector) -> AuditReport:
    """Probe every capability; a connector that cannot even start reports each one as unreachable."""
    try:
        checks = list(connector.audit())
    except IntegrationError as exc:
        checks = [AuditCheck(cap, "unreachable", str(exc)) for cap in CAPABILITIES]
    by_capability = {c.capability: c for c in checks}
    ordered = [by_capability.get(cap) or AuditCheck(cap, "unsupported", "not probed by this connector")
               for cap in CAPABILITIES]
    ordered += [c for c in checks if c.capability not in CAPABILITIES]
    return AuditReport(
        connector.platform, ordered,
        list(getattr(connector, "snippet_steps", []) or []),
        list(getattr(connector, "webhook_steps", []) or []),
    )


def render(report: AuditReport) -> Group:
    table = Table(title=f"{report.platform}: API access", title_justify="left")
    table.add_column("capability")
    table.add_column("status")
    table.add_column("detail (the platform's own words where it refused)", overflow="fold")
    for check in report.checks:
        style = STATUS_STYLE.get(check.status, "")
        table.add_row(CAPABILITY_TITLE.get(check.capability, check.capability),
                      Text(check.status.replace("_", " "), style=style), check.detail)
    parts: list[Any] = [table]
    for title, steps in (("Order webhooks", report.webhook_steps),
                         ("Confirmation-page snippet", report.snippet_steps)):
        if steps:
            parts.append(Text(f"\n{title} on {report.platform}:", style="bold"))
            parts.extend(Text(f"  {i}. {step}") for i, step in enumerate(steps, 1))
    return Group(*parts)
