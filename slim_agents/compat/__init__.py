"""Drop-in dialects of upstream SLIM's Python bindings over the native API.

Code written for upstream's ``slim_bindings`` runs with only its import changed:

* ``import slim_agents.compat.v0_6 as slim_bindings``: the v0.6 API of the group
  communication tutorial (``PyName``, ``await Slim.new(...)``, ...);
* ``import slim_agents.compat.v0_7 as slim_bindings``: the v0.7 API of the sessions
  document (``Name``, ``Slim(...)``, ``create_session(dest, cfg)`` returning a
  completion handle, ...).

Both run on asyncio and trio (through anyio).
"""

from __future__ import annotations

from . import v0_6 as v0_6
from . import v0_7 as v0_7

__all__ = ["v0_6", "v0_7"]
