#!/usr/bin/env python3
"""Rewrites a checkpoint folder written by `decimamba bench --shape S --save-checkpoint DIR`
(mamba_ssm's layout: config keys d_model/n_layer/ssm_cfg, tensor backbone.embedding.weight,
tied lm_head) into the Hugging Face transformers MambaForCausalLM layout that llama.cpp's
convert_hf_to_gguf.py reads (vendor/llama.cpp/conversion/mamba.py, class MambaModel): an HF
config.json with "architectures": ["MambaForCausalLM"], the same tensors under transformers'
names (only backbone.embedding -> backbone.embeddings differs; the data bytes are copied
unchanged, so the GGUF holds exactly the weights decimamba benchmarks), and the GPT-NeoX-20B
tokenizer (tokenizer.json + tokenizer_config.json), which the converter turns into a gpt2-BPE
vocab padded to the model's vocab_size. Standard library only (no torch or numpy).

    python3 scripts/gguf_from_random.py --checkpoint /tmp/ckpt \\
        --tokenizer assets/gpt-neox-20b-tokenizer.json.gz --out /tmp/hf-130m
"""
import argparse
import gzip
import json
import shutil
import struct
import sys
from pathlib import Path

# mamba_ssm name -> transformers name; every other tensor name is the same in both layouts
# (transformers' MambaModel calls the embedding `embeddings`).
RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def fail(msg):
    sys.exit(f"error: {msg}")


def read_header(path):
    """The safetensors JSON header of `path` and the byte offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            fail(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            fail(f"{path} has an unreadable safetensors header: {e}")
    return header, 8 + n


def rewrite_safetensors(src, dst):
    """Copies `src` to `dst` with tensors renamed per RENAMES. Only the header changes: the
    offsets are relative to the data section, which is copied byte for byte."""
    header, data_start = read_header(src)
    out = {"__metadata__": {"format": "pt"}}
    for name, info in header.items():
        if name != "__metadata__":
            out[RENAMES.get(name, name)] = info
    blob = json.dumps(out, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as safetensors writers do
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(struct.pack("<Q", len(blob)))
        fo.write(blob)
        fi.seek(data_start)
        shutil.copyfileobj(fi, fo, 1 << 24)
    return out


def hf_config(src_cfg, tensors):
    """transformers' MambaConfig for the shape in decimamba's config.json, checked against
    the tensors (the converter asserts d_inner == 2 * d_model)."""
    d = src_cfg["d_model"]
    if not src_cfg.get("rms_norm", True):
        fail("the checkpoint uses LayerNorm; transformers' and llama.cpp's Mamba use RMSNorm only")
    vocab = tensors["backbone.embeddings.weight"]["shape"][0]  # already padded by decimamba
    d_inner, d_conv = tensors["backbone.layers.0.mixer.conv1d.weight"]["shape"][0::2]
    d_state = tensors["backbone.layers.0.mixer.A_log"]["shape"][1]
    dt_rank = tensors["backbone.layers.0.mixer.dt_proj.weight"]["shape"][1]
    if d_inner != 2 * d:
        fail(f"d_inner {d_inner} is not 2 x d_model {d}: convert_hf_to_gguf.py requires expand 2")
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "hidden_size": d,
        "num_hidden_layers": src_cfg["n_layer"],
        "vocab_size": vocab,
        "pad_vocab_size_multiple": src_cfg.get("pad_vocab_size_multiple", 8),
        "state_size": d_state,
        "expand": 2,
        "conv_kernel": d_conv,
        "time_step_rank": dt_rank,
        "intermediate_size": d_inner,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        "use_bias": False,
        "use_conv_bias": "backbone.layers.0.mixer.conv1d.bias" in tensors,
        "residual_in_fp32": bool(src_cfg.get("residual_in_fp32", True)),
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="folder from --save-checkpoint")
    p.add_argument("--tokenizer", required=True, type=Path, help="GPT-NeoX-20B tokenizer.json (or .json.gz)")
    p.add_argument("--out", required=True, type=Path, help="HF-layout folder to write")
    a = p.parse_args()
    src_st, src_cfg = a.checkpoint / "model.safetensors", a.checkpoint / "config.json"
    for f in (src_st, src_cfg, a.tokenizer):
        if not f.is_file():
            fail(f"{f} not found")
    a.out.mkdir(parents=True, exist_ok=True)
    header = rewrite_safetensors(src_st, a.out / "model.safetensors")
    if "backbone.embeddings.weight" not in header:
        fail(f"{src_st} has no backbone.embedding.weight: not a decimamba/mamba_ssm checkpoint")
    cfg = hf_config(json.loads(src_cfg.read_text()), header)
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    opener = gzip.open if a.tokenizer.suffix == ".gz" else open
    with opener(a.tokenizer, "rb") as fi, open(a.out / "tokenizer.json", "wb") as fo:
        shutil.copyfileobj(fi, fo)
    # GPT-NeoX-20B's own tokenizer_config: no BOS added, <|endoftext|> (id 0) for all specials.
    tok_cfg = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|endoftext|>",
               "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 1 << 20}
    (a.out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    print(f"wrote {a.out} (MambaForCausalLM, d_model {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"vocab {cfg['vocab_size']})")


if __name__ == "__main__":
    main()
