"""The built-in sinks, registered as entry points in the ``streamcap.sinks`` group.

``websocket`` (:mod:`streamcap.sinks.websocket`) and ``mqtt``
(:mod:`streamcap.sinks.mqtt`) are loaded exactly like third-party plugins, by
name, only when a ``[sinks.<instance>]`` table asks for them; importing this
package imports neither (nor their network libraries).
"""
