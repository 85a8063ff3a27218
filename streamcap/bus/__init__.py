"""The plugin bus: wire format, sink inboxes, plugin loading and the bus itself.

``from streamcap.bus import PluginBus, Inbox, Sink, SinkContext, load_sink`` is
what the daemon and sink plugins need; see each module for the details.
"""

from __future__ import annotations

from streamcap.bus.bus import PluginBus, task_name
from streamcap.bus.inbox import DEFAULT_MAX_PENDING, DEFAULT_POLICIES, Inbox
from streamcap.bus.plugin import (
    SINKS_GROUP,
    SOURCES_GROUP,
    LoadedSink,
    PluginInfo,
    Sink,
    SinkContext,
    SinkFactory,
    list_plugins,
    load_sink,
    load_sinks,
    load_source_factory,
)
from streamcap.bus.wire import (
    KINDS,
    PROTOCOL,
    PROTOCOL_VERSION,
    encode,
    error_frame,
    hello,
    kind_of,
    to_wire,
)
from streamcap.queues import DropPolicy

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_POLICIES",
    "KINDS",
    "PROTOCOL",
    "PROTOCOL_VERSION",
    "SINKS_GROUP",
    "SOURCES_GROUP",
    "DropPolicy",
    "Inbox",
    "LoadedSink",
    "PluginBus",
    "PluginInfo",
    "Sink",
    "SinkContext",
    "SinkFactory",
    "encode",
    "error_frame",
    "hello",
    "kind_of",
    "list_plugins",
    "load_sink",
    "load_sinks",
    "load_source_factory",
    "task_name",
    "to_wire",
]
