"""Hugging Face transformers models built from tiny configs (no download): every MLP activation is
one site per layer, with the right unit count and kind, and the figures match the reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import deadwatch

transformers = pytest.importorskip("transformers")

pytest.register_assert_rewrite("reference")
from reference import Fwd, Probe, check_report, plant_dead, reference, run_watch  # noqa: E402

VOCAB, LAYERS, WINDOW = 50, 2, 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ids(batch=2, length=7):
    return torch.randint(0, VOCAB, (batch, length))


def train_and_report(model, make_kwargs, steps=2, **overrides):
    """A couple of real training steps (SGD) under deadwatch; the last report."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    with deadwatch.watch(model, reporters=[], report_every=10**6, window=WINDOW, **overrides) as mon:
        for _ in range(steps):
            out = model(**make_kwargs())
            out[0].float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()
        return mon.report()


def check_sites(report, expected):
    """expected: {site name: (kind, units, observations)} in the order the sites run."""
    got = {layer.name: (layer.kind, layer.units, layer.observations) for layer in report.layers}
    assert list(got) == list(expected)
    assert got == expected


# ---- BERT: GELUActivation in each layer's intermediate, Tanh in the pooler -----------------------------

def bert(**kw):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **kw)
    return transformers.BertModel(config)


def test_bert_sites():
    m = bert()
    report = train_and_report(m, lambda: {"input_ids": ids(2, 7)}, count_subsample=1)
    expected = {f"encoder.layer.{i}.intermediate.intermediate_act_fn": ("GELUActivation", 37, 2 * 2 * 7)
                for i in range(LAYERS)}
    expected["pooler.activation"] = ("Tanh", 16, 2 * 2)
    check_sites(report, expected)
    for name, layer in zip(expected, report.layers):
        assert layer.kind == type(m.get_submodule(name)).__name__


def test_bert_dead_units_against_reference():
    m = bert()
    plant_dead(m.encoder.layer[0].intermediate.dense.bias, [0, 36])
    plant_dead(m.encoder.layer[1].intermediate.dense.bias, [17])
    steps = [ids(2, 7) for _ in range(4)]
    names = [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(LAYERS)]

    def probes(t):
        p = {name: Probe(t.get_submodule(name), axis=-1) for name in names}
        p["pooler.activation"] = Probe(t.pooler.activation, axis=1)
        return p

    twin = copy.deepcopy(m)
    refs = reference(twin, steps, probes(twin))
    report = run_watch(m, steps, window=WINDOW, count_subsample=1)
    check_report(report, refs, WINDOW)
    assert {0, 36} <= set(report.layer(names[0]).dead_units)
    assert 17 in report.layer(names[1]).dead_units


# ---- T5: ReLU (DenseReluDense) and gated-gelu -----------------------------------------------------------

def t5_config(proj):
    return transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=29, num_layers=LAYERS,
                                 num_decoder_layers=LAYERS, num_heads=2, feed_forward_proj=proj, dropout_rate=0.0,
                                 decoder_start_token_id=0, pad_token_id=0)


@pytest.mark.parametrize("proj,kind", [("relu", "ReLU"), ("gated-gelu", "NewGELUActivation")])
def test_t5_encoder_sites(proj, kind):
    m = transformers.T5EncoderModel(t5_config(proj))
    report = train_and_report(m, lambda: {"input_ids": ids(2, 6)}, count_subsample=1)
    dense = "DenseReluDense"
    check_sites(report, {f"encoder.block.{i}.layer.1.{dense}.act": (kind, 29, 2 * 2 * 6) for i in range(LAYERS)})


def test_t5_encoder_decoder_sites_and_reference():
    m = transformers.T5Model(t5_config("relu"))
    enc = [f"encoder.block.{i}.layer.1.DenseReluDense.act" for i in range(LAYERS)]
    dec = [f"decoder.block.{i}.layer.2.DenseReluDense.act" for i in range(LAYERS)]
    report = train_and_report(m, lambda: {"input_ids": ids(2, 6), "decoder_input_ids": ids(2, 4)}, steps=1,
                              count_subsample=1)
    expected = {name: ("ReLU", 29, 2 * 6) for name in enc}
    expected.update({name: ("ReLU", 29, 2 * 4) for name in dec})
    check_sites(report, expected)

    m = transformers.T5Model(t5_config("relu"))
    with torch.no_grad():
        # T5's wi has no bias: a zero weight row gives pre-activation exactly 0, relu(0) = 0 never fires
        m.encoder.block[0].layer[1].DenseReluDense.wi.weight[3] = 0.0
    steps = [Fwd((), kwargs={"input_ids": ids(2, 6), "decoder_input_ids": ids(2, 4)}) for _ in range(3)]
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {name: Probe(twin.get_submodule(name), axis=-1) for name in enc + dec})
    report = run_watch(m, steps, window=WINDOW, count_subsample=1)
    check_report(report, refs, WINDOW)
    assert 3 in report.layer(enc[0]).dead_units


# ---- LLaMA: SiLU gate in each layer's MLP ------------------------------------------------------------------

def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=40, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      hidden_act="silu", mlp_bias=True)
    return transformers.LlamaModel(config)


def test_llama_sites():
    m = llama()
    report = train_and_report(m, lambda: {"input_ids": ids(2, 5)}, count_subsample=1)
    names = [f"layers.{i}.mlp.act_fn" for i in range(LAYERS)]
    check_sites(report, {name: (type(m.get_submodule(name)).__name__, 40, 2 * 2 * 5) for name in names})
    assert report.layers[0].kind in ("SiLU", "SiLUActivation")


def test_llama_dead_units_against_reference():
    m = llama()
    plant_dead(m.layers[0].mlp.gate_proj.bias, [1, 39])
    plant_dead(m.layers[1].mlp.gate_proj.bias, [20])
    steps = [ids(2, 5) for _ in range(4)]
    names = [f"layers.{i}.mlp.act_fn" for i in range(LAYERS)]
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {name: Probe(twin.get_submodule(name), axis=-1) for name in names})
    report = run_watch(m, steps, window=WINDOW, count_subsample=1)
    check_report(report, refs, WINDOW)
    assert {1, 39} <= set(report.layer(names[0]).dead_units)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_llama_gradient_checkpointing(reentrant):
    m = llama()
    plant_dead(m.layers[0].mlp.gate_proj.bias, [7])
    steps = [ids(2, 5) for _ in range(3)]
    names = [f"layers.{i}.mlp.act_fn" for i in range(LAYERS)]
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {name: Probe(twin.get_submodule(name), axis=-1) for name in names})
    ckpt = copy.deepcopy(m)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(ckpt, "activation_checkpointing_enable"):
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    calls = []
    handle = ckpt.layers[0].mlp.act_fn.register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_watch(ckpt, steps, window=WINDOW, count_subsample=1)
    handle.remove()
    assert len(calls) == 2 * len(steps)      # the layers really were recomputed in backward
    check_report(report, refs, WINDOW)
    assert report.layer(names[0]).observations == 3 * 2 * 5


# ---- GPT-2: NewGELUActivation after HF's Conv1D (a linear layer) ------------------------------------------

def test_gpt2_sites():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=LAYERS, n_head=2, n_inner=24,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2Model(config)
    plant_dead(m.h[1].mlp.c_fc.bias, [5])
    names = [f"h.{i}.mlp.act" for i in range(LAYERS)]
    report = train_and_report(m, lambda: {"input_ids": ids(2, 6)}, count_subsample=1)
    check_sites(report, {name: ("NewGELUActivation", 24, 2 * 2 * 6) for name in names})

    m = transformers.GPT2Model(config)
    plant_dead(m.h[1].mlp.c_fc.bias, [5])
    steps = [ids(2, 6) for _ in range(3)]
    twin = copy.deepcopy(m)
    refs = reference(twin, steps, {name: Probe(twin.get_submodule(name), axis=-1) for name in names})
    report = run_watch(m, steps, window=WINDOW, count_subsample=1)
    check_report(report, refs, WINDOW)
    assert 5 in report.layer(names[1]).dead_units


# ---- wav2vec2: Conv1d feature encoder, frozen (no autograd graph there) ------------------------------------

@pytest.mark.parametrize("norm", ["group", "layer"])
def test_wav2vec2_frozen_feature_encoder(norm):
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=37, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), conv_bias=True, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer",
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.0)
    m = transformers.Wav2Vec2Model(config)
    m.freeze_feature_encoder()
    convs = m.feature_extractor.conv_layers
    # layer 0 of the "group" variant normalises each channel after the conv: its norm's shift is the bias
    plant_dead(convs[0].layer_norm.bias if norm == "group" else convs[0].conv.bias, [3])
    plant_dead(convs[1].conv.bias if norm == "group" else convs[1].layer_norm.bias, [6])
    plant_dead(m.encoder.layers[1].feed_forward.intermediate_dense.bias, [30])
    steps = [torch.randn(2, 1000), torch.randn(3, 800), torch.randn(2, 1000)]
    channels = [f"feature_extractor.conv_layers.{i}.activation" for i in range(2)] + ["encoder.pos_conv_embed.activation"]
    ff = [f"encoder.layers.{i}.feed_forward.intermediate_act_fn" for i in range(LAYERS)]

    def probes(t):
        p = {name: Probe(t.get_submodule(name), axis=1) for name in channels}
        p.update({name: Probe(t.get_submodule(name), axis=-1) for name in ff})
        return p

    twin = copy.deepcopy(m)
    refs = reference(twin, steps, probes(twin))
    report = run_watch(m, steps, window=WINDOW, count_subsample=1)
    check_report(report, refs, WINDOW)
    units = {layer.name: layer.units for layer in report.layers}
    assert units == {channels[0]: 8, channels[1]: 8, channels[2]: 16, ff[0]: 37, ff[1]: 37}
    assert 3 in report.layer(channels[0]).dead_units and 6 in report.layer(channels[1]).dead_units
    assert 30 in report.layer(ff[1]).dead_units
