"""OAC: gradients of the model's loss streamed block by block, and the output-adaptive Hessians."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsiq.capture import capture_first_layer_inputs, decoder_layers
from lsiq.forward import forward_all
from lsiq.oac import block_backward, head_gradient, oac_hessians
from tests.conftest import LINEARS, tiny_llama_config


def _model(seed=0, layers=3):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=layers)).eval()
    for layer in model.model.layers:  # non-trivial norms
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(seed))
    return model, ids


def _whole_model_gradients(model, ids):
    """dL/d(block input) for every block and dL/d(last block output), by one autograd backward
    through the whole model (L = mean next-token cross-entropy)."""
    saved = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, a, out: saved.append(out))]
    for layer in decoder_layers(model):
        hooks.append(layer.register_forward_hook(
            lambda m, a, out: saved.append(out[0] if isinstance(out, tuple) else out)))
    for t in saved:
        t.retain_grad()
    logits = model(input_ids=ids, use_cache=False).logits.float()
    for h in hooks:
        h.remove()
    for t in saved:
        t.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), [t.grad for t in saved]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_streamed_gradients_equal_a_whole_model_backward():
    model, ids = _model()
    loss, whole = _whole_model_gradients(model, ids)
    model.zero_grad()
    layers = decoder_layers(model)
    h0, kw = capture_first_layer_inputs(model, ids)
    hs = [h0]
    with torch.no_grad():
        for layer in layers:  # forward over the blocks, keeping the boundary activations
            hs.append(forward_all(layer, hs[-1], kw, batch_size=2))
    predicted = ids[:, 1:].numel()
    # two workers' halves of the samples, each normalised by the global count, add up to the whole
    halves = [head_gradient(model.model.norm, model.lm_head, hs[-1][s], ids[s], predicted, batch_size=1)
              for s in (slice(0, 2), slice(2, 4))]
    assert halves[0][1] + halves[1][1] == pytest.approx(loss, rel=1e-5)
    g = torch.cat([halves[0][0], halves[1][0]])
    assert _rel(g, whole[-1]) < 1e-5
    for i in reversed(range(len(layers))):  # backward over the blocks, each recomputed
        g = block_backward(layers[i], hs[i], g, kw, batch_size=3)
        assert _rel(g, whole[i]) < 1e-5, i


def test_oac_hessian_is_the_gradient_weighted_input_autocorrelation():
    model, ids = _model(seed=1, layers=2)
    layer = decoder_layers(model)[1]
    h0, kw = capture_first_layer_inputs(model, ids)
    with torch.no_grad():
        x = forward_all(decoder_layers(model)[0], h0, kw, 2)
    g_out = torch.randn_like(x)
    hess = oac_hessians(layer, x, g_out, kw, batch_size=4)
    # by hand for down_proj: the block output is residual + down_proj(...), so the gradient at
    # down_proj's output is the block's output gradient; its input is captured from a forward
    cap = {}
    hook = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        layer(x, **kw)
    hook.remove()
    gt = g_out.reshape(-1, g_out.shape[-1]).double()
    xt = cap["x"].reshape(-1, cap["x"].shape[-1]).double()
    w = gt.pow(2).sum(-1) / gt.shape[-1]
    expected = (xt * w[:, None]).T @ xt
    assert torch.allclose(hess["mlp.down_proj"], expected, rtol=1e-5, atol=1e-8)
    assert set(hess) == set(LINEARS)
    for h in hess.values():
        assert torch.allclose(h, h.T) and torch.linalg.eigvalsh(h).min() > -1e-6 * h.diagonal().max()


def test_oac_through_the_pipeline_resumes_byte_identical(tiny_checkpoint, texts_dir, tmp_path, ray_local):
    """--method oac: the gradient pass runs before the blocks (and again on resume, since the
    gradients live in the calibrator), and the resumed output equals the uninterrupted one."""
    from lsiq.config import CalibConfig
    from pipeline.config import QuantizeConfig
    from pipeline.driver import run
    from pipeline.model_io import MANIFEST, load_quantized

    def cfg(out):
        return QuantizeConfig(model=str(tiny_checkpoint), output=str(out), calib=[str(texts_dir / "calib.txt")],
                              calib_cfg=CalibConfig(method="oac", wbits=3, group_size=32, batch_size=2),
                              nsamples=4, seqlen=32)

    full, part = tmp_path / "full", tmp_path / "part"
    logs = []
    report = run(cfg(full), log=logs.append)
    assert report["phases"]["oac_pass"] > 0 and any(m.startswith("OAC pass: FP model loss") for m in logs)
    assert all(b["loss_after"] < b["loss_before"] for b in report["blocks"])
    shutil.copytree(full, part)  # a copy of the run, then made to look like one that died after block 0
    for name in (MANIFEST, "model-layers-00001.safetensors", "model-layers-00002.safetensors",
                 "checkpoints/block-00001.json", "checkpoints/block-00002.json"):
        (part / name).unlink()
    assert run(cfg(part), log=lambda m: None)["resumed_blocks"] == 1
    for name in sorted(p.name for p in full.glob("*.safetensors")):
        assert (full / name).read_bytes() == (part / name).read_bytes(), name
    model, manifest = load_quantized(str(full))
    assert manifest["quantization"]["method"] == "oac"
