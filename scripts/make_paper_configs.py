#!/usr/bin/env python3
"""Writes configs/paper/*.toml: one config per experiment of the MonoLoss paper (arXiv 2602.12403),
each headed by what it reproduces and the paper's numbers where docs/method.md (section 13) lists them.
Plain Python 3, no dependencies: python3 scripts/make_paper_configs.py
"""
import pathlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "configs" / "paper"

ENCODERS = {
    # The authors extract with open_clip's hf-hub:laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K (encode_image).
    "clip": ("clip", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", "image_embeds",
             "CLIP ViT-L/14 (DataComp-1B, the authors' model), projected image embedding (768-d)"),
    "siglip2": ("siglip2", "google/siglip2-so400m-patch14-384", "pooled", "SigLIP2 so400m-patch14-384, pooled output (1152-d)"),
    "vit": ("vit", "google/vit-large-patch16-224", "cls", "supervised ViT-L/16-224, CLS after the final LayerNorm (1024-d)"),
}
DATASETS = {
    "imagenet": ("imagenet", "/data/imagenet", "train", "val", "ImageNet-1k"),
    "openimages": ("openimages", "/data/openimages", "train", "validation", "OpenImagesV7 (image-level labels)"),
}
# The paper's best λ (docs/method.md, section 13), by dataset, SAE and encoder.
LAMBDA = {
    ("imagenet", "batch_topk"): {"clip": 3e-4, "siglip2": 1e-4, "vit": 4e-4},
    ("imagenet", "topk"): {"clip": 0.09, "siglip2": 0.14, "vit": 0.09},
    ("imagenet", "jumprelu"): {"clip": 5e-4, "siglip2": 1e-4, "vit": 7e-4},
    ("imagenet", "relu"): {"clip": 1e-4, "siglip2": 3e-5, "vit": 9e-5},
    ("openimages", "batch_topk"): {"clip": 5e-4, "siglip2": 2e-4, "vit": 7e-4},
    ("openimages", "topk"): {"clip": 0.5, "siglip2": 0.3, "vit": 0.9},
    ("openimages", "jumprelu"): {"clip": 5e-4, "siglip2": 1e-4, "vit": 5e-4},
    ("openimages", "relu"): {"clip": 1e-4, "siglip2": 3e-5, "vit": 1e-4},
}
# Numbers the paper reports (docs/method.md, section 13; MonoScore, R², binary class purity; without → with MonoLoss).
NUMBERS = {
    ("imagenet", "batch_topk", "clip"): "MonoScore .437 → .602, R² .846 → .840, purity .144 → .462",
    ("imagenet", "batch_topk", "siglip2"): "MonoScore .466 → .583",
    ("imagenet", "batch_topk", "vit"): "MonoScore .245 → .646, purity .152 → .723",
}
SAE_NAMES = {"batch_topk": "BatchTopK", "topk": "TopK (OpenAI)", "jumprelu": "JumpReLU", "relu": "ReLU + L1"}


def sae_config(dataset, encoder, kind):
    ekind, model, output, edesc = ENCODERS[encoder]
    dkind, root, train, val, ddesc = DATASETS[dataset]
    lam = LAMBDA[(dataset, kind)][encoder]
    numbers = NUMBERS.get((dataset, kind, encoder), "see the paper's tables for this setup")
    extra = ""
    model_note = ""
    if encoder == "clip":
        model_note = ("\n# mono reads the model in transformers' CLIPModel layout (config.json + model.safetensors); where a\n"
                      "# repository holds only open_clip weights, convert them or point encoder.model at a converted copy.")
    if kind == "jumprelu":
        extra = "normalize_input = true            # the authors' JumpReLU runs standardise inputs\n"
    return f"""# Paper experiment: {SAE_NAMES[kind]} SAE on {ddesc} features of {edesc},
# without and with MonoLoss (λ = {lam:g}, the paper's best for this setup).
# Paper: {numbers}.
# 8192 latents, k = 64, batch 2048, 50 epochs, Adam lr 1e-4 (eps 6.25e-10), seed 42 — the defaults,
# as are the rest of the authors' sae/scripts/train_{dataset}.sh settings for this kind (docs/method.md
# lists where mono's SAE step still differs from theirs). Features are L2-normalised, as theirs.
# Needs the images under data.root and the model from the Hugging Face hub (or its cache); a GPU
# build (--features cuda) is the practical way: `mono run configs/paper/{dataset}_{encoder}_{kind}.toml`.{model_note}

[run]
name = "{dataset}_{encoder}_{kind}"

[encoder]
kind = "{ekind}"
model = "{model}"
output = "{output}"
batch_size = 256

[data]
kind = "{dkind}"
root = "{root}"
train_split = "{train}"
eval_split = "{val}"

[sae]
kind = "{kind}"
{extra}
[sweep]
lambda = [0.0, {lam:g}]
"""


# The authors' finetuning scripts (finetuning/scripts/{cifar10,cifar100,imagenet}/{resnet,clip_vit}.sh,
# torchvision's classification reference underneath): batch 1024 on one GPU, 90 epochs, SGD momentum 0.9,
# EMA (per-step decay 0.99998, every 32 steps, torchvision's adjustment), TopK k = width.
FINETUNE = {
    "resnet50": dict(
        kind="resnet50", model="timm/resnet50.tv_in1k", k=2048, lr={"imagenet": 1e-3, "cifar10": 0.1, "cifar100": 0.1},
        warmup={"imagenet": 5, "cifar10": 0, "cifar100": 0}, extra="", desc="ResNet-50 (torchvision ImageNet weights)",
        numbers={"imagenet": "top-1 80.34 (λ = 0) → 80.93 (λ = 0.1)"},
        keys="""weight_decay = 2e-05
norm_weight_decay = 0.0
schedule = "cosine"
label_smoothing = 0.1
train_size = 176
eval_resize = 232
mixed_precision = false
""",
        recipe="""# Recipe (scripts/{dataset}/resnet.sh): lr {lr:g}, {warmup} warm-up epochs, cosine, weight decay 2e-5 (0 on
# BatchNorm), label smoothing 0.1, train crop 176, eval resize 232 + crop 224, bilinear, f32, EMA.
# Not reproduced: TrivialAugmentWide, mixup 0.2 / cutmix 1.0, random erasing 0.1{ra};
# mono trains with RandomResizedCrop + flip only.""",
    ),
    "clip_b32": dict(
        kind="clip", model="openai/clip-vit-base-patch32", k=768, lr={"imagenet": 0.01, "cifar10": 0.01, "cifar100": 0.01},
        warmup={"imagenet": 0, "cifar10": 0, "cifar100": 0}, extra='output = "pooler"\n',
        desc="CLIP-ViT-B/32 vision tower (pooler output)",
        numbers={"imagenet": "top-1 78.45 (λ = 0) → 78.52 (best λ)"},
        keys="""weight_decay = 0.0001
norm_weight_decay = 0.0001
schedule = "step"
step_size = 30
gamma = 0.1
label_smoothing = 0.0
lora_rank = 16
lora_alpha = 32.0
mixed_precision = true
""",
        recipe="""# Recipe (scripts/{dataset}/clip_vit.sh): LoRA r 16, alpha 32 on q_proj and v_proj (the tower otherwise
# frozen), lr 0.01, StepLR 30 epochs × 0.1, weight decay 1e-4 on every parameter, no label smoothing,
# bicubic RandomResizedCrop 224 + flip, eval resize 224 + crop 224, mixed precision (bf16 here, AMP fp16
# there), EMA.""",
    ),
}
FT_DATA = {
    "imagenet": ("imagenet", "/data/imagenet", "train", "val", "ImageNet-1k"),
    "cifar10": ("cifar10", "/data/cifar10", "train", "test", "CIFAR-10"),
    "cifar100": ("cifar100", "/data/cifar100", "train", "test", "CIFAR-100"),
}


def features_config(dataset):
    dkind, root, train, val, ddesc = FT_DATA[dataset]
    return f"""# Similarity embeddings for the finetuning experiments on {ddesc}: CLIP-ViT-B/32 image embeddings
# of every image (the paper's pre-extracted CLIP features). Run this first:
#   mono run configs/paper/features_{dataset}_clip_b32.toml

[run]
name = "features_{dataset}_clip_b32"
stages = ["extract"]

[encoder]
kind = "clip"
model = "openai/clip-vit-base-patch32"
output = "image_embeds"
batch_size = 256

[data]
kind = "{dkind}"
root = "{root}"
train_split = "{train}"
eval_split = "{val}"

[features]
dir = "runs/features_{dataset}_clip_b32/features"
"""


def finetune_config(dataset, model):
    m = FINETUNE[model]
    dkind, root, train, val, ddesc = FT_DATA[dataset]
    numbers = m["numbers"].get(dataset, "see the paper's finetuning figure")
    ra = ", the repeated-augmentation sampler (4 repeats)" if dataset.startswith("cifar") else ""
    recipe = m["recipe"].format(dataset=dataset, lr=m["lr"][dataset], warmup=m["warmup"][dataset], ra=ra)
    return f"""# Paper experiment: finetune {m['desc']} on {ddesc} with CE + λ·MonoLoss on an
# intermediate TopK layer (Linear d → d, ReLU, TopK k = {m['k']} = all units), λ ∈ {{0, 0.03, 0.05, 0.07, 0.1}}.
# Paper: {numbers}. Similarity: CLIP-ViT-B/32 embeddings of the same images, made by
# configs/paper/features_{dataset}_clip_b32.toml. 90 epochs; a GPU build (--features cuda) is the
# practical way.
{recipe}
# MonoLoss: mono's batch loss is λ·(1 − mean score over the units active in the batch); the authors'
# code subtracts λ·(mean over all units, inactive ones counted as 0), so at the same λ mono's MonoLoss
# gradient is (all units / active units) times theirs.

[run]
name = "finetune_{dataset}_{model}"
stages = ["finetune", "report"]

[encoder]
kind = "{m['kind']}"
model = "{m['model']}"
{m['extra']}
[data]
kind = "{dkind}"
root = "{root}"
train_split = "{train}"
eval_split = "{val}"

[finetune]
k = {m['k']}
epochs = 90
batch_size = 1024
optimizer = "sgd"
lr = {m['lr'][dataset]:g}
momentum = 0.9
warmup_epochs = {m['warmup'][dataset]}
{m['keys']}ema_decay = 0.99998
ema_steps = 32
similarity_store = "runs/features_{dataset}_clip_b32/features"

[sweep]
"finetune.lambda" = [0.0, 0.03, 0.05, 0.07, 0.1]
"""


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.toml"):
        old.unlink()
    for dataset in DATASETS:
        for encoder in ENCODERS:
            for kind in SAE_NAMES:
                (OUT / f"{dataset}_{encoder}_{kind}.toml").write_text(sae_config(dataset, encoder, kind))
    for dataset in FT_DATA:
        (OUT / f"features_{dataset}_clip_b32.toml").write_text(features_config(dataset))
        for model in FINETUNE:
            (OUT / f"finetune_{dataset}_{model}.toml").write_text(finetune_config(dataset, model))
    print(f"wrote {len(list(OUT.glob('*.toml')))} configs to {OUT}")


if __name__ == "__main__":
    main()
