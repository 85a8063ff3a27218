"""Dynamic int8 quantization of the captioner's linear layers (CPU only).

Dynamic int8 stores each :class:`torch.nn.Linear`'s weight as int8 (per output
channel) and quantizes the activations on the fly with one scale and zero point per
call, taken from the range of the whole input tensor (per tensor, not row by row); the
matrix product runs in int8 with int32 accumulation (x86: the fbgemm kernels, which need
AVX2) and the result comes back in float32. Everything else (layer norms, attention, embeddings,
softmax) stays float32. It suits the models here whose time goes into matrix products
with few rows: the BART decoder's steps (one token per candidate) and its LM head, and
the BERT-style text encoders over a handful of short captions.

Because the scale is per tensor, rows batched together share it: in a batch of windows
each window's activations are quantized with a scale set partly by the other windows'
rows, so its scores (and, for the decoder, rarely its caption) can differ from the same
window captioned alone. That is why ``precision = "auto"`` never picks int8
(:data:`streamcap.models.runtime.INT8_AUTO` is empty) and ``precision = "int8"`` is
opt-in; ``[model] batch_max = 1`` gives exact independence with it. What it changes
against float32 is measured in ``bench/results/cpu_precision.md``.

The quantized layers replace the float ones in place; modules that call a layer
directly (:class:`~streamcap.models.decoding.inference.SharedCrossInference` calls
``layer.fc1``, ``q_proj``...) get the quantized layer the same way. A tied LM head gets
its own int8 copy; the token embedding it was tied to stays float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Final

import torch
from torch import nn

from streamcap.errors import ModelError
from streamcap.logs import get_logger
from streamcap.models.bundle.components import Components

_log = get_logger(__name__)

INT8_COMPONENTS: Final = ("decoder", "text_encoder", "fluency", "encoder", "audio")
"""Components :func:`quantize_components` can make int8: ``decoder`` (the BART decoder's
linears and the LM head), ``text_encoder`` (the retriever's), ``fluency`` (the fluency
filter's BERT, not its 2-class head), ``encoder`` (the BART encoder's linears) and ``audio`` (CNext's
pointwise linears). No precision plan offers ``encoder`` or ``audio``
(:data:`streamcap.models.runtime.INT8_EXPLICIT`); they stay so that
``bench/cpu_precision.py`` measures them through the real captioner
(``build_captioner(..., int8=[name])``), the same code path a plan would take."""


def int8_engine_available() -> bool:
    """True when this torch build has a quantized engine for dynamic int8 linears."""
    engines = set(torch.backends.quantized.supported_engines)
    return bool(engines & {"x86", "fbgemm", "qnnpack"})


def quantize_linears(module: nn.Module) -> int:
    """Replace every :class:`torch.nn.Linear` inside ``module`` by a dynamic int8 one.

    The module must be float32 on the CPU (nothing is converted: a module in another
    dtype is refused, so that no caller quantizes weights it did not mean to cast).
    Returns how many layers were replaced (0 when none was left to replace).

    Raises:
        ModelError: A linear layer is not float32 or not on the CPU (the error names the
            layer and its dtype or device), or this torch has no int8 engine.
    """
    if not int8_engine_available():
        raise ModelError("int8: this torch build has no quantized engine (fbgemm/x86/qnnpack)")
    linears = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    if not linears:
        return 0
    for name, layer in linears:
        if layer.weight.device.type != "cpu":
            raise ModelError(f"int8: dynamic quantization runs on the CPU only "
                             f"(layer {name or '(root)'!r} is on {layer.weight.device})")
        if layer.weight.dtype != torch.float32:
            raise ModelError(f"int8: dynamic quantization needs float32 layers; layer "
                             f"{name or '(root)'!r} is {layer.weight.dtype}")
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to another package; the API still works
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions",
                                category=UserWarning)
        torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            module, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return len(linears)


def quantize_components(components: Components, names: Iterable[str]) -> dict[str, int]:
    """Make the named components int8 in place (see :data:`INT8_COMPONENTS`).

    A component the bundle lacks (no retriever, no fluency filter) is skipped. Returns
    the number of linear layers made int8 per component.

    Raises:
        ModelError: An unknown name, or a component not on the CPU.
    """
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in INT8_COMPONENTS]
    if unknown:
        raise ModelError(f"int8: unknown component(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(INT8_COMPONENTS)}")
    counts: dict[str, int] = {}
    bart = components.captioner.bart
    for name in wanted:
        if name == "decoder":
            n = quantize_linears(bart.model.decoder)
            counts[name] = n + _quantize_head(bart)
        elif name == "encoder":
            counts[name] = quantize_linears(bart.model.encoder)
        elif name == "text_encoder" and components.retriever is not None:
            counts[name] = quantize_linears(components.retriever.text_encoder)
        elif name == "audio" and components.retriever is not None:
            counts[name] = quantize_linears(components.retriever.audio_encoder)
        elif name == "fluency" and components.fluency is not None:
            # its BERT only: the small head stays float (the filter reads ``clf.weight``)
            counts[name] = quantize_linears(components.fluency.model.encoder)
    if counts:
        _log.debug("int8 layers", **{k: str(v) for k, v in counts.items()})
    return counts


def _quantize_head(bart: nn.Module) -> int:
    """The LM head alone (it sits beside the decoder, not inside it)."""
    holder = nn.Module()
    holder.head = bart.lm_head
    n = quantize_linears(holder)
    bart.lm_head = holder.head
    return n


def is_int8(module: nn.Module) -> bool:
    """True when ``module`` holds at least one dynamic int8 linear layer."""
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    return any(isinstance(m, dynamic) for m in module.modules())
