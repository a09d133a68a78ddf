#!/usr/bin/env python3
"""Build the image-encoder and preprocessing parity fixtures under tests/fixtures/.

Run from the repository root with the reference environment:

    /tmp/refenv/bin/python scripts/make_encoder_fixtures.py

Nothing is downloaded: every model is built from a small config with seeded random
weights, and the photographs come from scikit-image's bundled data directory.
The Rust tests only read the files this script writes; they never need Python.

Output (see tests/fixtures/README.md for the full description):
  tests/fixtures/encoders/<name>/   a Hugging Face style model directory per encoder
                                    (config.json, model.safetensors, preprocessor_config.json)
                                    plus reference.safetensors (inputs and PyTorch outputs)
                                    and fixture.json (versions, shapes, notes).
  tests/fixtures/preprocess/        source PNGs, <family>.safetensors (pixel_values per
                                    image, float16) and preprocess.json (exact settings).

Options:
  --only NAME[,NAME...]   build only these fixtures (encoder names or "preprocess").
  --materialize-resnet50 PATH
                          also write the full procedural ResNet-50 weights as a
                          torchvision-named safetensors file at PATH (about 100 MB; not
                          committed, for manual experiments).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL
import safetensors
import safetensors.torch
import skimage
import torch
import torchvision
import transformers
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures"
ENC = OUT / "encoders"
PRE = OUT / "preprocess"
SCRIPT = "scripts/make_encoder_fixtures.py"

# Determinism: one thread (reduction order) and deterministic kernels.
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
# oneDNN picks convolution kernels by memory alignment, so the same weights loaded from
# disk could give outputs 1 ulp apart; the native CPU convolution does not.
torch.backends.mkldnn.enabled = False

VERSIONS = {
    "python": ".".join(map(str, sys.version_info[:3])),
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "transformers": transformers.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "pillow": PIL.__version__,
    "scikit-image": skimage.__version__,
}

BATCH = 2


# ----------------------------------------------------------------------------- helpers


def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_tensors(path: Path, tensors: dict, info: dict) -> None:
    """safetensors with a single metadata key (several keys are written in a random
    order by the safetensors writer, which would make the bytes non-deterministic)."""
    meta = {"fixture": json.dumps(info, sort_keys=True, separators=(",", ":"))}
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def shape_table(tensors: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}


def safetensors_keys(path: Path) -> dict:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def key_prefixes(keys) -> list:
    """Top-level name prefixes, e.g. vision_model.embeddings, visual_projection."""
    out = set()
    for k in keys:
        parts = k.split(".")
        out.add(".".join(parts[:2]) if len(parts) > 2 else parts[0])
    return sorted(out)


EMBEDDING_LIKE = ("class_embedding", "position_embedding", "cls_token", "probe", "token_embedding", "mask_token")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter and BatchNorm statistic a seeded, non-trivial random value.

    Default initialisations leave LayerNorm at (1, 0), biases at 0 and BN stats at
    (0, 1), which would hide swapped or missing tensors in a port. Scales keep the
    activations O(1) so attention softmaxes are neither uniform nor one-hot."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        if any(s in name for s in EMBEDDING_LIKE):
            v = torch.randn(p.shape, generator=g) * 0.5
        elif p.ndim >= 2:
            fan_in = p[0].numel()
            v = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        elif name.endswith("weight"):  # LayerNorm / BatchNorm scale
            v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith("bias"):  # includes in_proj_bias
            v = 0.1 * torch.randn(p.shape, generator=g)
        elif name in ("logit_scale", "logit_bias"):
            continue  # keep the model defaults; they do not touch image features
        else:
            raise RuntimeError(f"randomize_: unhandled parameter {name} {tuple(p.shape)}")
        p.copy_(v.to(p.dtype))
    buffers = dict(model.named_buffers())
    for name in sorted(buffers):
        b = buffers[name]
        if name.endswith("running_mean"):
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))


def seeded_pixels(seed: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def write_fixture_json(d: Path, info: dict, outputs: dict) -> None:
    info = dict(info)
    info["generator"] = f"/tmp/refenv/bin/python {SCRIPT}"
    info["versions"] = VERSIONS
    info["reference_tensors"] = shape_table(outputs)
    files = sorted(p.name for p in d.iterdir()) + ["fixture.json"]
    info["files"] = sorted(set(files))
    if (d / "model.safetensors").exists():
        keys = safetensors_keys(d / "model.safetensors")
        info["model_tensor_count"] = len(keys)
        info["model_tensor_prefixes"] = key_prefixes(keys)
    dump_json(d / "fixture.json", info)


def f64_gap(model, fn, inputs) -> dict:
    """Max |float32 - float64| of every output: a tolerance hint for ports."""
    m64 = model.double()
    with torch.no_grad():
        out64 = fn(m64, {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()})
    model.float()
    return out64


# ------------------------------------------------------------------- tiny transformers


TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8, num_channels=3)


def run_and_save(name: str, model, forward, pixel_inputs: dict, info: dict, proc=None):
    """Shared tail: save_pretrained, processor config, reference outputs, fixture.json."""
    d = fresh_dir(ENC / name)
    model.eval()
    with torch.no_grad():
        outputs = forward(model, pixel_inputs)
    out64 = f64_gap(model, forward, pixel_inputs)
    info["float32_vs_float64_max_abs"] = {k: max_abs(outputs[k], out64[k]) for k in outputs}
    model.save_pretrained(str(d))
    if proc is not None:
        proc.save_pretrained(str(d))
    tensors = dict(pixel_inputs)
    tensors.update(outputs)
    meta = {"model": name, "versions": VERSIONS, "model_class": info.get("model_class")}
    save_tensors(d / "reference.safetensors", tensors, meta)
    write_fixture_json(d, info, tensors)
    # Re-load with transformers and check the saved directory reproduces the outputs.
    cls = type(model)
    reloaded = cls.from_pretrained(str(d), attn_implementation="eager").eval()
    # Loaded tensors can sit at addresses that are not 64-byte aligned, and CPU kernels
    # may then sum in another order (1 ulp differences). Fresh copies use the allocator's
    # alignment, as the in-memory model did, so the comparison can be bit-exact.
    with torch.no_grad():
        for t in list(reloaded.parameters()) + list(reloaded.buffers()):
            t.data = t.data.clone()
    with torch.no_grad():
        again = forward(reloaded, pixel_inputs)
    for k in outputs:
        if not torch.equal(outputs[k], again[k]):
            raise RuntimeError(f"{name}: output {k} differs after save/load round trip")
    print(f"[ok] {name}: {', '.join(f'{k}{tuple(v.shape)}' for k, v in tensors.items())}")


def clip_processor(size: int):
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    # openai/clip-vit-*: shortest edge 224, bicubic, center crop 224, OpenAI mean/std.
    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC, do_center_crop=True, do_convert_rgb=True,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))


def siglip_processor(size: int):
    from transformers import SiglipImageProcessorPil
    from transformers.image_utils import PILImageResampling

    # google/siglip2-*-224 (fixed resolution): squash to size x size, bilinear, mean/std 0.5.
    return SiglipImageProcessorPil(
        size={"height": size, "width": size}, resample=PILImageResampling.BILINEAR,
        do_convert_rgb=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def vit_processor(size: int):
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import PILImageResampling

    # google/vit-base-patch16-224: squash to 224 x 224, bilinear, mean/std 0.5, no RGB conversion.
    return ViTImageProcessorPil(
        size={"height": size, "width": size}, resample=PILImageResampling.BILINEAR,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def clip_vision_cfg():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**TINY_VIT, projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip_text_cfg():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
                          hidden_act="quick_gelu")


def build_clip_vision():
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(clip_vision_cfg())
    model.set_attn_implementation("eager")
    randomize_(model, 101)
    px = seeded_pixels(1101, BATCH, 3, 32, 32)

    def fwd(m, inp):
        o = m(pixel_values=inp["pixel_values"])
        return {"pooler_output": o.pooler_output, "last_hidden_state": o.last_hidden_state}

    info = {
        "model_class": "transformers.CLIPVisionModel",
        "hf_equivalent": "vision tower of openai/clip-vit-base-patch32 (scaled down)",
        "seed": 101,
        "pixel_values_seed": 1101,
        "attn_implementation": "eager",
        "notes": [
            "last_hidden_state is the raw encoder output (NOT post-layernormed); "
            "pooler_output = post_layernorm(last_hidden_state[:, 0]).",
            "transformers 5 saves CLIPVisionModel WITHOUT the 'vision_model.' prefix "
            "(transformers 4.x and hub checkpoints have it; transformers 5 strips it on load).",
            "The pre-encoder LayerNorm is spelled 'pre_layrnorm' (sic).",
            "hidden_act is quick_gelu: x * sigmoid(1.702 x).",
        ],
    }
    run_and_save("clip_vision", model, fwd, {"pixel_values": px}, info, clip_processor(32))


def build_clip_vision_proj():
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(clip_vision_cfg())
    model.set_attn_implementation("eager")
    randomize_(model, 102)
    px = seeded_pixels(1102, BATCH, 3, 32, 32)

    def fwd(m, inp):
        o = m(pixel_values=inp["pixel_values"])
        v = m.vision_model(pixel_values=inp["pixel_values"])
        return {"image_embeds": o.image_embeds, "pooler_output": v.pooler_output,
                "last_hidden_state": o.last_hidden_state}

    info = {
        "model_class": "transformers.CLIPVisionModelWithProjection",
        "hf_equivalent": "image encoder of openai/clip-vit-* as used standalone (e.g. diffusers image_encoder)",
        "seed": 102,
        "pixel_values_seed": 1102,
        "attn_implementation": "eager",
        "notes": [
            "Tensor names keep the 'vision_model.' prefix here, plus 'visual_projection.weight' "
            "(no bias). image_embeds = visual_projection(pooler_output), NOT L2-normalised.",
        ],
    }
    run_and_save("clip_vision_proj", model, fwd, {"pixel_values": px}, info, clip_processor(32))


def build_clip_full():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=clip_text_cfg().to_dict(), vision_config=clip_vision_cfg().to_dict(),
                     projection_dim=16)
    model = CLIPModel(cfg)
    model.set_attn_implementation("eager")
    randomize_(model, 103)
    px = seeded_pixels(1103, BATCH, 3, 32, 32)

    def fwd(m, inp):
        feats = m.get_image_features(pixel_values=inp["pixel_values"])
        # transformers 5: get_image_features returns a BaseModelOutputWithPooling whose
        # pooler_output is the *projected* embedding.
        emb = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        v = m.vision_model(pixel_values=inp["pixel_values"])
        return {"image_embeds": emb, "pooler_output": v.pooler_output,
                "last_hidden_state": v.last_hidden_state}

    info = {
        "model_class": "transformers.CLIPModel",
        "hf_equivalent": "openai/clip-vit-base-patch32 layout (full model: text + vision towers)",
        "seed": 103,
        "pixel_values_seed": 1103,
        "attn_implementation": "eager",
        "notes": [
            "Full checkpoint: vision tensors under 'vision_model.', text under 'text_model.', "
            "'visual_projection.weight', 'text_projection.weight', 'logit_scale'.",
            "image_embeds = get_image_features(pixel_values) = visual_projection(vision pooler_output), "
            "not normalised. In transformers 5 get_image_features returns a "
            "BaseModelOutputWithPooling (the embedding is its .pooler_output), not a tensor.",
            "No tokenizer files are written (not needed for image features).",
        ],
    }
    run_and_save("clip_full", model, fwd, {"pixel_values": px}, info, clip_processor(32))


def siglip_vision_cfg():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**TINY_VIT, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                              vision_use_head=True)


SIGLIP_NOTES = [
    "Fixed-resolution SigLIP2 checkpoints (google/siglip2-{base,large,so400m,giant}-patch*-{224,256,384,512}) "
    "are SigLIP-architecture models: model_type 'siglip' (vision_config model_type 'siglip_vision_model'), "
    "loaded by SiglipModel / SiglipVisionModel. Siglip2VisionModel is the NaFlex variant (see siglip2_naflex).",
    "last_hidden_state IS post_layernorm'ed (unlike CLIP); pooler_output = head(last_hidden_state) "
    "(multi-head attention pooling with a learned probe, head.attention is a torch nn.MultiheadAttention: "
    "in_proj_weight/in_proj_bias hold q,k,v stacked in that order).",
    "patch_embedding is a Conv2d WITH bias; position_embedding has num_patches rows (no CLS token).",
    "hidden_act gelu_pytorch_tanh (tanh approximation); layer_norm_eps 1e-6.",
]


def build_siglip2():
    from transformers import SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(siglip_vision_cfg())
    model.set_attn_implementation("eager")
    randomize_(model, 104)
    px = seeded_pixels(1104, BATCH, 3, 32, 32)

    def fwd(m, inp):
        o = m(pixel_values=inp["pixel_values"])
        return {"pooler_output": o.pooler_output, "last_hidden_state": o.last_hidden_state}

    info = {
        "model_class": "transformers.SiglipVisionModel",
        "hf_equivalent": "vision tower of google/siglip2-base-patch16-224 (fixed resolution, scaled down)",
        "seed": 104,
        "pixel_values_seed": 1104,
        "attn_implementation": "eager",
        "notes": SIGLIP_NOTES + [
            "transformers 5 saves SiglipVisionModel WITHOUT the 'vision_model.' prefix; the real "
            "google/siglip2-* checkpoints are full SiglipModel files where the same tensors sit under "
            "'vision_model.' (see siglip2_full).",
        ],
    }
    run_and_save("siglip2", model, fwd, {"pixel_values": px}, info, siglip_processor(32))


def build_siglip2_full():
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig

    torch.manual_seed(0)
    text = SiglipTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16,
                            hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    cfg = SiglipConfig(text_config=text.to_dict(), vision_config=siglip_vision_cfg().to_dict())
    model = SiglipModel(cfg)
    model.set_attn_implementation("eager")
    randomize_(model, 105)
    px = seeded_pixels(1105, BATCH, 3, 32, 32)

    def fwd(m, inp):
        feats = m.get_image_features(pixel_values=inp["pixel_values"])
        emb = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        v = m.vision_model(pixel_values=inp["pixel_values"])
        return {"image_embeds": emb, "pooler_output": v.pooler_output,
                "last_hidden_state": v.last_hidden_state}

    info = {
        "model_class": "transformers.SiglipModel",
        "hf_equivalent": "google/siglip2-base-patch16-224 layout (full model, model_type 'siglip')",
        "seed": 105,
        "pixel_values_seed": 1105,
        "attn_implementation": "eager",
        "notes": SIGLIP_NOTES + [
            "Full checkpoint: 'vision_model.*', 'text_model.*', 'logit_scale', 'logit_bias'. "
            "SigLIP has no visual projection: image_embeds == vision pooler_output.",
            "No tokenizer files are written (the real SigLIP2 checkpoints use a Gemma tokenizer).",
        ],
    }
    run_and_save("siglip2_full", model, fwd, {"pixel_values": px}, info, siglip_processor(32))


def build_siglip2_naflex():
    from transformers import Siglip2ImageProcessorPil, Siglip2VisionConfig, Siglip2VisionModel
    from transformers.image_utils import PILImageResampling

    torch.manual_seed(0)
    cfg = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_channels=3, patch_size=4, num_patches=16, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6, vision_use_head=True)
    model = Siglip2VisionModel(cfg)
    model.set_attn_implementation("eager")
    randomize_(model, 106)
    # Two random images of different aspect ratios through the real NaFlex processor
    # (patch 16 / max 256 patches scaled down to patch 4 / max 16 patches).
    proc = Siglip2ImageProcessorPil(patch_size=4, max_num_patches=16, resample=PILImageResampling.BILINEAR,
                                    do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    rng = np.random.default_rng(1106)
    imgs = [Image.fromarray(rng.integers(0, 256, (20, 37, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (41, 23, 3), dtype=np.uint8))]
    enc = proc(images=imgs, return_tensors="pt")
    inputs = {"pixel_values": enc["pixel_values"].float(),
              "pixel_attention_mask": enc["pixel_attention_mask"].to(torch.int64),
              "spatial_shapes": enc["spatial_shapes"].to(torch.int64)}

    def fwd(m, inp):
        o = m(pixel_values=inp["pixel_values"], pixel_attention_mask=inp["pixel_attention_mask"],
              spatial_shapes=inp["spatial_shapes"])
        return {"pooler_output": o.pooler_output, "last_hidden_state": o.last_hidden_state}

    info = {
        "model_class": "transformers.Siglip2VisionModel",
        "hf_equivalent": "vision tower of google/siglip2-base-patch16-naflex (scaled down)",
        "seed": 106,
        "inputs": "two random uint8 images (20x37 and 41x23, HxW; numpy seed 1106) through "
                  "Siglip2ImageProcessorPil(patch_size=4, max_num_patches=16)",
        "attn_implementation": "eager",
        "notes": [
            "NaFlex: pixel_values are already patchified (B, max_num_patches, patch*patch*3, "
            "flattened in (ph, pw, c) order) and padded; pixel_attention_mask (B, max_num_patches) "
            "marks real patches; spatial_shapes (B, 2) = (patches_h, patches_w).",
            "patch_embedding is a Linear (not Conv2d); position_embedding has num_patches rows and is "
            "resized per image (bilinear, antialias=True) to spatial_shapes.",
            "last_hidden_state rows beyond the mask are padding and carry no meaning.",
        ],
    }
    run_and_save("siglip2_naflex", model, fwd, inputs, info, proc)


def vit_cfg():
    from transformers import ViTConfig

    return ViTConfig(**TINY_VIT, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_vit():
    from transformers import ViTModel

    torch.manual_seed(0)
    model = ViTModel(vit_cfg(), add_pooling_layer=True)
    model.set_attn_implementation("eager")
    randomize_(model, 107)
    px = seeded_pixels(1107, BATCH, 3, 32, 32)

    def fwd(m, inp):
        o = m(pixel_values=inp["pixel_values"], output_hidden_states=True)
        lhs = o.last_hidden_state
        # Verify the claim that last_hidden_state is already after the final layernorm.
        manual = m.layernorm(o.hidden_states[-1])
        if not torch.allclose(manual, lhs, atol=0, rtol=0):
            raise RuntimeError("ViT last_hidden_state is not layernorm(encoder output)")
        return {"last_hidden_state": lhs, "cls_after_layernorm": lhs[:, 0].contiguous(),
                "pooler_output": o.pooler_output}

    info = {
        "model_class": "transformers.ViTModel",
        "add_pooling_layer": True,
        "hf_equivalent": "google/vit-base-patch16-224-in21k style ViTModel (scaled down)",
        "seed": 107,
        "pixel_values_seed": 1107,
        "attn_implementation": "eager",
        "notes": [
            "last_hidden_state = layernorm(encoder output) (checked bit-exactly against "
            "model.layernorm(hidden_states[-1]) when generating); cls_after_layernorm = last_hidden_state[:, 0].",
            "The pooler exists (add_pooling_layer=True, the ViTModel default): pooler_output = "
            "tanh(pooler.dense(cls_after_layernorm)). ViTForImageClassification checkpoints "
            "(e.g. google/vit-base-patch16-224) have no pooler and use cls_after_layernorm (see vit_cls).",
            "No 'vit.' prefix: ViTModel tensors are 'embeddings.*', 'encoder.layer.N.*', 'layernorm.*', 'pooler.*'.",
            "hidden_act 'gelu' is the exact erf GELU; layer_norm_eps 1e-12.",
        ],
    }
    run_and_save("vit", model, fwd, {"pixel_values": px}, info, vit_processor(32))


def build_vit_cls():
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    cfg = vit_cfg()
    cfg.num_labels = 5
    cfg.id2label = {i: f"class_{i}" for i in range(5)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    model = ViTForImageClassification(cfg)
    model.set_attn_implementation("eager")
    randomize_(model, 108)
    px = seeded_pixels(1108, BATCH, 3, 32, 32)

    def fwd(m, inp):
        o = m.vit(pixel_values=inp["pixel_values"])
        logits = m(pixel_values=inp["pixel_values"]).logits
        return {"logits": logits, "last_hidden_state": o.last_hidden_state,
                "cls_after_layernorm": o.last_hidden_state[:, 0].contiguous()}

    info = {
        "model_class": "transformers.ViTForImageClassification",
        "hf_equivalent": "google/vit-base-patch16-224 layout ('vit.' prefix, classifier, no pooler)",
        "seed": 108,
        "pixel_values_seed": 1108,
        "attn_implementation": "eager",
        "notes": [
            "Tensor names: 'vit.embeddings.*', 'vit.encoder.layer.N.*', 'vit.layernorm.*', "
            "'classifier.{weight,bias}'; no pooler. logits = classifier(cls_after_layernorm).",
            "This is the layout candle-transformers' vit::Model::new(cfg, num_labels, vb) expects.",
        ],
    }
    run_and_save("vit_cls", model, fwd, {"pixel_values": px}, info, vit_processor(32))


def build_resnet50_hf():
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetModel
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                       layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
                       downsample_in_bottleneck=False)
    model = ResNetModel(cfg)
    randomize_(model, 109)
    px = seeded_pixels(1109, BATCH, 3, 48, 64)

    def fwd(m, inp):
        o = m(pixel_values=inp["pixel_values"])
        return {"last_hidden_state": o.last_hidden_state, "pooled": o.pooler_output.flatten(1)}

    # microsoft/resnet-50: ConvNextImageProcessor, shortest_edge 224, crop_pct 0.875, bicubic,
    # ImageNet mean/std -> resize shortest edge to int(224 / 0.875) = 256, center crop 224.
    proc = ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875, resample=PILImageResampling.BICUBIC,
                                     do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                     image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))
    info = {
        "model_class": "transformers.ResNetModel",
        "hf_equivalent": "microsoft/resnet-50 layout (bottleneck, depths [3,4,6,3], widths 256..2048) scaled down "
                         "to depths [1,1,1,1], hidden_sizes [16,32,64,128], embedding_size 8",
        "seed": 109,
        "pixel_values_seed": 1109,
        "notes": [
            "HF ResNet names differ completely from torchvision: embedder.embedder.{convolution,normalization}, "
            "encoder.stages.S.layers.L.shortcut.{convolution,normalization}, "
            "encoder.stages.S.layers.L.layer.{0,1,2}.{convolution,normalization}.",
            "downsample_in_bottleneck=False: the stride sits on the 3x3 conv (layer.1), as in torchvision v1.5.",
            "BatchNorm running stats are random (eval mode is exercised); num_batches_tracked (int64) is "
            "present in model.safetensors.",
            "pooled = global average pool (pooler_output flattened), no classifier.",
        ],
    }
    run_and_save("resnet50_hf", model, fwd, {"pixel_values": px}, info, proc)


# ------------------------------------------------------- procedural torchvision ResNet-50

GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1
BASE_SEED = 0x6D6F6E6F  # "mono"


def fnv1a64(s: str) -> int:
    h = 0xCBF29CE484222325
    for byte in s.encode("utf-8"):
        h ^= byte
        h = (h * 0x100000001B3) & MASK64
    return h


def splitmix_uniform(seed: int, n: int) -> np.ndarray:
    """x_i in (-1, 1), i = 0..n-1, from splitmix64 evaluated at counter i+1 (float64, exact)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(seed) + i * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    k = (z >> np.uint64(40)).astype(np.float64)  # 24-bit integer
    return (2.0 * k + 1.0) / float(1 << 24) - 1.0


def dyadic(h: float) -> tuple:
    """h rounded to 4 significant bits: (m, e) with value m * 2**e exactly."""
    f, k = math.frexp(h)  # h = f * 2**k, f in [0.5, 1)
    return int(round(f * 16)), k - 4


def resnet_tensor_rule(name: str, shape: tuple) -> tuple:
    """(center, halfwidth) of the uniform distribution for one torchvision tensor."""
    if name.endswith("running_var"):
        return 1.0, 0.5
    if name.endswith("running_mean"):
        return 0.0, 0.25
    if name == "fc.weight":
        return 0.0, math.sqrt(3.0 / shape[1])
    if name == "fc.bias":
        return 0.0, 0.1
    if len(shape) == 4:  # conv, He-uniform
        fan_in = shape[1] * shape[2] * shape[3]
        return 0.0, math.sqrt(6.0 / fan_in)
    if name.endswith("bn3.weight"):  # last BN of each residual branch: keeps activations O(1-10)
        return 0.25, 0.125
    if name.endswith("weight"):  # BN gamma
        return 1.0, 0.25
    if name.endswith("bias"):  # BN beta
        return 0.0, 0.25
    raise RuntimeError(f"no rule for {name}")


def resnet50_procedural_state():
    """Build torchvision resnet50 and fill it with the procedural weights. Returns
    (model, manifest entries)."""
    model = torchvision.models.resnet50(weights=None)
    sd = model.state_dict()
    entries = []
    new_sd = {}
    for name, t in sd.items():
        shape = tuple(t.shape)
        if t.dtype == torch.int64:  # num_batches_tracked
            entries.append({"name": name, "shape": list(shape), "dtype": "I64", "value": int(t.item()),
                            "skip_when_loading": True})
            new_sd[name] = t.clone()
            continue
        center, hw = resnet_tensor_rule(name, shape)
        m, e = dyadic(hw)
        seed = fnv1a64(name) ^ BASE_SEED
        n = int(np.prod(shape))
        vals = (center + (m * 2.0 ** e) * splitmix_uniform(seed, n)).astype(np.float32)
        bits = vals.view(np.uint32)
        idx = sorted({0, 1, 2, n // 2, n - 1})
        entries.append({
            "name": name, "shape": list(shape), "dtype": "F32", "seed": str(seed),
            "center": center, "halfwidth_m": m, "halfwidth_e": e, "halfwidth": m * 2.0 ** e,
            "check": {str(i): f"{int(bits[i]):08x}" for i in idx},
        })
        new_sd[name] = torch.from_numpy(vals.reshape(shape).copy())
    model.load_state_dict(new_sd, strict=True)
    return model, entries, new_sd


def tiny_torchvision_resnet_sizes() -> dict:
    """Sizes of the 'smallest faithful' torchvision options, for the README."""
    from torchvision.models.resnet import Bottleneck, ResNet

    out = {}
    for label, layers in (("resnet50 [3,4,6,3]", [3, 4, 6, 3]), ("ResNet(Bottleneck,[1,1,1,1])", [1, 1, 1, 1])):
        for nc in (1000, 10):
            m = ResNet(Bottleneck, layers, num_classes=nc)
            n = sum(t.numel() for k, t in m.state_dict().items() if t.is_floating_point())
            out[f"{label}, num_classes={nc}"] = {"float_values": n, "f32_MB": round(n * 4 / 1e6, 1),
                                                 "f16_MB": round(n * 2 / 1e6, 1)}
    return out


def build_resnet50_torchvision(materialize: str | None):
    d = fresh_dir(ENC / "resnet50_torchvision")
    model, entries, sd = resnet50_procedural_state()
    model.eval()
    px = seeded_pixels(1110, BATCH, 3, 72, 100)
    feats = {}

    def fwd(m, inp):
        h = m.avgpool.register_forward_hook(lambda mod, i, o: feats.__setitem__("pooled", torch.flatten(o, 1)))
        try:
            logits = m(inp["pixel_values"])
        finally:
            h.remove()
        return {"pooled": feats["pooled"], "logits": logits}

    with torch.no_grad():
        outputs = fwd(model, {"pixel_values": px})
    out64 = f64_gap(model, fwd, {"pixel_values": px})
    tensors = {"pixel_values": px, **outputs}
    save_tensors(d / "reference.safetensors", tensors,
                 {"model": "resnet50_torchvision", "versions": VERSIONS,
                  "model_class": "torchvision.models.resnet50"})
    spec = {
        "about": "Procedural weights for torchvision.models.resnet50 (all 25.6M parameters, real "
                 "architecture, torchvision state_dict names). Regenerate each F32 tensor with the "
                 "algorithm below and compare the 'check' values (f32 bit patterns at element indices).",
        "algorithm": [
            "seed = fnv1a64(utf8(name)) XOR base_seed  (FNV-1a 64: offset 0xcbf29ce484222325, prime 0x100000001b3); "
            "the result is also stored as a decimal string in 'seed'",
            "for element i = 0..numel-1 (row-major, PyTorch layout): z = seed + (i+1)*0x9E3779B97F4A7C15 (wrapping u64)",
            "z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z = z ^ (z >> 31) "
            "(wrapping u64 multiplies)",
            "k = z >> 40 (24-bit); x = (2k + 1) / 2^24 - 1 in f64 (exact)",
            "value = (center + (halfwidth_m * 2^halfwidth_e) * x) computed in f64 (exact), then rounded to f32 "
            "(round-to-nearest-even, i.e. Rust 'as f32')",
            "I64 entries (num_batches_tracked) are constants ('value') that real torchvision files carry; "
            "loaders should skip them",
        ],
        "base_seed": BASE_SEED,
        "tensors": entries,
    }
    dump_json(d / "weights_spec.json", spec)
    info = {
        "model_class": "torchvision.models.resnet50(weights=None), eval mode",
        "weights": "procedural (weights_spec.json); no model.safetensors is committed (it would be ~102 MB)",
        "pixel_values_seed": 1110,
        "input_size_hw": [72, 100],
        "float32_vs_float64_max_abs": {k: max_abs(outputs[k], out64[k]) for k in outputs},
        "output_stats": {k: {"absmax": float(v.abs().max()), "std": float(v.std())} for k, v in outputs.items()},
        "size_of_committed_alternatives": tiny_torchvision_resnet_sizes(),
        "notes": [
            "pooled = torch.flatten(avgpool(layer4(...)), 1) (B x 2048, before fc); logits = fc(pooled) (B x 1000).",
            "Input is 72x100 (non-square, odd intermediate sizes: 36x50 -> 18x25 -> 18x25 -> 9x13 -> 5x7 -> 3x4) "
            "to exercise padding/stride arithmetic; the architecture is size-agnostic.",
            "BatchNorm running_mean/running_var and gamma/beta are random (eval-mode BN is exercised); the "
            "residual branches' last BN (bn3) has gamma in [0.125, 0.375] so activations stay O(1-10) "
            "through the 16 blocks instead of growing to ~1e4.",
            "num_batches_tracked entries are listed (I64) so a loader can be tested to skip them.",
            "stride sits on the 3x3 conv (conv2) of each bottleneck (torchvision v1.5), as in "
            "candle-transformers' resnet.",
        ],
    }
    write_fixture_json(d, info, tensors)
    if materialize:
        out = {k: v.contiguous() for k, v in sd.items()}
        safetensors.torch.save_file(out, materialize, metadata={"format": "pt"})
        print(f"[ok] materialized full resnet50 weights at {materialize}")
    print(f"[ok] resnet50_torchvision: {', '.join(f'{k}{tuple(v.shape)}' for k, v in tensors.items())}")


# ------------------------------------------------------------------------ preprocessing

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"

# stem -> (source file, crop box (left, top, right, bottom) or None, target size (W, H), mode)
IMAGES = {
    "coffee": ("coffee.png", None, (300, 200), "RGB"),
    "astronaut": ("astronaut.png", (63, 0, 449, 512), (226, 300), "RGB"),
    "camera": ("camera.png", (0, 76, 512, 436), (300, 211), "L"),
    "chelsea_rgba": ("chelsea.png", None, (301, 200), "RGBA"),
}

IMAGE_SOURCES = {
    "coffee": "skimage.data.coffee(): Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0 (no copyright restrictions)",
    "astronaut": "skimage.data.astronaut(): NASA photograph of Eileen Collins; public domain",
    "camera": "skimage.data.camera(): Lav Varshney; CC0 (no copyright restrictions)",
    "chelsea_rgba": "skimage.data.chelsea(): Stefan van der Walt; CC0 (no copyright restrictions); "
                    "alpha channel added by this script",
}


def make_alpha(w: int, h: int) -> np.ndarray:
    """Radial fade (opaque centre, partly transparent edges) with a fully transparent
    block in the top-left corner, so dropping alpha and compositing onto white differ."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.sqrt(((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2)
    a = np.clip(np.round(255.0 * (1.3 - r)), 0, 255)
    a[: h // 5, : w // 5] = 0
    return a.astype(np.uint8)


def prepare_images() -> dict:
    img_dir = fresh_dir(PRE / "images")
    out = {}
    for stem, (src, box, size, mode) in IMAGES.items():
        im = Image.open(SKIMAGE_DATA / src)
        im.load()
        if box is not None:
            im = im.crop(box)
        base_mode = "L" if mode == "L" else "RGB"
        im = im.convert(base_mode).resize(size, resample=Image.Resampling.LANCZOS)
        if mode == "RGBA":
            rgba = np.dstack([np.asarray(im), make_alpha(*size)])
            im = Image.fromarray(rgba, "RGBA")
        path = img_dir / f"{stem}.png"
        im.save(path, format="PNG", optimize=False, compress_level=9)
        out[stem] = Image.open(path)
        out[stem].load()
        assert out[stem].mode == mode and out[stem].size == size
    return out


def hf_resized_shape(w: int, h: int, shortest: int) -> tuple:
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if w > h else (shortest, new_long)


def preprocess_family_hf(name, slow, fast, images, convert_first: bool, notes, ref_model):
    tensors, per_image = {}, {}
    for stem, im in images.items():
        src = im.convert("RGB") if convert_first else im
        pv = slow(images=src, return_tensors="pt")["pixel_values"][0].float()
        try:
            pf = fast(images=src, return_tensors="pt")["pixel_values"][0].float()
            fast_info = {"max_abs_diff": max_abs(pf, pv), "mean_abs_diff": float((pf - pv).abs().mean())}
        except Exception as exc:  # noqa: BLE001
            fast_info = {"error": repr(exc)[:200]}
        h16 = pv.to(torch.float16)
        per_image[stem] = {
            "input_mode": im.mode, "input_size_wh": list(im.size),
            "fed_to_processor_as": src.mode,
            "pixel_values_shape": list(pv.shape),
            "float32_sum": float(pv.double().sum()), "float32_absmax": float(pv.abs().max()),
            "float16_storage_max_abs_error": max_abs(h16.float(), pv),
            "fast_processor_vs_slow": fast_info,
        }
        tensors[stem] = h16
    settings = slow.to_dict()
    return tensors, {
        "reference": f"{type(slow).__name__} (PIL backend, the 'slow' processor; what use_fast=False gives)",
        "fast_processor_compared": type(fast).__name__ + " (torchvision backend)",
        "as_for_checkpoint": ref_model,
        "processor_settings": json.loads(json.dumps(settings, default=str)),
        "input_conversion": notes,
        "stored_dtype": "float16",
        "images": per_image,
    }


def build_preprocess():
    from torchvision import transforms as T
    from transformers import CLIPImageProcessor, SiglipImageProcessor, ViTImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    PRE.mkdir(parents=True, exist_ok=True)
    for p in PRE.glob("*.safetensors"):
        p.unlink()
    images = prepare_images()
    summary = {"generator": f"/tmp/refenv/bin/python {SCRIPT}", "versions": VERSIONS, "families": {}}

    # CLIP: openai/clip-vit-base-patch32 defaults.
    slow = clip_processor(224)
    fast = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                              resample=PILImageResampling.BICUBIC, do_center_crop=True, do_convert_rgb=True,
                              image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    t, s = preprocess_family_hf(
        "clip", slow, fast, images, convert_first=False,
        notes="PIL image passed straight to the processor (do_convert_rgb=True): 'L' is replicated to RGB, "
              "'RGBA' is alpha-composited onto WHITE (transformers.image_transforms.convert_to_rgb).",
        ref_model="openai/clip-vit-base-patch32 (shortest_edge 224, bicubic, center crop 224, OpenAI mean/std)")
    for stem, im in images.items():
        rw, rh = hf_resized_shape(*im.size, 224)
        s["images"][stem]["resized_size_wh"] = [rw, rh]
        s["images"][stem]["crop_offset_left_top"] = [(rw - 224) // 2, (rh - 224) // 2]
    summary["families"]["clip"] = s
    save_tensors(PRE / "clip.safetensors", t, {"family": "clip", "dtype": "float16"})

    # SigLIP2 fixed resolution: google/siglip2-base-patch16-224.
    slow = siglip_processor(224)
    fast = SiglipImageProcessor(size={"height": 224, "width": 224}, resample=PILImageResampling.BILINEAR,
                                do_convert_rgb=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    t, s = preprocess_family_hf(
        "siglip2", slow, fast, images, convert_first=False,
        notes="PIL image passed straight to the processor (do_convert_rgb=True): 'L' replicated, "
              "'RGBA' alpha-composited onto WHITE.",
        ref_model="google/siglip2-base-patch16-224 (224x224 squash, no crop, bilinear, mean/std 0.5)")
    for stem in images:
        s["images"][stem]["resized_size_wh"] = [224, 224]
    summary["families"]["siglip2"] = s
    save_tensors(PRE / "siglip2.safetensors", t, {"family": "siglip2", "dtype": "float16"})

    # ViT: google/vit-base-patch16-224.
    slow = vit_processor(224)
    fast = ViTImageProcessor(size={"height": 224, "width": 224}, resample=PILImageResampling.BILINEAR,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    t, s = preprocess_family_hf(
        "vit", slow, fast, images, convert_first=True,
        notes="ViTImageProcessor has no RGB conversion and raises on 'L' and 'RGBA' inputs, so every image "
              "is first converted with PIL Image.convert('RGB') (what transformers.image_utils.load_image and "
              "the pipelines do): 'L' replicated, 'RGBA' alpha DROPPED (no compositing).",
        ref_model="google/vit-base-patch16-224 (224x224 squash, no crop, bilinear, mean/std 0.5)")
    for stem in images:
        s["images"][stem]["resized_size_wh"] = [224, 224]
    summary["families"]["vit"] = s
    save_tensors(PRE / "vit.safetensors", t, {"family": "vit", "dtype": "float16"})

    # ResNet, torchvision style.
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tv = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(224),
                    T.ToTensor(), T.Normalize(mean, std)])
    tv_tensor = T.Compose([T.PILToTensor(),
                           T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                           T.CenterCrop(224), T.ConvertImageDtype(torch.float32), T.Normalize(mean, std)])
    tensors, per_image = {}, {}
    for stem, im in images.items():
        rgb = im.convert("RGB")
        pv = tv(rgb)
        pt = tv_tensor(rgb)
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(256 * long / short)
        rw, rh = (new_long, 256) if w > h else (256, new_long)
        h16 = pv.to(torch.float16)
        per_image[stem] = {
            "input_mode": im.mode, "input_size_wh": list(im.size), "fed_to_transforms_as": "RGB",
            "resized_size_wh": [rw, rh],
            "crop_offset_left_top": [int(round((rw - 224) / 2.0)), int(round((rh - 224) / 2.0))],
            "pixel_values_shape": list(pv.shape),
            "float32_sum": float(pv.double().sum()), "float32_absmax": float(pv.abs().max()),
            "float16_storage_max_abs_error": max_abs(h16.float(), pv),
            "tensor_path_vs_pil_path": {"max_abs_diff": max_abs(pt, pv),
                                        "mean_abs_diff": float((pt - pv).abs().mean())},
        }
        tensors[stem] = h16
    summary["families"]["resnet_torchvision"] = {
        "reference": "torchvision.transforms on a PIL image: Resize(256, BILINEAR, antialias=True) -> "
                     "CenterCrop(224) -> ToTensor() -> Normalize(ImageNet mean, std)",
        "processor_settings": {"resize_shortest_edge": 256, "resize_long_edge": "int(256 * long / short)",
                               "interpolation": "PIL BILINEAR (antialiased, PIL's resize)", "center_crop": 224,
                               "crop_offset": "int(round((size - 224) / 2.0)) (Python round: half to even)",
                               "to_tensor": "uint8 / 255 in float32", "image_mean": mean, "image_std": std},
        "as_for_checkpoint": "torchvision ResNet-50 (IMAGENET1K_V1 eval transforms; V2 weights use resize 232)",
        "input_conversion": "PIL Image.convert('RGB') first (torchvision's default pil_loader): 'L' replicated, "
                            "'RGBA' alpha DROPPED.",
        "compared": "tensor path (PILToTensor -> Resize on uint8 tensor, antialias) recorded as "
                    "tensor_path_vs_pil_path; the PIL path is the reference",
        "stored_dtype": "float16",
        "images": per_image,
    }
    save_tensors(PRE / "resnet_torchvision.safetensors", tensors, {"family": "resnet_torchvision", "dtype": "float16"})

    # RGBA: what compositing onto white vs dropping alpha changes (for the README).
    rgba = images["chelsea_rgba"]
    drop = np.asarray(rgba.convert("RGB"), dtype=np.int16)
    comp = np.asarray(transformers.image_transforms.convert_to_rgb(rgba, return_numpy=True), dtype=np.int16)
    summary["rgba_note"] = {
        "image": "chelsea_rgba",
        "pixels_differing_composite_vs_drop": int((np.abs(comp - drop).max(axis=-1) > 0).sum()),
        "max_abs_u8_diff": int(np.abs(comp - drop).max()),
    }
    summary["images"] = {stem: {"file": f"images/{stem}.png", "mode": IMAGES[stem][3],
                                "size_wh": list(IMAGES[stem][2]), "source": IMAGE_SOURCES[stem],
                                "derivation": (f"{IMAGES[stem][0]}" + (f" cropped to box {IMAGES[stem][1]}" if IMAGES[stem][1] else "")
                                               + f", resized to {IMAGES[stem][2]} with PIL LANCZOS"
                                               + (", alpha added (make_alpha)" if IMAGES[stem][3] == "RGBA" else ""))}
                       for stem in IMAGES}
    dump_json(PRE / "preprocess.json", summary)
    print("[ok] preprocess: " + ", ".join(f"{f}.safetensors" for f in summary["families"]))


# ---------------------------------------------------------------------------------- main

BUILDERS = {
    "clip_vision": build_clip_vision,
    "clip_vision_proj": build_clip_vision_proj,
    "clip_full": build_clip_full,
    "siglip2": build_siglip2,
    "siglip2_full": build_siglip2_full,
    "siglip2_naflex": build_siglip2_naflex,
    "vit": build_vit,
    "vit_cls": build_vit_cls,
    "resnet50_hf": build_resnet50_hf,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    ap.add_argument("--materialize-resnet50", default=None, metavar="PATH")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    known = set(BUILDERS) | {"resnet50_torchvision", "preprocess"}
    if only - known:
        ap.error(f"unknown fixture(s): {sorted(only - known)}; known: {sorted(known)}")
    transformers.logging.set_verbosity_error()
    ENC.mkdir(parents=True, exist_ok=True)
    for name, fn in BUILDERS.items():
        if not only or name in only:
            fn()
    if not only or "resnet50_torchvision" in only:
        build_resnet50_torchvision(args.materialize_resnet50)
    if not only or "preprocess" in only:
        build_preprocess()


if __name__ == "__main__":
    main()
