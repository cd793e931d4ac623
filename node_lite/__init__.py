"""node_lite: a lightweight SLIM node that routes length-prefixed msgpack frames by name."""

from __future__ import annotations

from . import wire as wire
from ._acl import AclRule as AclRule
from ._acl import ChannelModerator as ChannelModerator
from ._acl import SubscribeAcl as SubscribeAcl
from ._auth import DEFAULT_CLOCK_SKEW as DEFAULT_CLOCK_SKEW
from ._auth import DEFAULT_VALIDITY as DEFAULT_VALIDITY
from ._auth import Identity as Identity
from ._auth import SharedSecretProvider as SharedSecretProvider
from ._auth import SharedSecretVerifier as SharedSecretVerifier
from ._auth import TokenProvider as TokenProvider
from ._auth import TokenVerifier as TokenVerifier
from ._client import NodeConnection as NodeConnection
from ._client import error_from_frame as error_from_frame
from ._client import open_connection as open_connection
from ._config import ClientConfig as ClientConfig
from ._config import NodeConfig as NodeConfig
from ._config import ServerConfig as ServerConfig
from ._config import TlsConfig as TlsConfig
from ._config import config_from_mapping as config_from_mapping
from ._config import load_config as load_config
from ._controller import Controller as Controller
from ._controller import ControllerConfig as ControllerConfig
from ._controller import call_controller as call_controller
from ._controller import open_controller as open_controller
from ._core import ConnectionStatistics as ConnectionStatistics
from ._core import NodeCore as NodeCore
from ._errors import AuthenticationError as AuthenticationError
from ._errors import ConfigError as ConfigError
from ._errors import ConnectError as ConnectError
from ._errors import FrameTooLargeError as FrameTooLargeError
from ._errors import LimitExceededError as LimitExceededError
from ._errors import MalformedFrameError as MalformedFrameError
from ._errors import NodeError as NodeError
from ._errors import NoRouteError as NoRouteError
from ._errors import ProtocolError as ProtocolError
from ._errors import SlimError as SlimError
from ._errors import UnknownMessageTypeError as UnknownMessageTypeError
from ._errors import UnsupportedVersionError as UnsupportedVersionError
from ._faults import FaultPlan as FaultPlan
from ._faults import FaultProxy as FaultProxy
from ._faults import open_fault_proxy as open_fault_proxy
from ._jwt import JwtProvider as JwtProvider
from ._jwt import JwtVerifier as JwtVerifier
from ._jwt import StaticJwtProvider as StaticJwtProvider
from ._jwt import jwks_from_public_keys as jwks_from_public_keys
from ._jwt import load_trust_bundle as load_trust_bundle
from ._limits import Limits as Limits
from ._limits import RatePolicy as RatePolicy
from ._limits import SlowConsumerPolicy as SlowConsumerPolicy
from ._names import Name as Name
from ._names import instance_id_for as instance_id_for
from ._process import READY_PREFIX as READY_PREFIX
from ._process import NodeProcess as NodeProcess
from ._process import open_node_process as open_node_process
from ._routing import RoutingTable as RoutingTable
from ._server import LinkStatistics as LinkStatistics
from ._server import Node as Node
from ._server import NodeStatistics as NodeStatistics
from ._server import open_node as open_node

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_VALIDITY",
    "READY_PREFIX",
    "AclRule",
    "AuthenticationError",
    "ChannelModerator",
    "ClientConfig",
    "ConfigError",
    "ConnectError",
    "ConnectionStatistics",
    "Controller",
    "ControllerConfig",
    "FaultPlan",
    "FaultProxy",
    "FrameTooLargeError",
    "Identity",
    "JwtProvider",
    "JwtVerifier",
    "LimitExceededError",
    "Limits",
    "LinkStatistics",
    "MalformedFrameError",
    "Name",
    "NoRouteError",
    "Node",
    "NodeConfig",
    "NodeConnection",
    "NodeCore",
    "NodeError",
    "NodeProcess",
    "NodeStatistics",
    "ProtocolError",
    "RatePolicy",
    "RoutingTable",
    "ServerConfig",
    "SharedSecretProvider",
    "SharedSecretVerifier",
    "SlimError",
    "SlowConsumerPolicy",
    "StaticJwtProvider",
    "SubscribeAcl",
    "TlsConfig",
    "TokenProvider",
    "TokenVerifier",
    "UnknownMessageTypeError",
    "UnsupportedVersionError",
    "call_controller",
    "config_from_mapping",
    "error_from_frame",
    "instance_id_for",
    "jwks_from_public_keys",
    "load_config",
    "load_trust_bundle",
    "open_connection",
    "open_controller",
    "open_fault_proxy",
    "open_node",
    "open_node_process",
    "wire",
]
