"""slim_agents: SLIM sessions, groups and agents on top of node_lite."""

from __future__ import annotations

from node_lite import ConfigError as ConfigError
from node_lite import Name as Name
from node_lite import SlimError as SlimError
from node_lite import open_node as open_node

__all__ = ["ConfigError", "Name", "SlimError", "open_node"]
