"""The operator dashboard at ``/dashboard``: server-rendered HTML over the services of this process.

One module per page group: `overview` (traffic, per-placement reward, learning curve, canary, gate,
drift, feature freshness), `explorer` (one decision and its outcomes), `manage` (offers, placements,
keys, login). Reads come from the process itself: the Prometheus registry (`traffic`), the decision
and event logs (`outcomes`), the model registry, the drift watch and the catalog. Writes go through the
same services as the JSON API (`Catalog.put_offer`, `KeyStore.revoke`), so the dashboard can do nothing
an admin key cannot do over HTTP.

Every handler runs behind `state.Dashboard.guard`: a session cookie or an admin key in the header
(`session`), the CSRF check on every POST, and an HTML error page instead of problem+json.
"""

from __future__ import annotations

from starlette.routing import Route

from kassa.api.dashboard import explorer, manage, overview
from kassa.api.dashboard.state import Dashboard
from kassa.app import Kassa


def routes(kassa: Kassa) -> list[Route]:
    """Every dashboard route, bound to one `Dashboard` for this process."""
    dash = Dashboard(kassa)
    g = dash.guard
    return [
        Route("/dashboard/login", manage.login_form(dash), methods=["GET"]),
        Route("/dashboard/login", manage.login(dash), methods=["POST"]),
        Route("/dashboard/logout", g(manage.logout), methods=["POST"]),
        Route("/dashboard", g(overview.overview), methods=["GET"]),
        Route("/dashboard/placements", g(manage.placements), methods=["GET"]),
        Route("/dashboard/placements/{placement_id}", g(overview.placement), methods=["GET"]),
        Route("/dashboard/placements/{placement_id}/edit", g(manage.edit_placement), methods=["GET", "POST"]),
        Route("/dashboard/features", g(overview.features), methods=["GET"]),
        Route("/dashboard/decisions", g(explorer.explorer), methods=["GET"]),
        Route("/dashboard/offers", g(manage.offers), methods=["GET"]),
        Route("/dashboard/offers/{offer_id}", g(manage.edit_offer), methods=["GET", "POST"]),
        Route("/dashboard/keys", g(manage.keys), methods=["GET", "POST"]),
        Route("/dashboard/keys/{key_hash}/revoke", g(manage.revoke_key), methods=["POST"]),
    ]
