//! Small single-label sets held whole in memory as raw pixels (CIFAR, MNIST): decoding an item is
//! a copy, so `load` only fails for an index past the end.

use anyhow::{ensure, Result};
use image::RgbImage;

use super::ImageDataset;
use crate::data::store::LabelKind;

/// How one item's bytes are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelLayout {
    /// width × height grey bytes, row-major (idx files).
    Grey,
    /// The red plane, then green, then blue, each width × height row-major (CIFAR).
    PlanarRgb,
}

impl PixelLayout {
    fn channels(self) -> usize {
        match self {
            PixelLayout::Grey => 1,
            PixelLayout::PlanarRgb => 3,
        }
    }
}

#[derive(Debug)]
pub struct MemoryDataset {
    /// First part of every item's path, e.g. "cifar10".
    set: String,
    split: String,
    layout: PixelLayout,
    width: u32,
    height: u32,
    /// Items back to back, `item_bytes()` each.
    pixels: Vec<u8>,
    labels: Vec<u32>,
    class_names: Vec<String>,
}

impl MemoryDataset {
    /// Checks that the pixels hold exactly one item per label and that every label names a class.
    pub fn new(
        set: &str,
        split: &str,
        layout: PixelLayout,
        (width, height): (u32, u32),
        pixels: Vec<u8>,
        labels: Vec<u32>,
        class_names: Vec<String>,
    ) -> Result<Self> {
        let item_bytes = width as usize * height as usize * layout.channels();
        ensure!(
            pixels.len() == labels.len() * item_bytes,
            "{set} {split}: {} pixel bytes for {} labels of {item_bytes}-byte images",
            pixels.len(),
            labels.len()
        );
        if let Some((i, &l)) =
            labels.iter().enumerate().find(|(_, &l)| l as usize >= class_names.len())
        {
            anyhow::bail!(
                "{set} {split}: item {i} has label {l} but there are only {} classes",
                class_names.len()
            );
        }
        Ok(Self {
            set: set.into(),
            split: split.into(),
            layout,
            width,
            height,
            pixels,
            labels,
            class_names,
        })
    }

    fn item_bytes(&self) -> usize {
        self.width as usize * self.height as usize * self.layout.channels()
    }
}

impl ImageDataset for MemoryDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn path(&self, i: usize) -> String {
        format!("{}/{}/{i:06}", self.set, self.split)
    }

    fn labels(&self, i: usize) -> Vec<u32> {
        vec![self.labels[i]]
    }

    fn label_kind(&self) -> LabelKind {
        LabelKind::Class
    }

    fn class_names(&self) -> &[String] {
        &self.class_names
    }

    fn load(&self, i: usize) -> Result<RgbImage> {
        ensure!(
            i < self.len(),
            "{}: item {i} out of range (the split has {})",
            self.path(i),
            self.len()
        );
        let size = self.item_bytes();
        let item = &self.pixels[i * size..(i + 1) * size];
        let rgb: Vec<u8> = match self.layout {
            PixelLayout::Grey => item.iter().flat_map(|&v| [v, v, v]).collect(),
            PixelLayout::PlanarRgb => {
                let plane = size / 3;
                let (r, rest) = item.split_at(plane);
                let (g, b) = rest.split_at(plane);
                r.iter().zip(g).zip(b).flat_map(|((&r, &g), &b)| [r, g, b]).collect()
            }
        };
        Ok(RgbImage::from_raw(self.width, self.height, rgb).expect("3 bytes for each pixel"))
    }

    fn fingerprint(&self) -> Result<String> {
        let size = self.item_bytes();
        let mut fp = super::fingerprint_items(self, |i, fp| {
            fp.bytes(&self.pixels[i * size..(i + 1) * size]);
        });
        Ok(fp.str(&format!("{:?} {}×{}", self.layout, self.width, self.height)).finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planar_and_grey_items() {
        // Two 2×1 planar items: item 1 is R = (10, 11), G = (20, 21), B = (30, 31).
        let pixels = vec![0, 0, 0, 0, 0, 0, 10, 11, 20, 21, 30, 31];
        let names = vec!["a".to_string(), "b".to_string()];
        let set = MemoryDataset::new(
            "s",
            "test",
            PixelLayout::PlanarRgb,
            (2, 1),
            pixels,
            vec![0, 1],
            names.clone(),
        )
        .unwrap();
        assert_eq!(set.load(1).unwrap().as_raw(), &[10, 20, 30, 11, 21, 31]);
        assert_eq!(set.path(1), "s/test/000001");
        assert!(set.load(2).unwrap_err().to_string().contains("out of range"));

        let grey = MemoryDataset::new(
            "g",
            "train",
            PixelLayout::Grey,
            (1, 2),
            vec![5, 6],
            vec![1],
            names.clone(),
        )
        .unwrap();
        assert_eq!(grey.load(0).unwrap().as_raw(), &[5, 5, 5, 6, 6, 6]);

        assert!(MemoryDataset::new(
            "g",
            "train",
            PixelLayout::Grey,
            (1, 2),
            vec![5],
            vec![1],
            names.clone()
        )
        .is_err());
        let e =
            MemoryDataset::new("g", "train", PixelLayout::Grey, (1, 1), vec![5], vec![2], names)
                .unwrap_err();
        assert!(e.to_string().contains("label 2"), "{e}");
    }
}
