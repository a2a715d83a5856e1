"""Commerce platform connectors: canonical orders/products, signed webhooks, catalog sync and audit.

Platform modules register themselves in ``kassa.integrations.config.CONNECTORS`` when imported;
``connector_for(platform, cfg)`` imports them on demand.
"""

from kassa.integrations.base import (
    AuditCheck,
    AuthError,
    Connector,
    IntegrationError,
    Order,
    OrderLine,
    PayloadError,
    Product,
    RateLimited,
    ReplayError,
    SignatureError,
    WebhookDelivery,
    email_sha256,
)
from kassa.integrations.config import CONNECTORS, IntegrationSettings, connector_for, register

__all__ = [
    "CONNECTORS",
    "AuditCheck",
    "AuthError",
    "Connector",
    "IntegrationError",
    "IntegrationSettings",
    "Order",
    "OrderLine",
    "PayloadError",
    "Product",
    "RateLimited",
    "ReplayError",
    "SignatureError",
    "WebhookDelivery",
    "connector_for",
    "email_sha256",
    "register",
]
