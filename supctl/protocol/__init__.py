"""The sans-I/O core of the supctl wire protocol: no sockets, no asyncio, no pyroute2."""

from .connection import (
    DEFAULT_WINDOW,
    EARLY_DATA,
    MAX_MESSAGE,
    MAX_MESSAGE_ACCEPTED,
    Connection,
    ConnectionClosed,
    ControlBound,
    ControlReceived,
    DataReceived,
    EndOfStream,
    Event,
    GoawayReceived,
    HelloReceived,
    LocalProtocolError,
    StatusReceived,
    StreamAccepted,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from .frames import ErrorCode, FrameError, FrameType
from .messages import OpenRequest, check_ip_address

SUBPROTOCOL = "supctl.v1"
#: The most concurrent streams an enforcer accepts on its link, whatever the tower
#: sends (its own bound: about 10 KiB each when idle, docs/tower.md); the tower's
#: ``[limits] streams-per-site`` may not be set higher.
MAX_SITE_STREAMS = 16384
#: WebSocket keepalive of every link (tower, enforcer and supctl), in seconds: a link
#: that went silent is dropped within twice this (20 s), on both ends (the ping, pong
#: and close timeouts: :func:`supctl.wsconn.keepalive_options`).  Set by the tower's ``keepalive``, ``edge-enforcer run --keepalive`` and
#: supctl's ``keepalive`` (config file) or ``SUPCTL_KEEPALIVE``.
KEEPALIVE = 10.0

__all__ = [
    "DEFAULT_WINDOW",
    "EARLY_DATA",
    "KEEPALIVE",
    "MAX_MESSAGE",
    "MAX_MESSAGE_ACCEPTED",
    "MAX_SITE_STREAMS",
    "SUBPROTOCOL",
    "Connection",
    "ConnectionClosed",
    "ControlBound",
    "ControlReceived",
    "DataReceived",
    "EndOfStream",
    "ErrorCode",
    "Event",
    "FrameError",
    "FrameType",
    "GoawayReceived",
    "HelloReceived",
    "LocalProtocolError",
    "OpenRequest",
    "StatusReceived",
    "StreamAccepted",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
    "check_ip_address",
]
