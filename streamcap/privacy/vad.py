"""Silero VAD: speech probability per 32 ms frame of 16 kHz audio, on CPU.

The model is the JIT file the ``silero-vad`` package ships (MIT, about 2.2 MB),
loaded through the package's own loader; neither torchaudio nor onnxruntime is
needed. Importing the package sets torch's intra-op threads to 1 for the whole
process; :meth:`SileroVad.load` puts the number back, so that the captioner keeps
its ``[model] threads``.

The model is stateful (it carries context from frame to frame): one instance is
used by one thread at a time, and :meth:`SileroVad.probabilities` starts from a
fresh state on every call, so that one window never colours the next.

It is run with one intra-op thread (set for the call, then put back): the model is
a small recurrent network over 512-sample frames, and more threads only add
hand-offs. Measured on this project's 2-core test machine under load, a 10 s window
took 0.35-0.5 s with one thread and 3.6-18 s with two.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from streamcap.errors import ModelError

Float32Array = npt.NDArray[np.float32]

RATE_HZ: Final = 16000
"""The rate the model is run at."""
FRAME: Final = 512
"""Samples per frame at 16 kHz (32 ms): one probability each."""
FRAME_S: Final = FRAME / RATE_HZ


class SileroVad:
    """One loaded Silero VAD model (see the module doc); load it with :meth:`load`."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> SileroVad:
        """Load the packaged JIT model on CPU.

        Raises:
            ModelError: the package is not installed or its model cannot be loaded.
        """
        import torch

        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad
        except ImportError as exc:
            raise ModelError(f"[privacy] speech needs the silero-vad package "
                             f"(pip install silero-vad): {exc}") from None
        finally:
            torch.set_num_threads(threads)  # the package's import set it to 1
        try:
            model = load_silero_vad(onnx=False)
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party loader
            raise ModelError(f"cannot load the silero-vad model: {type(exc).__name__}: "
                             f"{exc}") from None
        finally:
            torch.set_num_threads(threads)
        return cls(model)

    def probabilities(self, samples: npt.ArrayLike) -> Float32Array:
        """The speech probability of each 32 ms frame of ``samples`` (16 kHz mono).

        A trailing part frame is padded with silence; no samples give no frame.

        Returns:
            float32 (ceil(len(samples) / 512),), each in [0, 1].
        """
        import torch

        x = np.array(samples, dtype=np.float32, copy=True).reshape(-1)  # writable, for torch
        if x.size == 0:
            return np.zeros(0, dtype=np.float32)
        with self._lock, torch.inference_mode():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # see the module doc
            try:
                # the model's own loop over frames; it starts from a fresh state
                probs = self._model.audio_forward(torch.from_numpy(x).unsqueeze(0), RATE_HZ)
                self._model.reset_states()
            finally:
                torch.set_num_threads(threads)
        out: Float32Array = probs.reshape(-1).numpy().astype(np.float32, copy=True)
        return out
