"""Q/K/V and hidden-state capture with hooks: equal to the projections computed by hand from each
layer's weights, per application of ALBERT's shared layer, with SDPA left on, and a teacher
forward that really stops after the layer asked for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
)

from distill.objective.capture import Capture
from distill.objective.intermediate import attention_scores, layer_count


def make(family: str, layers: int = 3, attn: str = "sdpa", **kw):
    torch.manual_seed(0)
    if family == "bert":
        cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=64, **kw)
    elif family == "roberta":
        cfg = RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=64, pad_token_id=1, **kw)
    elif family == "distilbert":
        cfg = DistilBertConfig(vocab_size=99, dim=32, n_layers=layers, n_heads=4, hidden_dim=64, **kw)
    else:  # ALBERT: one shared layer applied `layers` times, factorized 16-wide embeddings
        cfg = AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=layers,
                           num_hidden_groups=1, num_attention_heads=4, intermediate_size=64, **kw)
    cfg._attn_implementation = attn
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn).eval()


def inputs():
    torch.manual_seed(1)
    ids = torch.randint(5, 99, (2, 7))  # [batch, seq]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # second row padded after 4 tokens
    return {"input_ids": ids, "attention_mask": mask}


def projections(model, layer: int):
    """The (q, k, v) Linear modules that run at `layer` (1-based), found by path, not by Capture."""
    base = model.base_model
    if hasattr(base, "encoder") and hasattr(base.encoder, "albert_layer_groups"):
        att = base.encoder.albert_layer_groups[0].albert_layers[0].attention  # shared by every layer
        return att.query, att.key, att.value
    if hasattr(base, "transformer"):  # DistilBERT
        att = base.transformer.layer[layer - 1].attention
        return att.q_lin, att.k_lin, att.v_lin
    att = base.encoder.layer[layer - 1].attention.self
    return att.query, att.key, att.value


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "albert"])
def test_captured_qkv_equal_projections_of_layer_input(family):
    model = make(family)
    assert model.config._attn_implementation == "sdpa"
    x = inputs()
    with Capture(model, qkv={1, 3}, hidden={0, 2}) as cap:
        out = model(**x, output_hidden_states=True)
    assert model.config._attn_implementation == "sdpa"  # the capture never switches to eager
    assert sorted(cap.qkv) == [1, 3]  # only the layers asked for are kept
    for layer in (1, 3):
        layer_input = out.hidden_states[layer - 1]  # [batch, seq, hidden]
        for got, proj in zip((cap.qkv[layer].q, cap.qkv[layer].k, cap.qkv[layer].v), projections(model, layer)):
            want = layer_input @ proj.weight.T + proj.bias  # [batch, seq, width]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert cap.qkv[layer].num_heads == 4
    hidden = cap.hidden_states()
    assert len(hidden) == 3 and hidden[1] is None
    torch.testing.assert_close(hidden[0], out.hidden_states[0])
    torch.testing.assert_close(hidden[2], out.hidden_states[2])


def test_albert_shared_layer_applications_are_distinct_layers():
    model = make("albert", layers=4)
    # the capture's layer numbers are block applications, as the terms count them from configs
    assert Capture(model).layout.num_layers == layer_count(model.config) == 4
    x = inputs()
    with Capture(model, qkv={1, 2, 3, 4}) as cap:
        out = model(**x, output_hidden_states=True)
    q_proj = projections(model, 1)[0]  # one module, four applications
    for layer in range(1, 5):
        torch.testing.assert_close(cap.qkv[layer].q, out.hidden_states[layer - 1] @ q_proj.weight.T + q_proj.bias)
    # same weights, different inputs: each application is its own capture
    for a in range(1, 5):
        for b in range(a + 1, 5):
            assert not torch.allclose(cap.qkv[a].q, cap.qkv[b].q)


def test_albert_layer0_is_after_the_embedding_projection():
    """hidden_states[0] of ALBERT is hidden-size wide (after embedding_hidden_mapping_in), so a
    hidden-state term with include_embeddings compares hidden-size vectors, not 16/128-wide ones."""
    model = make("albert", layers=2)
    x = inputs()
    with Capture(model, hidden={0}) as cap:
        out = model(**x, output_hidden_states=True)
    emb = model.albert.embeddings(x["input_ids"])  # [batch, seq, embedding_size=16]
    assert emb.shape[-1] == 16 and out.hidden_states[0].shape[-1] == 32
    projected = model.albert.encoder.embedding_hidden_mapping_in(emb)  # [batch, seq, hidden=32]
    torch.testing.assert_close(out.hidden_states[0], projected)
    torch.testing.assert_close(cap.hidden[0], projected)


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_scores_from_captured_qk_reproduce_eager_attention(family):
    """softmax(Q Kᵀ/√d + mask) from the SDPA model's captures = the eager model's attention
    weights: heads are split the way the model splits them."""
    sdpa, eager = make(family, attn="sdpa"), make(family, attn="eager")
    eager.load_state_dict(sdpa.state_dict())
    x = inputs()
    with Capture(sdpa, qkv={2}) as cap:
        sdpa(**x)
    weights = eager(**x, output_attentions=True).attentions[1]  # [batch, heads, seq, seq]
    scores = attention_scores(cap.qkv[2].q, cap.qkv[2].k, 4)  # [batch, heads, seq, seq]
    keys = x["attention_mask"].bool()[:, None, None, :]
    probs = F.softmax(scores.masked_fill(~keys, float("-inf")), dim=-1)
    torch.testing.assert_close(probs, weights, rtol=1e-5, atol=1e-6)


def test_stop_after_skips_later_layers_and_head():
    model = make("bert", layers=4)
    x = inputs()
    with torch.no_grad(), Capture(model, qkv={1, 2}) as full:
        model(**x)
    fired = []
    later = [model.bert.encoder.layer[2], model.bert.encoder.layer[3], model.bert.pooler, model.classifier]
    handles = [m.register_forward_hook(lambda m, a, o, i=i: fired.append(i)) for i, m in enumerate(later)]
    out = "unset"
    flops = FlopCounterMode(display=False)
    with flops, torch.no_grad(), Capture(model, qkv={2}, hidden={2}, stop_after=2) as cap:
        out = model(**x)
    for h in handles:
        h.remove()
    assert cap.stopped and out == "unset"  # the call never returned
    assert fired == []  # layers 3-4, pooler and classifier never ran
    torch.testing.assert_close(cap.qkv[2].q, full.qkv[2].q)
    assert cap.hidden[2].shape == (2, 7, 32)
    with FlopCounterMode(display=False) as all_flops, torch.no_grad():
        model(**x)
    # two of four layers: about half the work (the embeddings cost no matmul FLOPs)
    assert 0.4 < flops.get_total_flops() / all_flops.get_total_flops() < 0.6
    # the model still works normally afterwards: no hook is left behind
    assert model(**x).logits.shape == (2, 2)


def test_capture_keeps_the_student_graph():
    model = make("distilbert", layers=2).train()
    x = inputs()
    with Capture(model, qkv={2}) as cap:
        model(**x)
    assert cap.qkv[2].q.requires_grad
    cap.qkv[2].v.pow(2).mean().backward()
    v_lin = model.distilbert.transformer.layer[1].attention.v_lin
    assert v_lin.weight.grad is not None and v_lin.weight.grad.abs().sum() > 0


def test_second_forward_replaces_captures_and_nothing_leaks_after_exit():
    model = make("bert", layers=2)
    x = inputs()
    with torch.no_grad(), Capture(model, qkv={1}) as cap:
        model(**x)
        first = cap.qkv[1].q
        y = {"input_ids": x["input_ids"].flip(1), "attention_mask": x["attention_mask"]}
        model(**y)
    assert not torch.equal(first, cap.qkv[1].q)
    kept = cap.qkv[1].q
    model(**x)  # outside the context: the hooks are gone
    assert cap.qkv[1].q is kept


def test_bad_requests_fail_with_the_range():
    model = make("albert", layers=3)
    with pytest.raises(ValueError, match=r"layers \[4\].*1\.\.3"):
        Capture(model, qkv={4})
    with pytest.raises(ValueError, match=r"stop_after=1 but layers \[2\]"):
        Capture(model, qkv={2}, stop_after=1)
    with pytest.raises(ValueError, match=r"stop_after=5"):
        Capture(model, stop_after=5)
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))  # fused c_attn
    with pytest.raises(ValueError, match="no self-attention with query/key/value"):
        Capture(gpt2, qkv={1})


def test_a_stopped_forward_leaves_its_result_unassigned():
    model = make("roberta", layers=3)
    x = inputs()
    with torch.no_grad():
        with Capture(model, qkv={3}, hidden={1}) as cap:
            out = model(**x)
        assert out.logits.shape == (2, 2) and not cap.stopped and sorted(cap.qkv) == [3]
        stopped = None
        with Capture(model, qkv={1}, hidden={1}, stop_after=1) as early:
            stopped = model(**x)
    assert stopped is None and early.stopped
    torch.testing.assert_close(early.hidden[1], cap.hidden[1])


def test_attached_hooks_are_registered_once_armed_per_forward_and_switched():
    """A stage's capture: hooks registered once (the module's hook dicts never change between
    steps), keeping nothing outside its context (evaluation), what `select` asks inside it, and
    refusing a selection the attached hooks cannot serve."""
    model = make("bert", layers=3)
    x = inputs()
    cap = Capture(model, qkv={1, 3}, hidden={2}).attach()
    blocks = [model.bert.encoder.layer[i] for i in range(3)]
    with torch.no_grad():
        model(**x)  # not armed: the hooks keep nothing
        assert cap.qkv == {} and cap.hidden == {}
        hooks = [dict(b._forward_hooks) for b in blocks] + [dict(model._forward_pre_hooks)]
        for _ in range(3):
            with cap:
                model(**x)
        assert sorted(cap.qkv) == [1, 3] and sorted(cap.hidden) == [2]
        cap.select(qkv={3})  # e.g. a term switched off
        with cap:
            model(**x)
        assert sorted(cap.qkv) == [3] and cap.hidden == {}
        cap.select(qkv={3}, stop_after=3)
        out = None
        with cap:
            out = model(**x)
        assert out is None and cap.stopped
    assert [dict(b._forward_hooks) for b in blocks] + [dict(model._forward_pre_hooks)] == hooks
    with pytest.raises(ValueError, match="more than the attached hooks serve"):
        cap.select(qkv={2})
    cap.close()
    assert not any(b._forward_hooks for b in blocks) and not model._forward_pre_hooks


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_trains_or_refuses(reentrant):
    """Non-reentrant checkpointing keeps the graph through the captures; reentrant runs the
    layers under no_grad, so a term would silently train nothing: the capture refuses."""
    model = make("bert", layers=2).train()
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    if reentrant:
        with pytest.raises(RuntimeError, match="carry no gradient.*use_reentrant=False"):
            with Capture(model, qkv={2}):
                model(**inputs())
        return
    with Capture(model, qkv={2}) as cap:
        model(**inputs())
    cap.qkv[2].q.pow(2).mean().backward()  # the recompute runs after the hooks are gone
    assert model.bert.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0
