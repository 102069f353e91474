#!/usr/bin/env python3
"""Independent PyTorch reference for a pipeswarm checkpoint: next-token loss of the model.

Reads a safetensors checkpoint (parsed here with json + struct + torch.frombuffer; the
safetensors package is not needed) and the Hugging Face config.json beside it, runs the
Llama forward exactly as transformers' modeling_llama.py (LlamaForCausalLM, eager
attention, float32) computes it, and prints the mean next-token cross-entropy over the
first K consecutive non-overlapping windows of seq_len+1 tokens of the data, as JSON:

    {"loss": 5.61, "windows": 8, "seq_len": 16, "tokens": 128}

If `transformers` is importable it also loads the same weights into LlamaForCausalLM and
adds "loss_transformers" to the output.

The data is a file's raw bytes (token id = byte, --data), a raw little-endian array of
token ids without a header (--tokens, --token-dtype uint16|int32), or a JSON file holding a
list of ids or an object with one under "ids" (--token-json; e.g. what a tokenizer printed).
Ids must be below config.json's vocab_size.

    python3 bench/hf_llama_loss.py --checkpoint run/model.safetensors \
        --data input.txt --seq-len 128 --windows 16

Only torch is required (tested with torch 1.13).
"""

import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

MAX_HEADER = 100_000_000
DTYPES = {"F32": (torch.float32, 4)}


def read_safetensors(path):
    """Returns ({name: tensor}, metadata) from a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: {len(blob)} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER or 8 + n > len(blob):
        raise ValueError(f"{path}: header length {n} out of range")
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", None) or {}
    data = bytearray(blob[8 + n :])  # writable, so frombuffer does not warn
    tensors, end = {}, 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        dtype, size = DTYPES.get(e["dtype"], (None, None))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name}: dtype {e['dtype']} not supported")
        b, en = e["data_offsets"]
        count = math.prod(e["shape"])
        if b != end or en - b != count * size or en > len(data):
            raise ValueError(f"{path}: tensor {name}: bad data_offsets {[b, en]}")
        end = en
        t = torch.frombuffer(data, dtype=dtype, count=count, offset=b) if count else torch.empty(0, dtype=dtype)
        if sys.byteorder != "little":
            t = t.byteswap()  # pragma: no cover
        tensors[name] = t.reshape(e["shape"]).clone()
    if end != len(data):
        raise ValueError(f"{path}: {len(data) - end} bytes after the last tensor")
    return tensors, meta


# --- modeling_llama.py, transcribed (eager attention, no KV cache, float32) -----------


def rms_norm(hidden, weight, eps):
    # LlamaRMSNorm.forward
    input_dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def rotary_cos_sin(head_dim, theta, position_ids):
    # LlamaRotaryEmbedding (rope_type "default", attention_scaling 1.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    position_ids_expanded = position_ids[:, None, :].float()
    freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def attention(w, p, hidden, cos, sin, mask, n_heads, n_kv_heads, head_dim):
    # LlamaAttention.forward + eager_attention_forward
    input_shape = hidden.shape[:-1]
    q = F.linear(hidden, w[p + "q_proj.weight"]).view(*input_shape, -1, head_dim).transpose(1, 2)
    k = F.linear(hidden, w[p + "k_proj.weight"]).view(*input_shape, -1, head_dim).transpose(1, 2)
    v = F.linear(hidden, w[p + "v_proj.weight"]).view(*input_shape, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = n_heads // n_kv_heads  # repeat_kv
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * head_dim**-0.5
    scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    out = out.reshape(*input_shape, -1).contiguous()
    return F.linear(out, w[p + "o_proj.weight"])


def mlp(w, p, x):
    # LlamaMLP.forward, hidden_act "silu"
    return F.linear(F.silu(F.linear(x, w[p + "gate_proj.weight"])) * F.linear(x, w[p + "up_proj.weight"]), w[p + "down_proj.weight"])


def causal_lm_loss(w, cfg, input_ids):
    """LlamaForCausalLM(input_ids, labels=input_ids).loss, transcribed."""
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("config outside what this reference implements (silu, no biases)")
    if cfg.get("rope_scaling"):
        raise ValueError("rope_scaling is not implemented here")
    d = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or d // n_heads
    eps = cfg["rms_norm_eps"]
    b, t = input_ids.shape
    hidden = F.embedding(input_ids, w["model.embed_tokens.weight"])
    position_ids = torch.arange(t)[None, :].expand(b, -1)
    cos, sin = rotary_cos_sin(head_dim, cfg.get("rope_theta", 10000.0), position_ids)
    min_value = torch.finfo(hidden.dtype).min
    mask = torch.triu(torch.full((t, t), min_value, dtype=hidden.dtype), diagonal=1)[None, None]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        residual = hidden
        h = rms_norm(hidden, w[p + "input_layernorm.weight"], eps)
        h = attention(w, p + "self_attn.", h, cos, sin, mask, n_heads, n_kv, head_dim)
        hidden = residual + h
        residual = hidden
        h = rms_norm(hidden, w[p + "post_attention_layernorm.weight"], eps)
        hidden = residual + mlp(w, p + "mlp.", h)
    hidden = rms_norm(hidden, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    logits = F.linear(hidden, head).float()
    # ForCausalLMLoss: shift so that tokens < n predict n.
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")


def transformers_loss(w, cfg, input_ids):
    """The same loss from transformers' own LlamaForCausalLM, or None if not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    try:
        config._attn_implementation = "eager"
    except Exception:  # older versions
        pass
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(w, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"transformers: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        return model(input_ids=input_ids, labels=input_ids).loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="safetensors file (full model)")
    ap.add_argument("--config", help="config.json (default: beside the checkpoint)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="file whose bytes are the tokens")
    src.add_argument("--tokens", help="raw little-endian token ids, no header")
    src.add_argument("--token-json", help='JSON list of token ids, or an object with the list under "ids"')
    ap.add_argument("--token-dtype", choices=["uint16", "int32"], default="int32")
    ap.add_argument("--seq-len", type=int, required=True, help="predictions per window (window = seq_len+1 tokens)")
    ap.add_argument("--windows", type=int, required=True, help="number of consecutive windows from the start")
    args = ap.parse_args()

    config_path = args.config or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
    with open(config_path) as f:
        cfg = json.load(f)
    weights, _ = read_safetensors(args.checkpoint)

    if args.data:
        with open(args.data, "rb") as f:
            ids = list(f.read())
    elif args.token_json:
        with open(args.token_json) as f:
            doc = json.load(f)
        ids = doc["ids"] if isinstance(doc, dict) else doc
        if not all(isinstance(i, int) for i in ids):
            sys.exit(f"{args.token_json}: want a list of integer token ids")
    else:
        with open(args.tokens, "rb") as f:
            raw = f.read()
        fmt, size = {"uint16": ("H", 2), "int32": ("i", 4)}[args.token_dtype]
        ids = list(struct.unpack(f"<{len(raw) // size}{fmt}", raw[: len(raw) - len(raw) % size]))
    window = args.seq_len + 1
    if args.seq_len < 1 or args.windows < 1 or len(ids) < args.windows * window:
        sys.exit(f"need {args.windows} windows of {window} tokens, have {len(ids)} tokens")
    input_ids = torch.tensor(ids[: args.windows * window], dtype=torch.int64).view(args.windows, window)
    if int(input_ids.max()) >= cfg["vocab_size"] or int(input_ids.min()) < 0:
        sys.exit(f"token ids outside vocab_size {cfg['vocab_size']}")

    torch.set_grad_enabled(False)
    out = {"loss": causal_lm_loss(weights, cfg, input_ids).item(), "windows": args.windows,
           "seq_len": args.seq_len, "tokens": args.windows * args.seq_len}
    hf = transformers_loss(weights, cfg, input_ids)
    if hf is not None:
        out["loss_transformers"] = hf
    print(json.dumps(out))


if __name__ == "__main__":
    main()
