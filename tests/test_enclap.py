"""Tests of the EnCLAP model (streamcap.models.enclap.model) on tiny random models."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from streamcap.errors import ModelError
from streamcap.models.enclap.model import (
    EnclapConfig,
    EnclapModel,
    count_parameters,
    extend_positions,
    preset,
    reference_key,
    shift_right,
    streamcap_key,
    tile_positions,
)
from streamcap.models.enclap.model import IGNORE_INDEX
from streamcap.training.trainers.masking import mask_codes

torch.set_num_threads(2)

K = 4
SEQ = 32


def _model(seed: int = 0, **overrides: object) -> EnclapModel:
    torch.manual_seed(seed)
    model = EnclapModel(preset("tiny", **overrides))
    model.eval()
    return model


def _inputs(batch: int, n_frames: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1024, (batch, K, n_frames), generator=gen)
    seq_embed = torch.randn(batch, SEQ, generator=gen)
    return codes, seq_embed


@pytest.fixture(scope="module")
def model() -> EnclapModel:
    return _model()


# --- configuration -------------------------------------------------------------------------


def test_config_round_trip_and_unknown_key() -> None:
    cfg = preset("tiny", vocab_size=321)
    assert EnclapConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ModelError, match="'codebooks'"):
        EnclapConfig.from_dict({**cfg.to_dict(), "codebooks": 3})
    with pytest.raises(ModelError, match="d_model"):
        preset("tiny", d_model=65)
    with pytest.raises(ModelError, match="n_codebooks"):
        preset("tiny", n_codebooks=2.5)
    with pytest.raises(ModelError, match="preset"):
        preset("huge")


def test_presets_and_bart_config() -> None:
    base, large = preset("base"), preset("large")
    assert (base.d_model, base.encoder_layers, base.encoder_attention_heads) == (768, 6, 12)
    assert (base.encoder_ffn_dim, base.vocab_size, base.n_codebooks) == (3072, 50265, 32)
    assert (large.d_model, large.decoder_layers, large.decoder_attention_heads) == (1024, 12, 16)
    assert base.max_frames == 2250 and base.seq_embed_dim == 768
    ref = preset("enclap-base")
    assert (ref.n_codebooks, ref.seq_embed_dim, ref.max_frames) == (16, 512, 1021)
    assert (ref.mcm_loss_scale, ref.label_smoothing) == (0.7, 0.2)
    bart = large.bart_config()
    assert bart.d_model == 1024 and bart.encoder_ffn_dim == 4096 and not bart.scale_embedding
    assert bart.decoder_start_token_id == 2 and bart.pad_token_id == 1
    assert preset("base").codec_table_rows == 1088


# --- embedding construction -----------------------------------------------------------------


def test_shapes(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(2, 17)
    hidden, mask = model.encode(codes, seq_embed)
    assert hidden.shape == (2, 20, 64) and hidden.dtype == torch.float32
    assert mask.shape == (2, 20) and bool((mask == 1).all())
    labels = torch.tensor([[0, 5, 6, 2], [0, 7, 2, IGNORE_INDEX]])
    out = model(codes, seq_embed, labels)
    assert out.logits.shape == (2, 4, 1000)
    assert out.loss.shape == () and out.mcm_per_codebook.shape == (K,)


def test_seeded_models_and_outputs_are_deterministic() -> None:
    a, b, c = _model(3), _model(3), _model(4)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["mcm_heads.0.weight"], c.state_dict()["mcm_heads.0.weight"])
    codes, seq_embed = _inputs(2, 12)
    assert torch.equal(a.encode(codes, seq_embed).hidden_states, b.encode(codes, seq_embed)[0])


def test_embedding_matches_hand_computation(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(1, 3)
    inputs, _ = model.embed(codes, seq_embed)
    sd = model.state_dict()
    pos = sd["bart.model.encoder.embed_positions.weight"]
    shared = sd["bart.model.shared.weight"]
    proj_w = sd["bart.model.encoder.clap_projection.weight"]
    proj_b = sd["bart.model.encoder.clap_projection.bias"]
    expected = [seq_embed[0] @ proj_w.T + proj_b, shared[0] + pos[2 + 0]]
    for t in range(3):
        codec = sum(
            sd[f"bart.model.encoder.embed_encodec.{k}.weight"][codes[0, k, t]] for k in range(K)
        )
        expected.append(codec + pos[2 + t + 1])
    expected.append(shared[2] + pos[2 + 4])
    assert torch.allclose(inputs[0], torch.stack(expected), atol=1e-6)


def test_row_zero_is_projection_only(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(2, 6)
    other = seq_embed + torch.randn_like(seq_embed)
    a, _ = model.embed(codes, seq_embed)
    b, _ = model.embed(codes, other)
    assert torch.equal(a[:, 1:], b[:, 1:])
    assert not torch.allclose(a[:, 0], b[:, 0])
    # gradient: rows 1.. do not depend on seq_embed; row 0 depends through the projection only
    x = seq_embed.clone().requires_grad_(True)
    rows, _ = model.embed(codes, x)
    (grad_rest,) = torch.autograd.grad(rows[:, 1:].sum(), x, allow_unused=True, retain_graph=True)
    assert grad_rest is None or bool((grad_rest == 0).all())
    (grad_first,) = torch.autograd.grad(rows[:, 0].sum(), x)
    expected = model.seq_projection.weight.sum(dim=0).expand_as(grad_first)
    assert torch.allclose(grad_first, expected, atol=1e-6)
    # and the final hidden states of every row depend on it through attention. A plain
    # sum would not show it: the sum of a LayerNorm output is constant whatever its
    # input (with the default unit gain and zero bias), so its gradient is zero; a
    # fixed random projection of the last row is not.
    last = model.encode(codes, x)[0][:, -1]
    probe = torch.randn(last.shape, generator=torch.Generator().manual_seed(7))
    (grad_all,) = torch.autograd.grad((last * probe).sum(), x)
    assert bool((grad_all != 0).any())


def test_pad_id_embeds_to_zero(model: EnclapModel) -> None:
    for table in model.codec_embeddings:
        assert isinstance(table, torch.nn.Embedding)
        assert bool((table.weight[1024] == 0).all())
    codes = torch.full((1, K, 5), 1024)
    inputs, _ = model.embed(codes, torch.zeros(1, SEQ))
    pos = model.position_table
    assert torch.equal(inputs[0, 2:7], pos[2 + 1 : 2 + 6])


def test_padded_batch_matches_single_clips(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(2, 9)
    frame_mask = torch.ones(2, 9, dtype=torch.bool)
    frame_mask[1, 5:] = False
    codes[1, :, 5:] = 1024
    hidden, mask = model.encode(codes, seq_embed, frame_mask)
    assert mask[1].tolist() == [1] * 8 + [0] * 4
    alone, _ = model.encode(codes[1:, :, :5], seq_embed[1:])
    assert torch.allclose(hidden[1, :8], alone[0], atol=1e-5)
    full, _ = model.encode(codes[:1], seq_embed[:1])
    assert torch.allclose(hidden[0], full[0], atol=1e-5)
    # the decoder sees the same thing too
    ids = torch.tensor([[2, 0, 9]])
    padded_logits = model.bart(
        encoder_outputs=(hidden[1:],), attention_mask=mask[1:], decoder_input_ids=ids
    ).logits
    alone_logits = model.bart(encoder_outputs=(alone,), decoder_input_ids=ids).logits
    assert torch.allclose(padded_logits, alone_logits, atol=1e-5)


def test_input_errors(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(1, 8)
    with pytest.raises(ModelError, match="shape"):
        model.encode(codes[:, :3], seq_embed)
    with pytest.raises(ModelError, match="1024"):
        model.encode(codes + 1025, seq_embed)
    with pytest.raises(ModelError, match="seq_embed"):
        model.encode(codes, seq_embed[:, :5])
    bad = torch.ones(1, 8, dtype=torch.bool)
    bad[0, 2] = False
    with pytest.raises(ModelError, match="frame_mask"):
        model.encode(codes, seq_embed, bad)
    with pytest.raises(ModelError, match="max_frames=256"):
        model.encode(torch.zeros(1, K, 257, dtype=torch.long), seq_embed)


def test_zero_frames(model: EnclapModel) -> None:
    hidden, mask = model.encode(torch.zeros(1, K, 0, dtype=torch.long), torch.randn(1, SEQ))
    assert hidden.shape == (1, 3, 64) and mask.tolist() == [[1, 1, 1]]


# --- losses ---------------------------------------------------------------------------------


def _manual_ls_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    logp = logits.reshape(-1, logits.shape[-1]).log_softmax(-1)
    flat = labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    logp, flat = logp[keep], flat[keep]
    nll = -logp[torch.arange(len(flat)), flat]
    smooth = -logp.mean(dim=-1)
    return ((1 - eps) * nll + eps * smooth).mean()


def test_loss_matches_manual_computation(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(2, 30)
    masked = mask_codes(codes, pad_id=1024, rng=np.random.default_rng(5), prob=0.5, span=3)
    labels = torch.tensor([[0, 11, 12, 13, 2], [0, 21, 2, IGNORE_INDEX, IGNORE_INDEX]])
    out = model(masked.codes, seq_embed, labels, mcm_labels=masked.labels)

    hidden, mask = model.encode(masked.codes, seq_embed)
    dec_in = torch.tensor([[2, 0, 11, 12, 13], [2, 0, 21, 2, 1]])
    assert torch.equal(shift_right(labels, pad_id=1, start_id=2), dec_in)
    logits = model.bart(
        encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dec_in
    ).logits
    caption = _manual_ls_ce(logits, labels, 0.2)
    mcm = torch.zeros(())
    for k in range(K):
        head = model.mcm_heads[k]
        lab = masked.labels[:, k, :]
        sel = lab != IGNORE_INDEX
        assert bool(sel.any())
        logp = head(hidden[:, 2:32][sel]).log_softmax(-1)
        ce_k = -logp[torch.arange(int(sel.sum())), lab[sel]].mean()
        assert torch.allclose(out.mcm_per_codebook[k], ce_k, atol=1e-5)
        mcm = mcm + 2.0 ** -(k + 1) * ce_k
    assert torch.allclose(out.caption_loss, caption, atol=1e-5)
    assert torch.allclose(out.mcm_loss, mcm, atol=1e-5)
    assert torch.allclose(out.loss, caption + 0.7 * mcm, atol=1e-5)


def test_codebook_without_masked_position_gives_finite_loss(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(2, 12)
    mcm_labels = torch.full_like(codes, IGNORE_INDEX)
    mcm_labels[0, 0, 3] = codes[0, 0, 3]
    codes = codes.clone()
    codes[0, 0, 3] = 1024
    labels = torch.tensor([[0, 5, 2], [0, 6, 2]])
    out = model(codes, seq_embed, labels, mcm_labels=mcm_labels)
    assert bool(torch.isfinite(out.loss))
    assert out.mcm_per_codebook[1:].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(out.mcm_loss, 0.5 * out.mcm_per_codebook[0])
    none = model(codes, seq_embed, labels, mcm_labels=torch.full_like(codes, IGNORE_INDEX))
    assert bool(torch.isfinite(none.loss)) and float(none.mcm_loss) == 0.0
    out.loss.backward()
    assert model.mcm_heads[0].weight.grad is not None
    model.zero_grad()


def test_short_clip_training_step_with_padding() -> None:
    model = _model(2)
    model.train()
    codes, seq_embed = _inputs(2, 40)
    frame_mask = torch.ones(2, 40, dtype=torch.bool)
    frame_mask[1, 4:] = False  # a 4-frame clip: shorter than one span
    masked = mask_codes(codes, pad_id=1024, rng=np.random.default_rng(0), frame_mask=frame_mask)
    labels = torch.tensor([[0, 5, 2], [0, 6, 2]])
    out = model(masked.codes, seq_embed, labels, frame_mask=frame_mask, mcm_labels=masked.labels)
    assert bool(torch.isfinite(out.loss))
    out.loss.backward()
    table = model.codec_embeddings[0]
    assert isinstance(table, torch.nn.Embedding)
    grad = table.weight.grad
    assert grad is not None and bool((grad[1024] == 0).all())


def test_labels_without_target_raise(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(1, 4)
    with pytest.raises(ModelError, match="labels"):
        model(codes, seq_embed, torch.full((1, 3), IGNORE_INDEX))


# --- decoder side for the decoding module ---------------------------------------------------


def test_bart_decoder_and_generate_accept_encoder_outputs(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(2, 10)
    enc = model.encode(codes, seq_embed)
    ids = torch.tensor([[2, 0], [2, 0]])
    direct = model.bart(
        encoder_outputs=(enc.hidden_states,),
        attention_mask=enc.attention_mask,
        decoder_input_ids=ids,
    ).logits
    via_decode = model.decode(ids, enc).logits
    assert via_decode is not None and torch.allclose(via_decode, direct)
    generated = model.bart.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden_states),
        attention_mask=enc.attention_mask,
        max_new_tokens=6,
        do_sample=False,
        num_beams=2,
    )
    assert generated.shape[0] == 2 and generated.shape[1] <= 7
    assert bool((generated[:, 0] == 2).all())
    sampled = model.bart.generate(
        encoder_outputs=enc.encoder_outputs(),
        attention_mask=enc.attention_mask,
        max_new_tokens=4,
        do_sample=True,
        top_p=0.9,
    )
    assert sampled.shape[0] == 2


# --- position table extension ---------------------------------------------------------------


def test_tile_positions_keeps_rows_and_refuses_to_crop() -> None:
    table = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2)  # 5 positions
    grown = tile_positions(table, 10)  # 13 positions
    assert grown.shape == (15, 2)
    assert torch.equal(grown[:7], table)
    # position p >= 5 copies position 1 + (p - 1) % 4
    for p in range(5, 13):
        assert torch.equal(grown[2 + p], table[2 + 1 + (p - 1) % 4])
    assert tile_positions(table, 2) is table
    with pytest.raises(ModelError, match="crop"):
        tile_positions(table, 1)


def test_extend_positions_runs_a_30_second_window() -> None:
    model = _model(5, max_frames=61)
    old = model.position_table.detach().clone()
    assert old.shape == (66, 64)
    codes, seq_embed = _inputs(1, 2250)
    with pytest.raises(ModelError, match="max_frames=61"):
        model.encode(codes, seq_embed)
    short = model.encode(codes[:, :, :40], seq_embed)[0]
    assert extend_positions(model, 2250) is model
    assert model.config.max_frames == 2250
    assert model.position_table.shape == (2255, 64)
    assert torch.equal(model.position_table[:66], old)
    assert torch.equal(model.encode(codes[:, :, :40], seq_embed)[0], short)
    with torch.no_grad():
        hidden, _ = model.encode(codes, seq_embed)
    assert hidden.shape == (1, 2253, 64) and bool(torch.isfinite(hidden).all())
    with pytest.raises(ModelError, match="max_frames=2250"):
        model.encode(torch.zeros(1, K, 2251, dtype=torch.long), seq_embed)
    with pytest.raises(ModelError, match="crop"):
        extend_positions(model, 100)


def test_extend_positions_on_state_dicts() -> None:
    model = _model(6, max_frames=29)
    ours = model.state_dict()
    theirs = {reference_key(k): v for k, v in ours.items()}
    assert "model.encoder.embed_encodec.0.weight" in theirs
    assert "model.encoder.clap_projection.bias" in theirs
    assert "mcm_heads.3.weight" in theirs and "lm_head.weight" in theirs
    assert all(streamcap_key(reference_key(k)) == k for k in ours)
    for sd, key in [
        (ours, "bart.model.encoder.embed_positions.weight"),
        (theirs, "model.encoder.embed_positions.weight"),
    ]:
        grown = extend_positions(sd, 100)
        assert grown[key].shape == (105, 64) and sd[key].shape == (34, 64)
        assert torch.equal(grown[key][:34], sd[key])
    bigger = EnclapModel(preset("tiny", max_frames=100))
    bigger.load_state_dict(extend_positions(ours, 100))
    with pytest.raises(ModelError, match="embed_positions"):
        extend_positions({"x": torch.zeros(1)}, 10)


# --- parameter counting ---------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_parameter_counts_match_reference_sizes() -> None:
    base = count_parameters(preset("enclap-base"))
    large = count_parameters(preset("enclap-large"))
    print("enclap-base", base)
    print("enclap-large", large)
    assert abs(base["total"] - 165.8e6) / 165.8e6 < 0.005
    assert abs(large["total"] - 441.4e6) / 441.4e6 < 0.005
    assert base["codec_embeddings"] == 16 * 1088 * 768
    assert base["mcm_heads"] == 16 * (768 * 1024 + 1024)
    assert base["seq_projection"] == 512 * 768 + 768
    assert base["total"] == sum(v for k, v in base.items() if k != "total")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_counting_large_does_not_allocate() -> None:
    before = _rss_bytes()
    counts = count_parameters(preset("large"))
    grown = _rss_bytes() - before
    assert counts["total"] > 400e6
    assert grown < 300 * 2**20  # the real fp32 weights would take about 1.9 GB
    with torch.device("meta"):
        meta = EnclapModel(preset("large"))
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_incremental_decoding_with_cache_matches_full_pass(model: EnclapModel) -> None:
    codes, seq_embed = _inputs(2, 20)
    enc = model.encode(codes, seq_embed)
    ids = torch.tensor([[2, 0, 5, 7], [2, 0, 9, 3]])
    full = model.decode(ids, enc).logits
    assert full is not None
    step = model.decode(ids[:, :2], enc, use_cache=True)
    pieces = [step.logits]
    for i in (2, 3):
        step = model.decode(ids[:, i : i + 1], enc, cache=step.cache, use_cache=True)
        pieces.append(step.logits)
    assert torch.allclose(torch.cat([p for p in pieces if p is not None], dim=1), full, atol=1e-5)
