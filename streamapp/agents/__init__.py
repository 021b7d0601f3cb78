"""The Faust layer: one thin module per agent, timer or task, each wiring a stream to one service.

``sink`` (events -> S3), ``meter`` (events -> rate tables and shed decisions), ``drain``
(overflow -> S3, paced), ``parking`` (parked objects, redelivered), ``control`` (the control
plane's tail). No domain logic lives here; ``streamapp.wiring.register_agents`` calls them all.
"""

from streamapp.agents.control import register_control
from streamapp.agents.drain import register_drain
from streamapp.agents.meter import register_meter
from streamapp.agents.parking import register_parking
from streamapp.agents.sink import register_sink

__all__ = ["register_control", "register_drain", "register_meter", "register_parking", "register_sink"]
