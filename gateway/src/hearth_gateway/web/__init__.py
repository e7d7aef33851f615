"""The box owner's page and the metrics endpoint: one HTTP listener, loopback by default
(docs/metrics-and-web.md). Server-rendered HTML; the little script and the style sheet ship in
the package (``static/``), nothing is fetched from anywhere else."""

from hearth_gateway.web._auth import web_token
from hearth_gateway.web._server import WebServer, web_server_for

__all__ = ["WebServer", "web_server_for", "web_token"]
