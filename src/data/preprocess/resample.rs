//! Pillow's `Image.resize` for 8-bit RGB, restricted to a window of the output.
//!
//! Convolution filters run Pillow's two separable passes with the intermediate rounded and clamped
//! to u8, so the pass order matters. Pillow 13 runs the vertical pass first when the height shrinks
//! by more than twice as many pixels as the width (Pillow PR #9549; older releases always went
//! horizontal first); this rule was confirmed against Pillow 13.0.0 on the fixtures and on a few
//! hundred random size pairs. An axis whose size does not change is skipped, as Pillow skips it.
//! Nearest goes through Pillow's affine scaling instead.
//!
//! Every output pixel depends only on its own coefficients, so computing just the centre-crop
//! window (and only the source rows and columns it reads) gives the same bytes as resizing
//! everything and cropping afterwards, for less work.

use std::ops::Range;

use anyhow::{ensure, Result};
use image::RgbImage;

use super::coeffs::{coeffs, Coeffs, HALF, PRECISION_BITS};
use super::filter::Resample;

/// A rectangle of the resized image, in output pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The pixels inside `win` of `src` resized to `out_w`×`out_h` with `filter`, as packed RGB rows
/// (`win.width * win.height * 3` bytes), byte-identical to Pillow's `resize((out_w, out_h))`.
pub fn resize_window(
    src: &RgbImage,
    out_w: u32,
    out_h: u32,
    filter: Resample,
    win: Window,
) -> Result<Vec<u8>> {
    let (in_w, in_h) = src.dimensions();
    ensure!(in_w > 0 && in_h > 0, "cannot resize an empty {in_w}x{in_h} image");
    ensure!(out_w > 0 && out_h > 0, "cannot resize to an empty {out_w}x{out_h} image");
    ensure!(
        win.width > 0
            && win.height > 0
            && win.x.checked_add(win.width).is_some_and(|r| r <= out_w)
            && win.y.checked_add(win.height).is_some_and(|b| b <= out_h),
        "window {win:?} is not inside the {out_w}x{out_h} output"
    );
    if filter == Resample::Nearest {
        return Ok(nearest(src, out_w, out_h, win));
    }

    let (x0, width) = (win.x as usize, win.width as usize);
    let (y0, height) = (win.y as usize, win.height as usize);
    let horizontal = (out_w != in_w).then(|| coeffs(filter, in_w, out_w, x0..x0 + width));
    let vertical = (out_h != in_h).then(|| coeffs(filter, in_h, out_h, y0..y0 + height));
    // Source columns and rows the window reads (tap starts and ends grow with the output index).
    let cols = match &horizontal {
        Some(c) => c.start(x0)..c.end(x0 + width - 1),
        None => x0..x0 + width,
    };
    let rows = match &vertical {
        Some(c) => c.start(y0)..c.end(y0 + height - 1),
        None => y0..y0 + height,
    };
    let data = src.as_raw().as_slice();
    let stride = in_w as usize * 3;
    let vertical_first = out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64);

    Ok(if vertical_first {
        // Output rows y0.., over the source columns the horizontal pass will read.
        let tmp = match &vertical {
            Some(c) => vertical_pass(data, stride, cols.clone(), 0, c, y0, height),
            None => copy(data, stride, y0..y0 + height, cols.clone()),
        };
        match &horizontal {
            Some(c) => horizontal_pass(&tmp, cols.len() * 3, cols.start, 0..height, c, x0, width),
            None => tmp,
        }
    } else {
        // Output columns x0.., over the source rows the vertical pass will read.
        let tmp = match &horizontal {
            Some(c) => horizontal_pass(data, stride, 0, rows.clone(), c, x0, width),
            None => copy(data, stride, rows.clone(), x0..x0 + width),
        };
        match &vertical {
            Some(c) => vertical_pass(&tmp, width * 3, 0..width, rows.start, c, y0, height),
            None => tmp,
        }
    })
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass: rows `rows` of `data` (rows of `stride` bytes whose first pixel is column
/// `col0`) → output columns `x0..x0 + width`. Run as a vertical pass on the transposed pixels:
/// per-pixel dot products over interleaved RGB do not vectorise, whole-row accumulation does, and
/// the two transposes cost less than the difference.
fn horizontal_pass(
    data: &[u8],
    stride: usize,
    col0: usize,
    rows: Range<usize>,
    c: &Coeffs,
    x0: usize,
    width: usize,
) -> Vec<u8> {
    let cols = c.start(x0)..c.end(x0 + width - 1);
    let n = rows.len();
    let t = transpose(data, stride, rows, cols.start - col0..cols.end - col0);
    let out_t = vertical_pass(&t, n * 3, 0..n, cols.start, c, x0, width);
    transpose(&out_t, n * 3, 0..width, 0..n)
}

/// Pixels `rows` × `cols` of `data` (rows of `stride` bytes), transposed: one output row per column.
fn transpose(data: &[u8], stride: usize, rows: Range<usize>, cols: Range<usize>) -> Vec<u8> {
    let n = rows.len();
    let mut out = vec![0u8; cols.len() * n * 3];
    for (y, row) in data[rows.start * stride..rows.end * stride].chunks_exact(stride).enumerate() {
        let row = &row[cols.start * 3..cols.end * 3];
        for (x, px) in row.chunks_exact(3).enumerate() {
            let at = (x * n + y) * 3;
            out[at..at + 3].copy_from_slice(px);
        }
    }
    out
}

/// Vertical pass: columns `cols` of `data` (rows of `stride` bytes, the first being source row
/// `row0`) → output rows `y0..y0 + height`. Row-wise accumulation vectorises; integer sums are
/// exact, so the order of accumulation does not change the result.
fn vertical_pass(
    data: &[u8],
    stride: usize,
    cols: Range<usize>,
    row0: usize,
    c: &Coeffs,
    y0: usize,
    height: usize,
) -> Vec<u8> {
    let (from, len) = (cols.start * 3, cols.len() * 3);
    let mut out = vec![0u8; height * len];
    let mut acc = vec![0i32; len];
    for (i, out_row) in out.chunks_exact_mut(len).enumerate() {
        let (start, k) = c.taps(y0 + i);
        acc.fill(HALF);
        for (t, &w) in k.iter().enumerate() {
            let at = (start + t - row0) * stride + from;
            for (a, &p) in acc.iter_mut().zip(&data[at..at + len]) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Columns `cols` of rows `rows`, for an axis whose size does not change.
fn copy(data: &[u8], stride: usize, rows: Range<usize>, cols: Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * cols.len() * 3);
    for row in data[rows.start * stride..rows.end * stride].chunks_exact(stride) {
        out.extend_from_slice(&row[cols.start * 3..cols.end * 3]);
    }
    out
}

/// Pillow's nearest-neighbour resize (`ImagingScaleAffine`): source coordinate of output pixel i
/// is `trunc(a/2 + i·a)` with `a = in/out`, accumulated by repeated addition as Pillow does.
fn nearest(src: &RgbImage, out_w: u32, out_h: u32, win: Window) -> Vec<u8> {
    let xs = nearest_table(src.width(), out_w, win.x, win.width);
    let ys = nearest_table(src.height(), out_h, win.y, win.height);
    let stride = src.width() as usize * 3;
    let data = src.as_raw();
    let mut out = vec![0u8; win.width as usize * win.height as usize * 3];
    for (y, out_row) in ys.iter().zip(out.chunks_exact_mut(win.width as usize * 3)) {
        // Pillow fills pixels that map outside the source with zeros; a full-image box never does.
        let Some(y) = y else { continue };
        let row = &data[y * stride..(y + 1) * stride];
        for (x, px) in xs.iter().zip(out_row.chunks_exact_mut(3)) {
            if let Some(x) = x {
                px.copy_from_slice(&row[x * 3..x * 3 + 3]);
            }
        }
    }
    out
}

fn nearest_table(in_size: u32, out_size: u32, first: u32, len: u32) -> Vec<Option<usize>> {
    let a = in_size as f64 / out_size as f64;
    let mut pos = a * 0.5;
    let mut table = Vec::with_capacity(len as usize);
    for i in 0..first + len {
        if i >= first {
            // Pillow's COORD: negative positions are outside, others truncate.
            let idx = if pos < 0.0 { None } else { Some(pos as usize) };
            table.push(idx.filter(|&x| x < in_size as usize));
        }
        pos += a;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Window {
        fn full(width: u32, height: u32) -> Self {
            Window { x: 0, y: 0, width, height }
        }
    }

    fn gray_row(values: &[u8]) -> RgbImage {
        let data = values.iter().flat_map(|&v| [v, v, v]).collect();
        RgbImage::from_raw(values.len() as u32, 1, data).unwrap()
    }

    fn red(pixels: &[u8]) -> Vec<u8> {
        pixels.iter().step_by(3).copied().collect()
    }

    #[test]
    fn bilinear_downscale_4_to_2() {
        // Weights 3/7, 3/7, 1/7 (see coeffs): (30 + 60 + 30) / 7 = 17.1 and (20 + 90 + 120) / 7 = 32.9.
        let out = resize_window(
            &gray_row(&[10, 20, 30, 40]),
            2,
            1,
            Resample::Bilinear,
            Window::full(2, 1),
        )
        .unwrap();
        assert_eq!(out, vec![17, 17, 17, 33, 33, 33]);
    }

    #[test]
    fn bilinear_upscale_2_to_4() {
        // Scale 1/2: output centres 0.25, 0.75, 1.25, 1.75 in input pixels, ordinary interpolation
        // with the outside neighbour dropped and the weights renormalised: 0, 25, 75, 100.
        let out = resize_window(&gray_row(&[0, 100]), 4, 1, Resample::Bilinear, Window::full(4, 1))
            .unwrap();
        assert_eq!(red(&out), vec![0, 25, 75, 100]);
    }

    #[test]
    fn bicubic_upscale_overshoots_and_clamps() {
        // A step 0, 0, 255, 255 doubled: Keys' cubic rings, and the ringing is clamped to 0..=255.
        let out = resize_window(
            &gray_row(&[0, 0, 255, 255]),
            8,
            1,
            Resample::Bicubic,
            Window::full(8, 1),
        )
        .unwrap();
        let r = red(&out);
        assert_eq!(&r[..2], &[0, 0]);
        assert_eq!(&r[6..], &[255, 255]);
        assert!(r.windows(2).all(|w| w[0] <= w[1]), "{r:?}");
    }

    #[test]
    fn vertical_matches_horizontal_on_a_transposed_image() {
        let values = [3u8, 200, 17, 90, 255, 0, 44];
        let row = gray_row(&values);
        let col = RgbImage::from_raw(1, 7, row.as_raw().clone()).unwrap();
        for f in [
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
            Resample::Nearest,
        ] {
            let h = resize_window(&row, 3, 1, f, Window::full(3, 1)).unwrap();
            let v = resize_window(&col, 1, 3, f, Window::full(1, 3)).unwrap();
            assert_eq!(h, v, "{f:?}");
        }
    }

    #[test]
    fn same_size_is_identity() {
        let img =
            RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, (x * y) as u8]));
        for f in [
            Resample::Nearest,
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
        ] {
            assert_eq!(
                &resize_window(&img, 5, 4, f, Window::full(5, 4)).unwrap(),
                img.as_raw(),
                "{f:?}"
            );
        }
    }

    #[test]
    fn nearest_picks_centres() {
        // 5 -> 2: a = 2.5, positions 1.25 and 3.75 -> inputs 1 and 3.
        let out = resize_window(
            &gray_row(&[10, 20, 30, 40, 50]),
            2,
            1,
            Resample::Nearest,
            Window::full(2, 1),
        )
        .unwrap();
        assert_eq!(red(&out), vec![20, 40]);
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let img = RgbImage::from_fn(37, 43, |x, y| {
            image::Rgb([(x * 7 + y * 3) as u8, (x * x + y) as u8, (y * 11) as u8])
        });
        // Horizontal first (height grows), vertical first (height shrinks by 24 > 2 * 2), one axis only.
        for (w, h) in [(19, 49), (35, 19), (37, 21), (20, 43)] {
            for f in [Resample::Bilinear, Resample::Bicubic, Resample::Lanczos, Resample::Nearest] {
                let full = resize_window(&img, w, h, f, Window::full(w, h)).unwrap();
                let win = Window { x: 3, y: 5, width: 11, height: 13 };
                let part = resize_window(&img, w, h, f, win).unwrap();
                let w = w as usize;
                let expected: Vec<u8> = (5..18)
                    .flat_map(|y| full[(y * w + 3) * 3..(y * w + 14) * 3].to_vec())
                    .collect();
                assert_eq!(part, expected, "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        let img = gray_row(&[1, 2, 3]);
        assert!(resize_window(&img, 0, 1, Resample::Bilinear, Window::full(0, 1)).is_err());
        assert!(resize_window(
            &img,
            2,
            1,
            Resample::Bilinear,
            Window { x: 1, y: 0, width: 2, height: 1 }
        )
        .is_err());
        let empty = RgbImage::new(0, 0);
        assert!(resize_window(&empty, 2, 2, Resample::Bilinear, Window::full(2, 2)).is_err());
    }
}
