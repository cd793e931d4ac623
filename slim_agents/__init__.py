"""slim_agents: SLIM sessions, groups and agents on top of node_lite."""

from __future__ import annotations

from node_lite import AuthenticationError as AuthenticationError
from node_lite import ConfigError as ConfigError
from node_lite import ConnectError as ConnectError
from node_lite import JwtProvider as JwtProvider
from node_lite import JwtVerifier as JwtVerifier
from node_lite import Name as Name
from node_lite import NodeError as NodeError
from node_lite import NoRouteError as NoRouteError
from node_lite import SharedSecretProvider as SharedSecretProvider
from node_lite import SharedSecretVerifier as SharedSecretVerifier
from node_lite import SlimError as SlimError
from node_lite import StaticJwtProvider as StaticJwtProvider
from node_lite import jwks_from_public_keys as jwks_from_public_keys
from node_lite import load_trust_bundle as load_trust_bundle
from node_lite import open_node as open_node

from ._agent import Agent as Agent
from ._agent import AgentCard as AgentCard
from ._agent import Mail as Mail
from ._agent import MessageHandler as MessageHandler
from ._agent import RunningAgent as RunningAgent
from ._app import App as App
from ._app import open_app as open_app
from ._app_core import JoinInfo as JoinInfo
from ._config import SessionConfig as SessionConfig
from ._config import SessionKind as SessionKind
from ._e2e import E2EError as E2EError
from ._e2e import SigningIdentity as SigningIdentity
from ._errors import DeliveryError as DeliveryError
from ._errors import DeliveryTimeoutError as DeliveryTimeoutError
from ._errors import JoinFailedError as JoinFailedError
from ._errors import MessageLostError as MessageLostError
from ._errors import NotModeratorError as NotModeratorError
from ._errors import ParticipantError as ParticipantError
from ._errors import SessionClosedError as SessionClosedError
from ._errors import SessionError as SessionError
from ._errors import SessionRejectedError as SessionRejectedError
from ._errors import SessionTimeoutError as SessionTimeoutError
from ._instrument import Instrument as Instrument
from ._otel import enable_tracing as enable_tracing
from ._plugins import PluginError as PluginError
from ._plugins import framework_adapter as framework_adapter
from ._reports import DeliveryReport as DeliveryReport
from ._reports import Message as Message
from ._reports import MessageContext as MessageContext
from ._session import Handle as Handle
from ._session import Session as Session
from ._session_e2e import DecryptError as DecryptError
from ._session_e2e import Encryption as Encryption
from ._swarm import AgentSpec as AgentSpec
from ._swarm import RestartPolicy as RestartPolicy
from ._swarm import Swarm as Swarm
from ._swarm import SwarmError as SwarmError
from ._swarm import open_swarm as open_swarm
from ._tools import Tool as Tool
from ._tools import ToolError as ToolError
from ._tools import to_anthropic as to_anthropic
from ._tools import to_openai as to_openai
from ._tools import tool as tool

__all__ = [
    "Agent",
    "AgentCard",
    "AgentSpec",
    "App",
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "DecryptError",
    "DeliveryError",
    "DeliveryReport",
    "DeliveryTimeoutError",
    "E2EError",
    "Encryption",
    "Handle",
    "Instrument",
    "JoinFailedError",
    "JoinInfo",
    "JwtProvider",
    "JwtVerifier",
    "Mail",
    "Message",
    "MessageContext",
    "MessageHandler",
    "MessageLostError",
    "Name",
    "NoRouteError",
    "NodeError",
    "NotModeratorError",
    "ParticipantError",
    "PluginError",
    "RestartPolicy",
    "RunningAgent",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "SessionError",
    "SessionKind",
    "SessionRejectedError",
    "SessionTimeoutError",
    "SharedSecretProvider",
    "SharedSecretVerifier",
    "SigningIdentity",
    "SlimError",
    "StaticJwtProvider",
    "Swarm",
    "SwarmError",
    "Tool",
    "ToolError",
    "enable_tracing",
    "framework_adapter",
    "jwks_from_public_keys",
    "load_trust_bundle",
    "open_app",
    "open_node",
    "open_swarm",
    "to_anthropic",
    "to_openai",
    "tool",
]
