"""Convert descript-audio-codec checkpoints to the ``DacModel`` layout streamcap loads.

A descript checkpoint (``weights_24khz.pth``) is a dict::

    {"state_dict": {name: tensor}, "metadata": {"kwargs": {constructor arguments}}}

Its module names follow nested ``nn.Sequential`` indices and its convolutions
carry weight normalisation as two tensors, ``weight_g`` (out, 1, 1) and
``weight_v`` (the direction). The ``DacModel`` layout names the same layers
(``encoder.block.{j}.res_unit{r}.conv1``, ...) and stores the folded weight
``w = g * v / ||v||`` (norm over every axis but the first). Name translation
is by pattern, so it needs no config; with a config the result is also checked
against the expected names and shapes.

Descript encoder layout (n = number of strides)::

    encoder.block.0                  first conv           -> encoder.conv1
    encoder.block.{b}.block.{r}.block.{0,1,2,3}   r = 0..2  -> encoder.block.{b-1}.res_unit{r+1}.{snake1,conv1,snake2,conv2}
    encoder.block.{b}.block.3        snake                 -> encoder.block.{b-1}.snake1
    encoder.block.{b}.block.4        strided conv          -> encoder.block.{b-1}.conv1
    encoder.block.{n+1}              snake                 -> encoder.snake1
    encoder.block.{n+2}              last conv             -> encoder.conv2
    quantizer.quantizers.{i}.{in_proj,out_proj,codebook}   unchanged names

and the decoder likewise under ``decoder.model.*`` -> ``decoder.*``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from streamcap.errors import WeightsError
from streamcap.models.bundle.weights import (
    check_state,
    naming_file,
    read_checkpoint,
    state_dict_from,
)
from streamcap.models.codecs.dac import CodecConfig, _expected_shapes

_LAYOUT = "expected a dict with 'state_dict' and 'metadata' (the descript DAC .pth layout)"
_RES_PARTS = ("snake1", "conv1", "snake2", "conv2")
_DESCRIPT_KWARGS = {
    "encoder_dim",
    "encoder_rates",
    "latent_dim",
    "decoder_dim",
    "decoder_rates",
    "n_codebooks",
    "codebook_size",
    "codebook_dim",
    "quantizer_dropout",
    "sample_rate",
}


# -- name translation -------------------------------------------------------------------


def _enc_res(m: re.Match[str]) -> str:
    return f"encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{_RES_PARTS[int(m[3])]}."


def _dec_res(m: re.Match[str]) -> str:
    return f"decoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) - 1}.{_RES_PARTS[int(m[3])]}."


# (descript prefix pattern, DacModel prefix builder); the parameter name after the prefix is kept.
_FORWARD: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"^encoder\.block\.0\."), lambda m: "encoder.conv1."),
    (re.compile(r"^encoder\.block\.(\d+)\.block\.([012])\.block\.([0-3])\."), _enc_res),
    (re.compile(r"^encoder\.block\.(\d+)\.block\.3\."), lambda m: f"encoder.block.{int(m[1]) - 1}.snake1."),
    (re.compile(r"^encoder\.block\.(\d+)\.block\.4\."), lambda m: f"encoder.block.{int(m[1]) - 1}.conv1."),
    (re.compile(r"^encoder\.block\.\d+\.(?=alpha$)"), lambda m: "encoder.snake1."),
    (re.compile(r"^encoder\.block\.\d+\.(?=weight_g$|weight_v$|bias$|weight$)"), lambda m: "encoder.conv2."),
    (re.compile(r"^quantizer\.quantizers\.(\d+)\.(in_proj|out_proj|codebook)\."), lambda m: m[0]),
    (re.compile(r"^decoder\.model\.0\."), lambda m: "decoder.conv1."),
    (re.compile(r"^decoder\.model\.(\d+)\.block\.0\."), lambda m: f"decoder.block.{int(m[1]) - 1}.snake1."),
    (re.compile(r"^decoder\.model\.(\d+)\.block\.1\."), lambda m: f"decoder.block.{int(m[1]) - 1}.conv_t1."),
    (re.compile(r"^decoder\.model\.(\d+)\.block\.([234])\.block\.([0-3])\."), _dec_res),
    (re.compile(r"^decoder\.model\.\d+\.(?=alpha$)"), lambda m: "decoder.snake1."),
    (re.compile(r"^decoder\.model\.\d+\.(?=weight_g$|weight_v$|bias$|weight$)"), lambda m: "decoder.conv2."),
]


# -- weight norm --------------------------------------------------------------------------


def weight_norm_fold(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``w = g * v / ||v||``, the norm taken over every axis but the first.

    Args:
        g: magnitude, shape (d0, 1, ..., 1).
        v: direction, shape (d0, ...).

    Returns:
        Folded weight, shape and dtype of ``v``.
    """
    norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (v.dim() - 1))
    folded: torch.Tensor = g * (v / norm)
    return folded


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs with plain ``weight`` tensors; other keys pass through.

    Understands the old ``X.weight_g``/``X.weight_v`` pairs and the
    parametrization form ``X.parametrizations.weight.original0``/``original1``.

    Raises:
        WeightsError: one half of a pair is missing (the key is named).
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for g_suffix, v_suffix in ((".weight_g", ".weight_v"),
                                   (".parametrizations.weight.original0",
                                    ".parametrizations.weight.original1")):
            if key.endswith(g_suffix):
                pairs.setdefault(key[: -len(g_suffix)], {})["g"] = value
                break
            if key.endswith(v_suffix):
                pairs.setdefault(key[: -len(v_suffix)], {})["v"] = value
                break
        else:
            out[key] = value
    for prefix, pair in pairs.items():
        if "g" not in pair or "v" not in pair:
            half = "magnitude (weight_g)" if "g" not in pair else "direction (weight_v)"
            raise WeightsError(f"weight-norm layer {prefix}: the {half} tensor is missing")
        out[f"{prefix}.weight"] = weight_norm_fold(pair["g"], pair["v"])
    return out


# -- public conversion --------------------------------------------------------------------


def config_from_descript_metadata(
    metadata: Mapping[str, Any], *, n_codebooks: int | None = None
) -> CodecConfig:
    """The :class:`CodecConfig` of a descript checkpoint's ``metadata``.

    Args:
        metadata: the checkpoint's ``"metadata"`` dict, holding ``"kwargs"``.
        n_codebooks: keep only the first k codebooks (default: all of them).

    Raises:
        WeightsError: ``kwargs`` missing, unknown keys, or an architecture the
            ``DacModel`` layout cannot express (named).
    """
    kwargs = metadata.get("kwargs")
    if not isinstance(kwargs, Mapping):
        raise WeightsError("descript metadata: expected a 'kwargs' dict of constructor arguments")
    unknown = sorted(set(kwargs) - _DESCRIPT_KWARGS)
    if unknown:
        raise WeightsError(f"descript metadata.kwargs: unknown keys {unknown}")
    try:
        encoder_dim = int(kwargs.get("encoder_dim", 64))
        rates = tuple(int(r) for r in kwargs.get("encoder_rates", (2, 4, 8, 8)))
        total = int(kwargs.get("n_codebooks", 9))
        codebook_dim_raw = kwargs.get("codebook_dim", 8)
        dims = (
            [int(d) for d in codebook_dim_raw]
            if isinstance(codebook_dim_raw, (list, tuple))
            else [int(codebook_dim_raw)]
        )
        codebook_size = int(kwargs.get("codebook_size", 1024))
        sample_rate = int(kwargs.get("sample_rate", 44100))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"descript metadata.kwargs: non-integer value ({exc})") from exc
    if len(set(dims)) != 1:
        raise WeightsError(f"descript metadata.kwargs.codebook_dim: per-codebook dims differ {dims}")
    latent = kwargs.get("latent_dim")
    if latent is not None and int(latent) != encoder_dim * 2 ** len(rates):
        raise WeightsError(
            f"descript metadata.kwargs.latent_dim: {latent} is not encoder_dim * 2**len(encoder_rates)"
            f" = {encoder_dim * 2 ** len(rates)}, which the DacModel layout requires"
        )
    keep = total if n_codebooks is None else n_codebooks
    if keep > total:
        raise WeightsError(f"descript checkpoint has {total} codebooks, {keep} requested")
    return CodecConfig(
        sample_rate_hz=sample_rate,
        encoder_hidden_size=encoder_dim,
        downsampling_ratios=rates,
        n_codebooks=keep,
        codebook_size=codebook_size,
        codebook_dim=dims[0],
    )


def convert_descript_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    config: CodecConfig | None = None,
    keep_decoder: bool = False,
) -> dict[str, torch.Tensor]:
    """Translate a descript ``DAC`` state dict to ``DacModel`` names, folding weight norm.

    Args:
        state_dict: the checkpoint's ``"state_dict"``: fp32 tensors keyed by
            descript module names, convolutions as ``weight_g``/``weight_v``/``bias``.
        config: when given, the result (encoder + first ``config.n_codebooks``
            quantizers) is checked against the expected names and shapes, and
            later quantizers are dropped.
        keep_decoder: keep ``decoder.*`` weights (streamcap never needs them).

    Returns:
        ``DacModel``-layout state dict (``encoder.*``, ``quantizer.*``, optionally ``decoder.*``).

    Raises:
        WeightsError: names that match no descript layer, or (with ``config``)
            missing keys and shape mismatches, each named.
    """
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        for pattern, build in _FORWARD:
            m = pattern.match(key)
            if m:
                renamed[build(m) + key[m.end():]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(
            f"descript state dict: {len(unknown)} unexpected keys: {', '.join(sorted(unknown)[:8])}"
        )
    folded = fold_weight_norm(renamed)
    if not keep_decoder:
        folded = {k: v for k, v in folded.items() if not k.startswith("decoder.")}
    if config is None:
        return folded
    expected = _expected_shapes(config)
    kept = {
        k: v
        for k, v in folded.items()
        if k in expected or not k.startswith("quantizer.quantizers.")
        or int(k.split(".")[2]) < config.n_codebooks
    }
    check_state(
        expected,
        {k: v for k, v in kept.items() if not k.startswith("decoder.")},
        f"descript state dict does not match {config.codec_id}",
    )
    return kept


def convert_descript_checkpoint(
    checkpoint: Mapping[str, Any], *, n_codebooks: int | None = None
) -> tuple[CodecConfig, dict[str, torch.Tensor]]:
    """Config and ``DacModel``-layout encoder/quantizer weights of a loaded descript checkpoint.

    Raises:
        WeightsError: ``state_dict`` or ``metadata`` missing, or any problem of
            :func:`config_from_descript_metadata` / :func:`convert_descript_state_dict`.
    """
    if not all(isinstance(checkpoint.get(part), Mapping) for part in ("state_dict", "metadata")):
        raise WeightsError(_LAYOUT)
    config = config_from_descript_metadata(checkpoint["metadata"], n_codebooks=n_codebooks)
    state = state_dict_from(checkpoint["state_dict"], "descript state_dict", nested=())
    return config, convert_descript_state_dict(state, config=config)


def read_descript_checkpoint(
    path: str | Path, *, n_codebooks: int | None = None
) -> tuple[CodecConfig, dict[str, torch.Tensor]]:
    """Read ``weights_24khz.pth`` (``torch.load(weights_only=True)``), convert and check it.

    Raises:
        WeightsError: the file is missing, unreadable, refused (a pickle with code) or
            not a descript checkpoint, or its weights do not fit its metadata; the
            message starts with the path.
    """
    checkpoint = read_checkpoint(path)
    with naming_file(path):
        if not isinstance(checkpoint, Mapping):
            raise WeightsError(_LAYOUT)
        return convert_descript_checkpoint(checkpoint, n_codebooks=n_codebooks)


def convert_descript_file(pth: str | Path, output: str | Path) -> CodecConfig:
    """Convert ``weights_24khz.pth`` into a ``.safetensors`` codec state dict whose
    metadata holds the codec config (``streamcap models convert-dac``); returns the config.

    Raises:
        WeightsError: as :func:`read_descript_checkpoint`.
    """
    import json

    from safetensors.torch import save_file

    config, state = read_descript_checkpoint(pth)
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target),
              metadata={"codec_config": json.dumps(config.to_dict())})
    return config
