"""``verl_ext.slicing``: running a model's own forward through layers 0..k only.

Every check goes through the model's top-level forward (what verl's engine calls) under
:func:`exit_after_layer` and compares with an independent reference, the full model's
``hidden_states`` (and a hook on the last layer, whose ``hidden_states`` entry is already normed).
Also: upper layers neither run nor get gradients, the model is restored after normal exits and
exceptions, nesting and bad layers are refused, ``check_slicing`` accepts Qwen3/Qwen2/Llama (bare,
bf16, PEFT) and rejects architectures that do not slice.
"""

from __future__ import annotations

import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from tests.conftest import TOL, left_padded_batch
from verl_ext.random_models import make_model
from verl_ext.slicing import (
    SlicingError,
    check_slicing,
    exit_after_layer,
    find_decoder,
    num_layers,
    unwrap_model,
    validate_layer,
)

N_LAYERS = 4
LENGTHS = [7, 4, 1]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def _raw_hidden(model, ids, mask, layer: int) -> torch.Tensor:
    """H^{layer+1}: the raw output of decoder layer ``layer`` in a full forward."""
    decoder = model.model
    captured = {}
    handle = decoder.layers[layer].register_forward_hook(
        lambda m, a, o: captured.update(h=o[0] if isinstance(o, tuple) else o)
    )
    try:
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask), output_hidden_states=True
        )
    finally:
        handle.remove()
    if layer < len(decoder.layers) - 1:  # HF's entry equals the hook's for all but the last layer
        torch.testing.assert_close(out.hidden_states[layer + 1], captured["h"], atol=0, rtol=0)
    return captured["h"]


def _counting(model, pre: bool = False) -> list[int]:
    """Per-layer call counters, updated by forward hooks (or forward pre-hooks)."""
    calls = [0] * len(model.model.layers)
    for i, lay in enumerate(model.model.layers):
        if pre:
            lay.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        else:
            lay.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _assert_restored(model) -> None:
    decoder = find_decoder(model)
    assert decoder.config.num_hidden_layers == len(decoder.layers)
    assert "forward" not in decoder.norm.__dict__
    # not left "active": the context can be entered again
    with exit_after_layer(model, 0):
        pass


@pytest.mark.parametrize("final_norm", [False, True], ids=["raw", "normed"])
@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_own_forward_returns_layer_k(tiny_model, layer, final_norm):
    """model(...).logits under the context == lm_head(H^{k+1}) (or lm_head(norm(H^{k+1}))), every k."""
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS, seed=layer)
    calls = _counting(tiny_model)
    with torch.no_grad():
        h = _raw_hidden(tiny_model, ids, mask, layer)
        want = tiny_model.lm_head(tiny_model.model.norm(h) if final_norm else h)
        calls[:] = [0] * N_LAYERS
        with exit_after_layer(tiny_model, layer, final_norm=final_norm) as decoder:
            assert decoder is tiny_model.model
            assert tiny_model.config.num_hidden_layers == layer + 1
            out = tiny_model(
                input_ids=ids, attention_mask=mask, position_ids=_positions(mask), output_hidden_states=True
            )
    assert calls == [1] * (layer + 1) + [0] * (N_LAYERS - layer - 1)
    valid = mask.bool()
    tol = TOL[torch.float32]
    torch.testing.assert_close(out.logits[valid], want[valid], atol=tol, rtol=tol)
    assert len(out.hidden_states) == layer + 2
    _assert_restored(tiny_model)


@pytest.mark.parametrize("final_norm", [False, True], ids=["raw", "normed"])
@pytest.mark.parametrize("layer", [0, 2])
def test_upper_layers_get_no_gradient(arch, layer, final_norm):
    model = make_model(arch, init_std=0.1)
    model.train()
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS)
    with exit_after_layer(model, layer, final_norm=final_norm):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    torch.log_softmax(logits, -1)[mask.bool()].mean().backward()  # backward outside the context
    for name, p in model.named_parameters():
        upper = any(f"layers.{i}." in name for i in range(layer + 1, N_LAYERS))
        unused = upper or (name == "model.norm.weight" and not final_norm)
        assert (p.grad is None) == unused, name
        if not unused:
            assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_backward_outside_the_context(arch):
    """Non-reentrant checkpointing recomputes layers in backward after the context exited: same grads."""
    ids, mask = left_padded_batch(320, LENGTHS, seed=4)
    grads = []
    for ckpt in (False, True):
        model = make_model(arch, init_std=0.1)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # pre-hooks: non-reentrant recomputation stops early, before a forward hook would fire
        calls = _counting(model, pre=True)
        with exit_after_layer(model, 1):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        assert calls == [1, 1, 0, 0]
        torch.log_softmax(logits, -1)[mask.bool()].mean().backward()
        assert calls == ([2, 2, 0, 0] if ckpt else [1, 1, 0, 0])  # recomputed once in backward
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        if g is None:
            assert grads[1][name] is None, name
        else:
            torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)


def test_restored_after_exception_in_the_body(tiny_model):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS)
    with torch.no_grad():
        before = tiny_model(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(KeyError, match="inside"), exit_after_layer(tiny_model, 1):
            assert tiny_model.config.num_hidden_layers == 2
            assert "forward" in tiny_model.model.norm.__dict__
            raise KeyError("inside")
        _assert_restored(tiny_model)
        after = tiny_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_restored_after_exception_in_the_forward(tiny_model):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS)
    with torch.no_grad():
        before = tiny_model(input_ids=ids, attention_mask=mask).logits

    def boom(module, args, output):
        raise RuntimeError("boom in layer 1")

    handle = tiny_model.model.layers[1].register_forward_hook(boom)
    with (
        pytest.raises(RuntimeError, match="boom in layer 1"),
        exit_after_layer(tiny_model, 2, final_norm=False),
    ):
        tiny_model(input_ids=ids, attention_mask=mask)
    handle.remove()
    _assert_restored(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0
        )


def test_restores_a_preexisting_norm_forward_override(tiny_model):
    """If someone had already replaced norm.forward on the instance, that override comes back."""
    norm = tiny_model.model.norm
    original = norm.forward

    def patched(x):
        return original(x) * 2.0

    norm.forward = patched
    with exit_after_layer(tiny_model, 1):
        assert norm.forward is not patched
    assert norm.__dict__["forward"] is patched
    with exit_after_layer(tiny_model, 1, final_norm=True):
        assert norm.forward is patched  # final norm kept: the override is used
    assert norm.__dict__["forward"] is patched


def test_nesting_is_refused(tiny_model):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS)
    with exit_after_layer(tiny_model, 1):
        with pytest.raises(RuntimeError, match="already active"), exit_after_layer(tiny_model, 2):
            pass  # pragma: no cover
        # the same decoder reached through another handle is refused too
        with pytest.raises(RuntimeError, match="already active"), exit_after_layer(tiny_model.model, 0):
            pass  # pragma: no cover
        # the refused inner context did not disturb the outer one
        assert tiny_model.config.num_hidden_layers == 2
        calls = _counting(tiny_model)
        with torch.no_grad():
            tiny_model(input_ids=ids, attention_mask=mask)
        assert calls == [1, 1, 0, 0]
    _assert_restored(tiny_model)


@pytest.mark.parametrize("bad", [-1, N_LAYERS, 99])
def test_bad_layer_names_the_valid_range(tiny_model, bad):
    with (
        pytest.raises(ValueError, match=rf"valid values are 0\.\.{N_LAYERS - 1}"),
        exit_after_layer(tiny_model, bad),
    ):
        pass  # pragma: no cover
    _assert_restored(tiny_model)


@pytest.mark.parametrize("bad", [True, 1.0, "1", None])
def test_validate_layer_rejects_non_ints(bad):
    with pytest.raises(ValueError, match="must be an int"):
        validate_layer(bad, 4)


def test_validate_layer():
    assert validate_layer(0, 4) == 0 and validate_layer(3, 4) == 3
    with pytest.raises(ValueError, match=r"internal_layer=36 .* valid values are 0\.\.35 for this 36-layer"):
        validate_layer(36, 36, name="internal_layer")


def test_find_decoder_and_unwrap(arch):
    model = make_model(arch)
    assert find_decoder(model) is model.model
    assert find_decoder(model.model) is model.model
    assert num_layers(model) == N_LAYERS
    peft_model = _lora(make_model(arch))
    assert unwrap_model(peft_model) is peft_model.get_base_model()
    assert find_decoder(peft_model) is peft_model.get_base_model().model


def test_check_slicing_accepts_supported_architectures(tiny_model):
    hooks_before = [len(lay._forward_hooks) for lay in tiny_model.model.layers]
    check_slicing(tiny_model)
    check_slicing(tiny_model, layers=list(range(N_LAYERS)))
    assert [len(lay._forward_hooks) for lay in tiny_model.model.layers] == hooks_before
    assert len(tiny_model.model._forward_hooks) == 0 and len(tiny_model.model.norm._forward_hooks) == 0
    _assert_restored(tiny_model)


def test_check_slicing_bfloat16_and_sdpa():
    check_slicing(make_model("qwen3", dtype=torch.bfloat16, attn_implementation="sdpa"))
    check_slicing(make_model("llama", dtype=torch.bfloat16, attn_implementation="sdpa"))


def _full_depth_forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
    """A decoder forward that ignores config.num_hidden_layers (loops over every layer)."""
    hidden = self.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1])[None]
    pos_emb = self.rotary_emb(hidden, position_ids)
    causal = torch.full((hidden.shape[1], hidden.shape[1]), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for layer in self.layers:
        hidden = layer(hidden, attention_mask=causal, position_embeddings=pos_emb, position_ids=position_ids)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))


def test_check_slicing_rejects_a_forward_that_ignores_num_hidden_layers():
    model = make_model("qwen3", init_std=0.1)
    model.model.forward = types.MethodType(_full_depth_forward, model.model)
    # the replacement is a faithful full-depth forward: only the slicing is missing
    ids = torch.arange(2, 9)[None]
    with torch.no_grad():
        want = make_model("qwen3", init_std=0.1)(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(SlicingError, match=r"ignores config\.num_hidden_layers: layers \[1, 2, 3\] ran"):
        check_slicing(model)
    _assert_restored(model)


def test_check_slicing_rejects_a_forward_that_bypasses_the_norm():
    """Layers are sliced but the final norm is applied anyway (a functional call): values differ."""
    model = make_model("qwen3", init_std=0.1)
    decoder = model.model
    layer_cls_forward = type(decoder).forward

    def forward(self, *args, **kwargs):
        out = layer_cls_forward(self, *args, **kwargs)
        # re-applies the class's norm on top of whatever the (possibly bypassed) norm returned
        out.last_hidden_state = type(self.norm).forward(self.norm, out.last_hidden_state)
        return out

    decoder.forward = types.MethodType(forward, decoder)
    with pytest.raises(SlicingError, match="does not slice cleanly"):
        check_slicing(model)
    _assert_restored(model)


def _doubled_logits(module, args, output):
    output.logits = output.logits * 2.0
    return output


@pytest.mark.parametrize(
    ("arch", "tamper", "match"),
    [
        # a head map this project does not know (the logits are scaled after lm_head)
        ("qwen3", lambda m: m.register_forward_hook(_doubled_logits), "logits are not the LM head's output"),
        # something between the final norm and lm_head (MiniCPM-style hidden scaling)
        (
            "llama",
            lambda m: m.lm_head.register_forward_pre_hook(lambda mod, a: (a[0] * 0.5,)),
            "head's input",
        ),
        # Granite's known map, but under a model_type without a rule: not reproduced, so rejected
        ("granite", lambda m: setattr(m.config, "model_type", "granite_unknown"), "logits are not"),
    ],
)
def test_check_slicing_rejects_a_head_it_would_not_reproduce(arch, tamper, match):
    model = make_model(arch, init_std=0.1)
    check_slicing(model)  # control: the untampered model passes
    tamper(model)
    with pytest.raises(SlicingError, match=match):
        check_slicing(model)
    _assert_restored(model)


def test_check_slicing_rejects_a_model_without_a_decoder_stack():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(SlicingError, match="cannot find a decoder stack"):
        check_slicing(gpt2)
    with pytest.raises(SlicingError, match="GPT2LMHeadModel"), exit_after_layer(gpt2, 0):
        pass  # pragma: no cover


def _lora(model):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("layer", [1, N_LAYERS - 1])
def test_peft_model(arch, layer):
    """PEFT LoRA wrapper: check_slicing passes, the wrapper's own forward slices, LoRA grads stay below k."""
    peft_model = _lora(make_model(arch, init_std=0.1))
    base = peft_model.get_base_model()
    check_slicing(peft_model)
    ids, mask = left_padded_batch(base.config.vocab_size, LENGTHS, seed=2)
    with torch.no_grad():
        want = base.lm_head(_raw_hidden(base, ids, mask, layer))  # LoRA is injected in base's modules
        with peft_model.disable_adapter():
            no_lora = base.lm_head(_raw_hidden(base, ids, mask, layer))
    assert (want - no_lora)[mask.bool()].abs().max() > 1e-4, "control: the adapter must be active"
    calls = _counting(base)
    with exit_after_layer(peft_model, layer):
        logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    assert calls == [1] * (layer + 1) + [0] * (N_LAYERS - layer - 1)
    tol = TOL[torch.float32]
    torch.testing.assert_close(logits[mask.bool()], want[mask.bool()], atol=tol, rtol=tol)
    torch.log_softmax(logits, -1)[mask.bool()].mean().backward()
    lora = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, _ in lora)
    for name, p in lora:
        upper = any(f"layers.{i}." in name for i in range(layer + 1, N_LAYERS))
        assert (p.grad is None) == upper, name
    _assert_restored(peft_model)
