"""Convert an HF checkpoint folder or a GGUF file into model.pth + config.json + tokenizer files.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/ORG/NAME
    python scripts/convert_hf_checkpoint.py --gguf path/model.gguf --checkpoint_dir out/

The output config.json is an HF-style config (for GGUF, built from its metadata), so model.py reads every
checkpoint through the one mapping ModelArgs.from_hf_config. Files are written atomically.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model import ModelArgs  # noqa: E402

TOKENIZER_FILES = (  # text files copied beside the weights (tokenizer.model is copied as bytes)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja",
)  # fmt: skip

# HF name (with {} for the layer) -> (our name, slot) ; slot orders the pieces of fused matrices
HF_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", None),
    "model.layers.{}.input_layernorm.weight": ("layers.{}.attention_norm.weight", None),
    "model.layers.{}.post_attention_layernorm.weight": ("layers.{}.ffn_norm.weight", None),
    "model.layers.{}.self_attn.q_proj.weight": ("layers.{}.attention.wqkv.weight", 0),
    "model.layers.{}.self_attn.k_proj.weight": ("layers.{}.attention.wqkv.weight", 1),
    "model.layers.{}.self_attn.v_proj.weight": ("layers.{}.attention.wqkv.weight", 2),
    "model.layers.{}.self_attn.q_proj.bias": ("layers.{}.attention.wqkv.bias", 0),
    "model.layers.{}.self_attn.k_proj.bias": ("layers.{}.attention.wqkv.bias", 1),
    "model.layers.{}.self_attn.v_proj.bias": ("layers.{}.attention.wqkv.bias", 2),
    "model.layers.{}.self_attn.o_proj.weight": ("layers.{}.attention.wo.weight", None),
    "model.layers.{}.self_attn.o_proj.bias": ("layers.{}.attention.wo.bias", None),
    "model.layers.{}.self_attn.q_norm.weight": ("layers.{}.attention.q_norm.weight", None),
    "model.layers.{}.self_attn.k_norm.weight": ("layers.{}.attention.k_norm.weight", None),
    "model.layers.{}.mlp.gate_proj.weight": ("layers.{}.feed_forward.w13.weight", 0),
    "model.layers.{}.mlp.up_proj.weight": ("layers.{}.feed_forward.w13.weight", 1),
    "model.layers.{}.mlp.gate_proj.bias": ("layers.{}.feed_forward.w13.bias", 0),
    "model.layers.{}.mlp.up_proj.bias": ("layers.{}.feed_forward.w13.bias", 1),
    "model.layers.{}.mlp.down_proj.weight": ("layers.{}.feed_forward.w2.weight", None),
    "model.layers.{}.mlp.down_proj.bias": ("layers.{}.feed_forward.w2.bias", None),
}

GGUF_NAMES = {
    "token_embd.weight": ("tok_embeddings.weight", None),
    "output_norm.weight": ("norm.weight", None),
    "output.weight": ("output.weight", None),
    "blk.{}.attn_norm.weight": ("layers.{}.attention_norm.weight", None),
    "blk.{}.ffn_norm.weight": ("layers.{}.ffn_norm.weight", None),
    "blk.{}.attn_q.weight": ("layers.{}.attention.wqkv.weight", 0),
    "blk.{}.attn_k.weight": ("layers.{}.attention.wqkv.weight", 1),
    "blk.{}.attn_v.weight": ("layers.{}.attention.wqkv.weight", 2),
    "blk.{}.attn_q.bias": ("layers.{}.attention.wqkv.bias", 0),
    "blk.{}.attn_k.bias": ("layers.{}.attention.wqkv.bias", 1),
    "blk.{}.attn_v.bias": ("layers.{}.attention.wqkv.bias", 2),
    "blk.{}.attn_output.weight": ("layers.{}.attention.wo.weight", None),
    "blk.{}.attn_q_norm.weight": ("layers.{}.attention.q_norm.weight", None),
    "blk.{}.attn_k_norm.weight": ("layers.{}.attention.k_norm.weight", None),
    "blk.{}.ffn_gate.weight": ("layers.{}.feed_forward.w13.weight", 0),
    "blk.{}.ffn_up.weight": ("layers.{}.feed_forward.w13.weight", 1),
    "blk.{}.ffn_down.weight": ("layers.{}.feed_forward.w2.weight", None),
}

# GGUF architectures we read, and the HF model_type each becomes
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K")


class ConversionError(Exception):
    pass


def map_name(name: str, table: dict) -> tuple[str, int | None] | None:
    layer = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{layer.group(1)}.", ".{}.", 1) if layer else name
    if key not in table:
        return None
    ours, slot = table[key]
    return (ours.format(layer.group(1)) if layer else ours), slot


def assemble(pieces: dict[str, dict[int | None, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the slotted pieces of fused matrices (q|k|v, gate|up) along the output dim."""
    out = {}
    for name, parts in pieces.items():
        if None in parts:
            out[name] = parts[None]
        else:
            expected = 3 if "wqkv" in name else 2
            if sorted(parts) != list(range(expected)):
                raise ConversionError(f"incomplete fused weight {name}: found parts {sorted(parts)}")
            out[name] = torch.cat([parts[i] for i in range(expected)], dim=0)
    return out


def check_complete(state_dict: dict, config: dict) -> None:
    """Build the model on the meta device and compare key sets and shapes, like nanoGPT's from_pretrained."""
    from model import Transformer

    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf_config(config))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"checkpoint does not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, shape in expected.items():
        if state_dict[k].shape != shape:
            raise ConversionError(f"{k}: shape {tuple(state_dict[k].shape)} but the config implies {tuple(shape)}")


# ----------------------------------------------------------------------------- HF folders


def load_hf_tensors(checkpoint_dir: Path):
    """Yield (name, tensor) over the safetensors or pytorch_model*.bin shards of an HF folder."""
    st_files = sorted(checkpoint_dir.glob("*.safetensors"))
    bin_files = sorted(checkpoint_dir.glob("pytorch_model*.bin"))
    if not st_files and not bin_files:
        raise ConversionError(f"no *.safetensors or pytorch_model*.bin weights in {checkpoint_dir}")
    if st_files:
        from safetensors import safe_open

        for f in st_files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        yield name, sf.get_tensor(name)
            except Exception as e:
                raise ConversionError(f"cannot read {f}: {e}") from e
    else:
        for f in bin_files:
            try:
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise ConversionError(f"cannot read {f}: {e}") from e
            yield from sd.items()


def convert_hf(checkpoint_dir: Path) -> tuple[dict, dict]:
    config_path = checkpoint_dir / "config.json"
    if not config_path.exists():
        raise ConversionError(f"no config.json in {checkpoint_dir}")
    config = json.loads(config_path.read_text())
    ModelArgs.from_hf_config(config)  # fail early on unsupported architectures
    pieces: dict = {}
    names = list(load_hf_tensors(checkpoint_dir))
    for name, tensor in tqdm(names, desc="converting", unit="tensor"):
        mapped = map_name(name, HF_NAMES)
        if mapped is None:
            if "rotary_emb.inv_freq" in name:
                continue  # recomputed from the config
            raise ConversionError(f"unexpected tensor {name} in {checkpoint_dir}")
        ours, slot = mapped
        if ours == "output.weight" and config.get("tie_word_embeddings"):
            continue
        pieces.setdefault(ours, {})[slot] = tensor
    return assemble(pieces), config


# ----------------------------------------------------------------------------- GGUF files


def gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> dict:
    """An HF-style config dict from GGUF metadata."""
    arch = gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConversionError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHS)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConversionError("GGUF files with a rope_freqs tensor (Llama 3.1 scaling) are not supported; convert the HF checkpoint instead")

    def get(key, default=None):
        return gguf_value(reader, f"{arch}.{key}", default)

    n_head = get("attention.head_count")
    dim = get("embedding_length")
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "model_type": GGUF_ARCHS[arch],
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "vocab_size": int(vocab),
        "hidden_size": int(dim),
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": int(n_head),
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(get("attention.key_length", dim // n_head)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if get("attention.sliding_window"):
        config["model_type"] = "mistral" if arch == "llama" else config["model_type"]
        config["sliding_window"] = int(get("attention.sliding_window"))
    return config


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp stores llama q/k rows interleaved for pairwise rotary; HF (and we) use rotate-half
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize_gguf_tensor(t) -> torch.Tensor:
    import gguf

    kind = t.tensor_type.name
    if kind not in GGUF_TYPES:
        raise ConversionError(f"tensor {t.name} has GGUF type {kind}; supported: {', '.join(GGUF_TYPES)}")
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest first
    return torch.from_numpy(data.astype("float32", copy=False).reshape(shape).copy())


def convert_gguf(path: Path) -> tuple[dict, dict, dict]:
    import gguf

    from tokenizer import tokenizer_files_from_gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ConversionError(f"cannot read GGUF file {path}: {e}") from e
    config = gguf_config(reader)
    permuted = config["model_type"] in ("llama", "mistral")
    pieces: dict = {}
    for t in tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor"):
        mapped = map_name(t.name, GGUF_NAMES)
        if mapped is None:
            raise ConversionError(f"unexpected tensor {t.name} in {path}")
        w = dequantize_gguf_tensor(t)
        if permuted and re.search(r"attn_q\.(weight|bias)$", t.name):
            w = unpermute_rope(w, config["num_attention_heads"])
        elif permuted and re.search(r"attn_k\.(weight|bias)$", t.name):
            w = unpermute_rope(w, config["num_key_value_heads"])
        ours, slot = mapped
        pieces.setdefault(ours, {})[slot] = w
    return assemble(pieces), config, tokenizer_files_from_gguf(reader)


# ----------------------------------------------------------------------------- writing


def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(out_dir: Path, state_dict: dict, config: dict, text_files: dict[str, str]) -> Path:
    """Write config.json and tokenizer files, then model.pth last: its presence means a complete checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in {"config.json": json.dumps(config, indent=2), **text_files}.items():
        atomic_write(out_dir / name, lambda tmp, text=text: Path(tmp).write_text(text))
    target = out_dir / "model.pth"
    atomic_write(target, lambda tmp: torch.save(state_dict, tmp))
    return target


def convert(checkpoint_dir: Path | None = None, gguf_path: Path | None = None, out_dir: Path | None = None) -> Path:
    """Convert an HF folder (or the .gguf it holds, or an explicit GGUF file); returns the model.pth path."""
    if gguf_path is None and checkpoint_dir is not None:
        if not checkpoint_dir.is_dir():
            raise ConversionError(f"checkpoint folder {checkpoint_dir} does not exist")
        if not (checkpoint_dir / "config.json").exists():
            ggufs = sorted(checkpoint_dir.glob("*.gguf"))
            if len(ggufs) > 1:
                raise ConversionError(f"several .gguf files in {checkpoint_dir}; choose one with --gguf")
            gguf_path = ggufs[0] if ggufs else None
    if gguf_path is not None:
        if not gguf_path.is_file():
            raise ConversionError(f"GGUF file {gguf_path} does not exist")
        state_dict, config, text_files = convert_gguf(gguf_path)
        out_dir = out_dir or checkpoint_dir or gguf_path.parent
    else:
        state_dict, config = convert_hf(checkpoint_dir)
        text_files = {n: (checkpoint_dir / n).read_text() for n in TOKENIZER_FILES if (checkpoint_dir / n).exists()}
        out_dir = out_dir or checkpoint_dir
    check_complete(state_dict, config)
    target = save_checkpoint(out_dir, state_dict, config, text_files)
    sp_model = checkpoint_dir / "tokenizer.model" if checkpoint_dir else None  # binary: copied, not re-encoded
    if sp_model and sp_model.exists() and sp_model.resolve() != (out_dir / sp_model.name).resolve():
        shutil.copyfile(sp_model, out_dir / sp_model.name)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, help="HF folder (config.json + weights) or a folder holding one .gguf")
    parser.add_argument("--gguf", type=Path, help="a GGUF file to convert")
    parser.add_argument("--out_dir", type=Path, help="where to write model.pth (default: beside the input)")
    parser.add_argument("--model_name", help="ignored; accepted for gpt-fast compatibility")
    args = parser.parse_args(argv)
    if args.checkpoint_dir is None and args.gguf is None:
        parser.error("give --checkpoint_dir or --gguf")
    try:
        target = convert(args.checkpoint_dir, args.gguf, args.out_dir)
    except (ConversionError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
