//! Direct access to the f32 data of CPU tensors, for custom candle ops and host kernels. Every
//! access counts as a host kernel run (`base::host::host_kernels`).

use candle_core::{CpuStorage, Device, Layout, Shape, Storage, Tensor};

use crate::base::simd::vectorized;

pub type CResult<T> = candle_core::Result<T>;

/// The contiguous f32 data of a custom op's CPU input.
pub fn contiguous<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    crate::base::host::host_kernel_ran();
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

/// Runs `f` on the f32 data of a CPU tensor without copying (when already contiguous).
pub fn with_cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    with_cpu_slices([t], |[data]| f(data))
}

/// Runs `f` on the f32 data of several CPU tensors at once, without copying those already
/// contiguous (a layer's weights, all read by one kernel).
pub fn with_cpu_slices<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> CResult<R> {
    crate::base::host::host_kernel_ran();
    let owned = ts.iter().map(|t| t.contiguous()).collect::<CResult<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(cpu) => slices.push(contiguous("tensor", cpu, layout)?),
            _ => candle_core::bail!("expected a CPU tensor"),
        }
    }
    let slices: [&[f32]; N] = slices.try_into().expect("one slice per tensor");
    Ok(f(slices))
}

/// acc += other, element by element, in parallel chunks run in vector registers (a residual
/// connection, a sum of gradients).
pub fn add_assign(acc: &mut [f32], other: &[f32]) {
    use rayon::prelude::*;
    assert_eq!(acc.len(), other.len(), "added vectors differ in length");
    acc.par_chunks_mut(1 << 14)
        .zip(other.par_chunks(1 << 14))
        .for_each(|(a, o)| vectorized!(a.iter_mut().zip(o).for_each(|(a, &o)| *a += o)));
}

/// A CPU tensor owning `data`.
pub fn cpu_tensor(data: Vec<f32>, shape: impl Into<Shape>) -> CResult<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// The two dimensions of a custom op's 2-D input.
pub fn dims2(l: &Layout) -> CResult<(usize, usize)> {
    l.shape().dims2()
}

/// A new vector of `len` floats written by `fill(index, chunk)` over its consecutive chunks of
/// `chunk` elements, in parallel, with no zero-fill first (an activation-sized buffer would be
/// written twice and its fresh pages cleared by the kernel on top). `fill` must write every
/// element of its chunk before reading it.
pub fn par_filled(len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    par_filled_with(len, chunk, fill).0
}

/// [`par_filled`] whose `fill` also returns a value per chunk: the values, in chunk order.
pub fn par_filled_with<T: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [f32]) -> T + Sync,
) -> (Vec<f32>, Vec<T>) {
    use rayon::prelude::*;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let values = out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, part)| {
            // SAFETY: f32 has no invalid bit patterns, and `fill` writes each element before
            // anything reads it.
            let part = unsafe { &mut *(part as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            fill(i, part)
        })
        .collect();
    // SAFETY: the chunks cover all `len` slots and `fill` wrote every one.
    unsafe { out.set_len(len) };
    (out, values)
}

/// Zeroes a slice of unwritten floats and hands it out as written: for a task that zeroes its
/// own part of a fresh buffer just before adding into it, instead of one zero-fill up front.
pub fn zeroed(slots: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    slots.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every slot was just written, and f32 has no invalid bit patterns.
    unsafe { &mut *(slots as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// Rescales each `d`-wide row of `data` to unit L2 norm (rows of zeros stay zero), the norm
/// summed in f64 over vector lanes: the decoder constraint after every training step.
pub fn normalize_rows(data: &mut [f32], d: usize) {
    use rayon::prelude::*;
    data.par_chunks_mut(d).for_each(|row| crate::base::simd::vectorized!(normalize_row(row)));
}

/// One row of [`normalize_rows`] (in vector registers when called inside `vectorized!`).
#[inline(always)]
pub fn normalize_row(row: &mut [f32]) {
    let norm = crate::base::simd::lane_sum(row, |x| x as f64 * x as f64).sqrt() as f32;
    if norm > 0.0 {
        row.iter_mut().for_each(|x| *x /= norm);
    }
}

/// [`normalize_rows`] with the norm in one running f32 sum (a scalar loop): the SAE
/// initialisation keeps the bits it always had, so a seed still gives the same starting weights.
pub fn normalize_rows_sequential(data: &mut [f32], d: usize) {
    use rayon::prelude::*;
    data.par_chunks_mut(d).for_each(|row| {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
        }
    });
}

#[cfg(test)]
mod tests {
    /// Every chunk is handed out once, in place, with its index; the values come back in chunk
    /// order, and a short last chunk is its own (the allocator held NaNs before).
    #[test]
    fn par_filled_with_hands_out_each_chunk_once_in_order() {
        drop(std::hint::black_box(vec![f32::NAN; 1003]));
        let (out, values) = super::par_filled_with(1003, 100, |i, part| {
            part.iter_mut().enumerate().for_each(|(j, v)| *v = (i * 100 + j) as f32);
            (i, part.len())
        });
        assert_eq!(out, (0..1003).map(|v| v as f32).collect::<Vec<_>>());
        let want: Vec<(usize, usize)> =
            (0..11).map(|i| (i, if i < 10 { 100 } else { 3 })).collect();
        assert_eq!(values, want);
        assert_eq!(super::par_filled_with(0, 8, |i, _| i), (Vec::new(), Vec::new()));
    }
}
