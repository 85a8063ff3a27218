"""Audio input devices as PortAudio (through sounddevice) sees them.

Never raises for a missing PortAudio library or an empty device list: the
functions return an empty list and a reason a user can act on, which is what
``streamcap devices`` prints.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from streamcap.logs import get_logger

_log = get_logger(__name__)

_lock = threading.Lock()
_active_streams = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceInfo:
    """One device that can record.

    Attributes:
        index: PortAudio device index, usable as ``mic:<index>``.
        name: Device name; a part of it is usable as ``mic:<name part>``.
        host_api: PortAudio host API (ALSA, JACK, PulseAudio, Core Audio, WASAPI ...).
        max_input_channels: Most channels the device records at once.
        default_sample_rate_hz: The device's preferred rate.
        is_default: Whether ``mic:default`` selects this device.
    """

    index: int
    name: str
    host_api: str
    max_input_channels: int
    default_sample_rate_hz: float
    is_default: bool

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict with the field names as keys."""
        return asdict(self)


def load_sounddevice() -> tuple[ModuleType | None, str]:
    """Import sounddevice; return ``(module, "")`` or ``(None, reason)`` when PortAudio is missing."""
    try:
        import sounddevice
    except OSError as exc:  # the module imports, but libportaudio cannot be loaded
        return None, (
            f"PortAudio library not found ({exc}); install it (Debian/Ubuntu: "
            "apt-get install libportaudio2)"
        )
    except ImportError as exc:
        return None, f"the sounddevice package is not installed ({exc})"
    return sounddevice, ""


def stream_opened() -> None:
    """Record that a PortAudio stream is open (it forbids :func:`refresh_portaudio`)."""
    global _active_streams
    with _lock:
        _active_streams += 1


def stream_closed() -> None:
    """Record that a PortAudio stream opened with :func:`stream_opened` is closed."""
    global _active_streams
    with _lock:
        _active_streams = max(0, _active_streams - 1)


def refresh_portaudio() -> bool:
    """Re-initialise PortAudio so that devices plugged in (or servers started) since show up.

    PortAudio enumerates devices once, when it is initialised. Re-initialising
    closes every open stream, so this does nothing while a stream is open.

    Returns:
        Whether PortAudio was re-initialised.
    """
    sd, _ = load_sounddevice()
    if sd is None:
        return False
    with _lock:
        if _active_streams:
            return False
        try:
            sd._terminate()
            sd._initialize()
        except Exception as exc:  # noqa: BLE001 - sounddevice raises PortAudioError; log and go on
            _log.warning("re-initialising PortAudio failed", error=str(exc))
            return False
    return True


def _default_input_index(sd: Any) -> int:
    try:
        info = sd.query_devices(kind="input")
    except Exception:  # noqa: BLE001 - PortAudioError: no default input
        return -1
    return int(info["index"])


def list_input_devices(*, refresh: bool = False) -> tuple[list[DeviceInfo], str]:
    """List the devices that can record.

    Args:
        refresh: Re-initialise PortAudio first (see :func:`refresh_portaudio`),
            to see devices that appeared after the first call.

    Returns:
        ``(devices, reason)``: ``reason`` is ``""`` when devices were found,
        otherwise why the list is empty (no PortAudio, no input devices).
    """
    sd, reason = load_sounddevice()
    if sd is None:
        return [], reason
    if refresh:
        refresh_portaudio()
    try:
        raw = sd.query_devices()
        host_apis = sd.query_hostapis()
    except Exception as exc:  # noqa: BLE001 - PortAudioError; never a traceback for a listing
        return [], f"PortAudio cannot list devices: {exc}"
    default_index = _default_input_index(sd)
    devices = [
        DeviceInfo(
            index=int(dev["index"]),
            name=str(dev["name"]),
            host_api=str(host_apis[int(dev["hostapi"])]["name"]),
            max_input_channels=int(dev["max_input_channels"]),
            default_sample_rate_hz=float(dev["default_samplerate"]),
            is_default=int(dev["index"]) == default_index,
        )
        for dev in raw
        if int(dev["max_input_channels"]) > 0
    ]
    if not devices:
        apis = ", ".join(str(api["name"]) for api in host_apis) or "none"
        return [], (
            f"PortAudio found no input devices (host APIs: {apis}); "
            "check that a sound card or a sound server (PulseAudio, PipeWire, JACK) is available"
        )
    return devices, ""


def find_input_device(selector: str, devices: list[DeviceInfo]) -> DeviceInfo | None:
    """Pick the device ``mic:<selector>`` means: ``default``, an index, or a name part.

    A name part matches case-insensitively; an exact name wins over a
    partial match, and otherwise the lowest index wins.
    """
    wanted = selector.strip()
    if wanted.lower() == "default":
        return next((d for d in devices if d.is_default), None)
    if wanted.isdigit():
        return next((d for d in devices if d.index == int(wanted)), None)
    lowered = wanted.lower()
    exact = [d for d in devices if d.name.lower() == lowered]
    if exact:
        return exact[0]
    return next((d for d in devices if lowered in d.name.lower()), None)


def describe_devices(devices: list[DeviceInfo], reason: str = "") -> str:
    """One line listing ``devices`` for an error message (or the reason there are none)."""
    if not devices:
        return reason or "no input devices"
    return "; ".join(
        f"{d.index}: {d.name} ({d.host_api}, {d.max_input_channels} ch"
        f"{', default' if d.is_default else ''})"
        for d in devices
    )
