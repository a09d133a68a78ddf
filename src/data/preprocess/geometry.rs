//! Resize target sizes and centre-crop placement, with each reference's integer rounding.

use anyhow::{ensure, Result};

/// Target of the resize step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeTo {
    /// Scale so the shorter side becomes this, keeping the aspect ratio; the longer side is
    /// `int(edge * long / short)` (truncated), as in both transformers and torchvision.
    ShortestEdge(u32),
    /// Squash to exactly this size.
    Exact { height: u32, width: u32 },
}

/// How the centre-crop offset `(size - crop) / 2` is rounded when it is not whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CropRounding {
    /// Hugging Face `center_crop`: `(size - crop) // 2`.
    Floor,
    /// torchvision `CenterCrop`: `int(round((size - crop) / 2))`, Python's round half to even.
    HalfEven,
}

/// Pillow's sizes are C ints; larger results are refused instead of allocated.
const MAX_SIDE: u64 = i32::MAX as u64;

/// (width, height) after resizing an image of `width`×`height`.
pub fn resized_size(resize: Option<ResizeTo>, width: u32, height: u32) -> Result<(u32, u32)> {
    ensure!(width > 0 && height > 0, "the image is empty ({width}x{height})");
    match resize {
        None => Ok((width, height)),
        Some(ResizeTo::Exact { height: h, width: w }) => {
            ensure!(w > 0 && h > 0, "resize target {w}x{h} is empty");
            Ok((w, h))
        }
        Some(ResizeTo::ShortestEdge(edge)) => {
            ensure!(edge > 0, "shortest-edge resize to 0 pixels");
            let (short, long) = if width <= height { (width, height) } else { (height, width) };
            // Python: int(edge * long / short), an exact product then a correctly rounded division.
            let new_long = (edge as u64 * long as u64) as f64 / short as f64;
            let new_long = new_long as u64;
            ensure!(
                new_long <= MAX_SIDE,
                "resizing {width}x{height} to shortest edge {edge} gives a side of {new_long} pixels"
            );
            let new_long = new_long as u32;
            Ok(if width <= height { (edge, new_long) } else { (new_long, edge) })
        }
    }
}

/// Where the crop starts inside a resized side of `size` pixels; negative when the crop is larger
/// and the image gets zero padding. Both references pad independently per axis: Hugging Face puts
/// the image `ceil(pad / 2)` in (which equals `floor((size - crop) / 2)`), torchvision `floor(pad / 2)`.
pub fn crop_origin(size: u32, crop: u32, rounding: CropRounding) -> i64 {
    let diff = size as i64 - crop as i64;
    match rounding {
        CropRounding::Floor => diff.div_euclid(2),
        CropRounding::HalfEven if diff < 0 => -((-diff) / 2),
        CropRounding::HalfEven => {
            let half = diff / 2;
            // An odd difference is exactly x.5: round to the even neighbour.
            if diff % 2 == 1 && half % 2 == 1 {
                half + 1
            } else {
                half
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_sizes_of_the_fixtures() {
        let s = |w, h, e| resized_size(Some(ResizeTo::ShortestEdge(e)), w, h).unwrap();
        assert_eq!(s(300, 200, 224), (336, 224));
        assert_eq!(s(301, 200, 224), (337, 224));
        assert_eq!(s(226, 300, 224), (224, 297));
        assert_eq!(s(300, 211, 224), (318, 224));
        assert_eq!(s(226, 300, 256), (256, 339));
        assert_eq!(s(300, 211, 256), (363, 256));
        assert_eq!(s(301, 200, 256), (385, 256));
        assert_eq!(s(500, 375, 256), (341, 256));
    }

    #[test]
    fn crop_offsets_round_like_each_reference() {
        use CropRounding::*;
        assert_eq!(crop_origin(337, 224, Floor), 56);
        assert_eq!(crop_origin(339, 224, HalfEven), 58);
        assert_eq!(crop_origin(363, 224, HalfEven), 70);
        assert_eq!(crop_origin(385, 224, HalfEven), 80);
        assert_eq!(crop_origin(339, 224, Floor), 57);
        assert_eq!(crop_origin(224, 224, HalfEven), 0);
        // Padding: HF centres a 3-pixel gap with 2 before, torchvision with 1 before.
        assert_eq!(crop_origin(5, 8, Floor), -2);
        assert_eq!(crop_origin(5, 8, HalfEven), -1);
        assert_eq!(crop_origin(4, 8, Floor), -2);
        assert_eq!(crop_origin(4, 8, HalfEven), -2);
    }

    #[test]
    fn empty_sizes_are_errors() {
        assert!(resized_size(None, 0, 5).is_err());
        assert!(resized_size(Some(ResizeTo::ShortestEdge(0)), 5, 5).is_err());
        assert!(resized_size(Some(ResizeTo::Exact { height: 0, width: 3 }), 5, 5).is_err());
        assert!(resized_size(Some(ResizeTo::ShortestEdge(u32::MAX)), 1, u32::MAX).is_err());
    }
}
