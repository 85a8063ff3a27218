"""Sound triggers defined in words: ``[triggers.<name>]``, scored on a fast path of short windows.

:mod:`.spec` reads a trigger's definition (config file, HTTP API and MQTT
command topic alike); the rest of the package scores windows against it and
decides when it turns on and off.
"""
