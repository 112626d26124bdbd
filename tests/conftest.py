"""Shared fixtures: tiny random checkpoints of every supported family, the real SmolLM2 fixture, a local Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from lsiq.archs import BlockArch

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# the linears of a Llama block, as its descriptor names them (the tests of Llama blocks use them)
LINEARS = BlockArch("llama", 64, 128, 4, 2, 16, 1).linears


def tiny_llama_config(**overrides) -> LlamaConfig:
    kw = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=3, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


WINDOW = 8  # the sliding window of the tiny families that have one: calibration runs beyond it
_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=False)
# one tiny config per supported family (hidden 64, 2 layers, SmolLM2's vocabulary): the sliding-window
# ones mix layer types where the family does (Qwen2: full then sliding; Gemma: sliding then full)
FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_TINY),
    "mistral": lambda: MistralConfig(**_TINY, sliding_window=WINDOW),
    "qwen2": lambda: Qwen2Config(**_TINY, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**_TINY, head_dim=16),
    "gemma2": lambda: Gemma2Config(**_TINY, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16),
    "gemma3_text": lambda: Gemma3TextConfig(**_TINY, head_dim=16, sliding_window=WINDOW,
                                            layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: Phi3Config(**_TINY, partial_rotary_factor=0.5),  # Phi-4-mini's partial rotary
    "olmo2": lambda: Olmo2Config(**_TINY),
}
FAMILIES = tuple(FAMILY_CONFIGS)
# one tiny config per mixture-of-experts family: 4 experts 32 wide, 2 per token, hidden 64, 2 layers (DeepSeek-V3:
# a dense first layer, then a routed one with a shared expert and multi-head latent attention whose
# low-rank widths pack into 32-bit words at 2-4 bits; gpt-oss: sliding and full layers, biases)
_MOE = _TINY | dict(num_experts_per_tok=2)
MOE_CONFIGS = {
    "mixtral": lambda: MixtralConfig(**(_MOE | dict(intermediate_size=32)), num_local_experts=4),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_MOE, head_dim=16, num_experts=4, moe_intermediate_size=32),
    "deepseek_v3": lambda: DeepseekV3Config(**(_MOE | dict(num_key_value_heads=4)), n_routed_experts=4,
                                            moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                                            q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=16,
                                            v_head_dim=16, n_group=1, topk_group=1),
    "gpt_oss": lambda: GptOssConfig(**(_MOE | dict(intermediate_size=32)), head_dim=16, num_local_experts=4,
                                    sliding_window=WINDOW, rope_parameters=dict(
        rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=8,
        rope_theta=150000.0)),  # gpt-oss's YaRN, scaled to the tiny context
}
MOE_FAMILIES = tuple(MOE_CONFIGS)


def tiny_family_model(family: str, seed: int = 0, layers: int | None = None) -> torch.nn.Module:
    """A random tiny model of ``family`` (transformers' own classes) with random norm weights and
    biases, so that a wrong treatment of a norm (Gemma's 1 + w), a q/k norm or a bias shows. A
    mixture-of-experts model runs its experts eagerly, as the pipeline's calibrator does. ``layers``
    deepens a family whose config has no per-layer types (a run long enough to be killed midway)."""
    torch.manual_seed(seed)
    moe = family in MOE_CONFIGS
    config = (MOE_CONFIGS if moe else FAMILY_CONFIGS)[family]()
    if layers is not None:
        if getattr(config, "layer_types", None):
            raise ValueError(f"{family}'s tiny config lists its layers' types: deepen it there")
        config.num_hidden_layers = layers
    extra = {"experts_implementation": "eager"} if moe else {}
    model = AutoModelForCausalLM.from_config(config, **extra).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("_bias", ".bias")) or name.endswith("sinks"):
                p.normal_(0.0, 0.1)
            elif moe and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0.0, 0.05)  # transformers' init: std 0.02 over all experts; a little more signal
            elif moe and name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.normal_(0.0, 0.5)  # a decided router, as trained ones are: quantization noise flips few choices
    return model


def write_hub_checkpoint(model: torch.nn.Module, out: Path, max_shard: str = "4MB") -> Path:
    """Save ``model`` with transformers' own save_pretrained, sharded: a mixture of experts in the Hub's
    layout (one 2-D linear per expert and role, Mixtral's block_sparse_moe names), as real checkpoints."""
    model.save_pretrained(out, max_shard_size=max_shard)
    return out


def write_sharded_checkpoint(model: torch.nn.Module, out: Path, shards: int = 2) -> Path:
    """Save ``model`` as sharded safetensors plus index and config, tensors split round-robin by block."""
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    names = sorted(sd)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for i, n in enumerate(names):
        parts[i % shards][n] = sd[n]
    weight_map = {}
    for s, part in enumerate(parts):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(out)
    return out


def tiny_checkpoint_with_tokenizer(out: Path, smollm2_dir: Path, layers: int, shards: int, seed: int) -> Path:
    """A random tiny GQA Llama of ``layers`` blocks with SmolLM2's tokenizer, sharded in ``shards`` files."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=layers, vocab_size=49152))
    return copy_tokenizer(write_sharded_checkpoint(model, out, shards=shards), smollm2_dir)


def copy_tokenizer(ck: Path, smollm2_dir: Path) -> Path:
    """Give checkpoint ``ck`` SmolLM2's tokenizer files (calibration and evaluation need one)."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ck / f).write_bytes((smollm2_dir / f).read_bytes())
    return ck


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    from pipeline.fixtures import write_smollm2

    return write_smollm2(tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="session")
def texts_dir(tmp_path_factory) -> Path:
    from pipeline.fixtures import write_texts

    out = tmp_path_factory.mktemp("texts")
    write_texts(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_dir) -> Path:
    """A random 3-block GQA Llama with SmolLM2's tokenizer, sharded in two files."""
    return tiny_checkpoint_with_tokenizer(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir, 3, 2, 0)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pipeline import ray_env

    started = ray_env.connect(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_checkpoint, texts_dir, ray_local):
    """``tiny_runs(method) -> (output dir, report)``: one pipeline run of ``tiny_checkpoint`` per method
    at ``tests.test_pipeline._cfg``'s settings, made on first use and shared by the tests that need such
    an output (each run costs ~10 s of actor start-up). Read-only: copy it before changing it."""
    from pipeline.driver import run
    from tests.test_pipeline import _cfg

    done: dict[str, tuple[Path, dict]] = {}

    def get(method: str) -> tuple[Path, dict]:
        if method not in done:
            d = tmp_path_factory.mktemp(f"tiny-{method}")
            cfg = _cfg(tiny_checkpoint, d / "out", texts_dir / "calib.txt", method=method, report=str(d / "r.json"))
            done[method] = (d / "out", run(cfg, log=lambda m: None))
        return done[method]

    return get


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 with a bucket ``lsiq``."""
    from tests.s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    server.make_bucket("lsiq")
    yield server
    server.stop(timeout=3)  # a throwaway data dir: no need for weed's 15 s graceful filer shutdown


def upload_dir(server, local_dir: Path, prefix: str) -> str:
    """Copy the files of ``local_dir`` to ``s3://lsiq/PREFIX``; returns that URL."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
    for p in sorted(local_dir.iterdir()):
        if p.is_file():
            fs.pipe_file(f"lsiq/{prefix}/{p.name}", p.read_bytes())
    return f"s3://lsiq/{prefix}"
