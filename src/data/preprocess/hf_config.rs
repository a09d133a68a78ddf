//! Hugging Face `preprocessor_config.json` → [`Preprocessor`], with the class defaults of the
//! PIL-backend processors of transformers 5.24 for keys a file leaves out (or sets to null).

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{Map, Value};

use super::filter::Resample;
use super::geometry::{CropRounding, ResizeTo};
use super::to_rgb::Alpha;
use super::Preprocessor;

// Written as transformers writes them; the f32 values are what numpy's float32 cast gives.
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
const IMAGENET_STANDARD: [f32; 3] = [0.5, 0.5, 0.5];

/// A size dict after transformers' `get_size_dict`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Size {
    HeightWidth(u32, u32),
    ShortestEdge(u32),
}

/// The class attributes of one `XxxImageProcessorPil`.
struct Class {
    name: &'static str,
    resample: Resample,
    mean: [f32; 3],
    std: [f32; 3],
    size: Size,
    /// How an integer `size` is read: square, or shortest edge.
    default_to_square: bool,
    crop_size: Option<Size>,
    do_resize: bool,
    do_center_crop: bool,
    do_convert_rgb: bool,
    /// ConvNext resizes to `shortest_edge / crop_pct` and crops back inside its resize.
    crop_pct: Option<f64>,
}

const CLASSES: [Class; 5] = [
    Class {
        name: "CLIPImageProcessor",
        resample: Resample::Bicubic,
        mean: OPENAI_CLIP_MEAN,
        std: OPENAI_CLIP_STD,
        size: Size::ShortestEdge(224),
        default_to_square: false,
        crop_size: Some(Size::HeightWidth(224, 224)),
        do_resize: true,
        do_center_crop: true,
        do_convert_rgb: true,
        crop_pct: None,
    },
    // DINOv2 and BiT checkpoints; the defaults are CLIP's.
    Class {
        name: "BitImageProcessor",
        resample: Resample::Bicubic,
        mean: OPENAI_CLIP_MEAN,
        std: OPENAI_CLIP_STD,
        size: Size::ShortestEdge(224),
        default_to_square: false,
        crop_size: Some(Size::HeightWidth(224, 224)),
        do_resize: true,
        do_center_crop: true,
        do_convert_rgb: true,
        crop_pct: None,
    },
    // Note the class default is bicubic; SigLIP 2 fixed-resolution files say bilinear explicitly.
    Class {
        name: "SiglipImageProcessor",
        resample: Resample::Bicubic,
        mean: IMAGENET_STANDARD,
        std: IMAGENET_STANDARD,
        size: Size::HeightWidth(224, 224),
        default_to_square: false,
        crop_size: None,
        do_resize: true,
        do_center_crop: false,
        do_convert_rgb: true,
        crop_pct: None,
    },
    Class {
        name: "ViTImageProcessor",
        resample: Resample::Bilinear,
        mean: IMAGENET_STANDARD,
        std: IMAGENET_STANDARD,
        size: Size::HeightWidth(224, 224),
        default_to_square: true,
        crop_size: None,
        do_resize: true,
        do_center_crop: false,
        do_convert_rgb: false,
        crop_pct: None,
    },
    // Hugging Face ResNet checkpoints (microsoft/resnet-50) use this processor.
    Class {
        name: "ConvNextImageProcessor",
        resample: Resample::Bicubic,
        mean: IMAGENET_STANDARD,
        std: IMAGENET_STANDARD,
        size: Size::ShortestEdge(384),
        default_to_square: false,
        crop_size: None,
        do_resize: true,
        do_center_crop: false,
        do_convert_rgb: false,
        crop_pct: Some(224.0 / 256.0),
    },
];

pub(super) fn from_hf_json(path: &Path) -> Result<Preprocessor> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let obj =
        json.as_object().ok_or_else(|| anyhow!("{}: expected a JSON object", path.display()))?;
    parse(obj).with_context(|| format!("{}: unusable image processor config", path.display()))
}

fn parse(obj: &Map<String, Value>) -> Result<Preprocessor> {
    let class = class_of(obj)?;
    let flag = |key: &str, default: bool| -> Result<bool> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => bail!("`{key}` must be true or false, got {v}"),
        }
    };
    let do_resize = flag("do_resize", class.do_resize)?;
    let do_center_crop = flag("do_center_crop", class.do_center_crop)?;
    let do_rescale = flag("do_rescale", true)?;
    let do_normalize = flag("do_normalize", true)?;
    let do_convert_rgb = flag("do_convert_rgb", class.do_convert_rgb)?;

    let resample = match present(obj, "resample") {
        None => class.resample,
        Some(v) => v
            .as_i64()
            .and_then(Resample::from_pil)
            .ok_or_else(|| anyhow!("`resample` must be a PIL filter code 0-5, got {v}"))?,
    };
    let mut size = match present(obj, "size") {
        None => class.size,
        Some(v) => size_dict(v, class.default_to_square).context("`size`")?,
    };
    // CLIP's processor keeps this Kosmos-2 switch: a square resize instead of the shortest edge.
    if flag("use_square_size", false)? {
        if let Size::ShortestEdge(s) = size {
            size = Size::HeightWidth(s, s);
        }
    }
    let crop_size = match present(obj, "crop_size") {
        None => class.crop_size,
        Some(v) => Some(size_dict(v, true).context("`crop_size`")?),
    };
    let crop_size = if do_center_crop {
        match crop_size {
            Some(Size::HeightWidth(h, w)) => Some((h, w)),
            Some(Size::ShortestEdge(_)) => bail!("`crop_size` must give height and width"),
            None => bail!("`do_center_crop` is set but there is no `crop_size`"),
        }
    } else {
        None
    };

    let (resize, crop) = match (do_resize, class.crop_pct) {
        (false, _) => (None, crop_size),
        (true, None) => {
            let resize = match size {
                Size::HeightWidth(height, width) => ResizeTo::Exact { height, width },
                Size::ShortestEdge(s) => ResizeTo::ShortestEdge(s),
            };
            (Some(resize), crop_size)
        }
        (true, Some(default_pct)) => convnext_resize(obj, size, default_pct, crop_size)?,
    };

    let rescale = match present(obj, "rescale_factor") {
        _ if !do_rescale => None,
        None => Some(1.0 / 255.0),
        Some(v) => {
            Some(v.as_f64().ok_or_else(|| anyhow!("`rescale_factor` must be a number, got {v}"))?)
        }
    };
    let (mean, std) = if do_normalize {
        let mean = match present(obj, "image_mean") {
            None => class.mean,
            Some(v) => triple(v).context("`image_mean`")?,
        };
        let std = match present(obj, "image_std") {
            None => class.std,
            Some(v) => triple(v).context("`image_std`")?,
        };
        ensure!(
            std.iter().all(|&s| s != 0.0 && s.is_finite()),
            "`image_std` {std:?} must be finite and non-zero"
        );
        (mean, std)
    } else {
        ([0.0; 3], [1.0; 3])
    };

    Ok(Preprocessor {
        resize,
        resample,
        crop,
        crop_rounding: CropRounding::Floor,
        rescale,
        mean,
        std,
        alpha: if do_convert_rgb { Alpha::CompositeWhite } else { Alpha::Drop },
    })
}

/// The processor class named by the file, with "Fast"/"Pil" suffixes and the legacy
/// `feature_extractor_type` spelling mapped to the base name.
fn class_of(obj: &Map<String, Value>) -> Result<&'static Class> {
    let raw = present(obj, "image_processor_type")
        .or_else(|| present(obj, "feature_extractor_type"))
        .ok_or_else(|| anyhow!("no `image_processor_type`"))?;
    let raw = raw
        .as_str()
        .ok_or_else(|| anyhow!("`image_processor_type` must be a string, got {raw}"))?;
    let name = raw
        .trim_end_matches("Fast")
        .trim_end_matches("Pil")
        .replace("FeatureExtractor", "ImageProcessor");
    if name == "Siglip2ImageProcessor" {
        bail!(
            "{raw} is SigLIP 2's NaFlex processor (variable resolution, patchified output with an attention \
             mask); fixed-resolution SigLIP 2 checkpoints use SiglipImageProcessor"
        );
    }
    CLASSES.iter().find(|c| c.name == name).ok_or_else(|| {
        let known: Vec<_> = CLASSES.iter().map(|c| c.name).collect();
        anyhow!("image processor {raw} is not supported (supported: {})", known.join(", "))
    })
}

/// The resize target and centre crop (height, width) a config asks for.
type ResizeAndCrop = (Option<ResizeTo>, Option<(u32, u32)>);

/// ConvNext's resize: below 384 pixels, shortest edge to `int(edge / crop_pct)` then a centre crop
/// back to edge×edge; from 384 up, a square squash without crop.
fn convnext_resize(
    obj: &Map<String, Value>,
    size: Size,
    default_pct: f64,
    crop_size: Option<(u32, u32)>,
) -> Result<ResizeAndCrop> {
    let Size::ShortestEdge(edge) = size else {
        bail!("ConvNextImageProcessor needs `size` with `shortest_edge`");
    };
    if edge >= 384 {
        return Ok((Some(ResizeTo::Exact { height: edge, width: edge }), crop_size));
    }
    let pct = match present(obj, "crop_pct") {
        None => default_pct,
        Some(v) => v.as_f64().ok_or_else(|| anyhow!("`crop_pct` must be a number, got {v}"))?,
    };
    ensure!(pct > 0.0 && pct.is_finite(), "`crop_pct` must be positive, got {pct}");
    let resize_edge = (edge as f64 / pct) as u64;
    // crop_pct > 1 is legal: the crop is then larger than the image and padded, as in transformers.
    ensure!(
        resize_edge >= 1 && resize_edge <= i32::MAX as u64,
        "`crop_pct` {pct} gives a resize edge of {resize_edge} for a crop of {edge}"
    );
    // A second, explicit centre crop is representable only when it crops nothing more.
    if let Some(c) = crop_size {
        ensure!(
            c == (edge, edge),
            "ConvNext `do_center_crop` with crop_size {c:?} after its own {edge}x{edge} crop"
        );
    }
    Ok((Some(ResizeTo::ShortestEdge(resize_edge as u32)), Some((edge, edge))))
}

/// A key's value, treating JSON null like an absent key (transformers falls back to the default).
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn positive(v: &Value) -> Result<u32> {
    v.as_u64()
        .filter(|&n| n > 0 && n <= i32::MAX as u64)
        .map(|n| n as u32)
        .ok_or_else(|| anyhow!("expected a positive integer, got {v}"))
}

/// transformers' `get_size_dict`: an int is square or a shortest edge, a pair is (height, width).
fn size_dict(v: &Value, default_to_square: bool) -> Result<Size> {
    match v {
        Value::Number(_) if default_to_square => {
            let s = positive(v)?;
            Ok(Size::HeightWidth(s, s))
        }
        Value::Number(_) => Ok(Size::ShortestEdge(positive(v)?)),
        Value::Array(a) if a.len() == 2 => {
            Ok(Size::HeightWidth(positive(&a[0])?, positive(&a[1])?))
        }
        Value::Object(m) => {
            let get = |k: &str| present(m, k);
            match (get("height"), get("width"), get("shortest_edge"), get("longest_edge")) {
                (Some(h), Some(w), None, None) => Ok(Size::HeightWidth(positive(h)?, positive(w)?)),
                (None, None, Some(s), None) => Ok(Size::ShortestEdge(positive(s)?)),
                _ => bail!(
                    "{v} is not supported: only {{height, width}} or {{shortest_edge}} give a fixed-size \
                     resize (longest_edge and max_height/max_width are not implemented)"
                ),
            }
        }
        _ => bail!("expected an integer, a [height, width] pair or a dict, got {v}"),
    }
}

/// A per-channel triple, or one number for all three channels.
fn triple(v: &Value) -> Result<[f32; 3]> {
    let num = |x: &Value| {
        x.as_f64().map(|f| f as f32).ok_or_else(|| anyhow!("expected a number, got {x}"))
    };
    match v {
        Value::Number(_) => Ok([num(v)?; 3]),
        Value::Array(a) if a.len() == 3 => Ok([num(&a[0])?, num(&a[1])?, num(&a[2])?]),
        _ => bail!("expected a number or three numbers, got {v}"),
    }
}
