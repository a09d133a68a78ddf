//! Which implementation the numerical kernels take, and every transfer between host and device
//! of the training step, counted.
//!
//! `Kernels::Host`: hand-written CPU kernels (custom candle ops over CPU memory: sparse encoder and
//! decoder, selection by `select_nth_unstable`, host optimisers). `Kernels::Portable`: candle
//! tensor ops only, with every buffer on the device, which is what CUDA and Metal run; on the CPU
//! it is chosen with `run.ops = "portable"` so that the GPU path is tested on any machine.
//!
//! The step code reads tensors to the host only through `read_f32`, `read_scalar` and
//! `upload_f32` here, and host kernels announce themselves through `host_kernel_ran`. Both are
//! counted per thread, so a test can prove that a portable step moves nothing but its input batch
//! (and the logged scalars) and runs no host kernel.

use std::cell::Cell;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// `run.ops`: which kernels to use.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OpsMode {
    /// Host kernels on the CPU, portable kernels on CUDA and Metal.
    #[default]
    Auto,
    /// Portable kernels everywhere (the GPU path, testable on the CPU).
    Portable,
}

/// The kernels a computation runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    Host,
    Portable,
}

impl Kernels {
    /// Host kernels only for f32 work on the CPU in `auto` mode.
    pub fn choose(mode: OpsMode, device: &Device) -> Self {
        match (mode, device.is_cpu()) {
            (OpsMode::Auto, true) => Kernels::Host,
            _ => Kernels::Portable,
        }
    }

    /// The kernels for `tensor` under this choice: host kernels need f32 CPU data.
    pub fn for_tensor(self, tensor: &Tensor) -> Self {
        if self == Kernels::Host && tensor.device().is_cpu() && tensor.dtype() == DType::F32 {
            Kernels::Host
        } else {
            Kernels::Portable
        }
    }

    pub fn is_host(self) -> bool {
        self == Kernels::Host
    }

    /// Runs a training step, `f`: with host kernels on one of rayon's pool threads (this one, if
    /// it is one), else here. A kernel started from a thread outside the pool is handed to the
    /// pool and its end signalled back, two thread wake-ups per parallel kernel, and a step runs
    /// hundreds; started on a pool thread it forks in place and the other workers steal their
    /// parts (ResNet-50's finetuning step 5–8 % faster on two cores). `f` must not wait for
    /// anything but its own rayon jobs: a channel fed by a thread that needs the pool could
    /// starve a one-thread pool. This thread's counters (`transfers`, `host_kernels`) count
    /// what `f` did on the pool thread.
    pub fn run<R: Send>(self, f: impl FnOnce() -> R + Send) -> R {
        if !self.is_host() || rayon::current_thread_index().is_some() {
            return f();
        }
        let (result, transfers, kernels) = rayon::scope(|_| {
            let before = (self::transfers(), host_kernels());
            let result = f();
            (result, self::transfers() - before.0, host_kernels() - before.1)
        });
        TRANSFERS.with(|c| c.set(c.get() + transfers));
        HOST_KERNELS.with(|c| c.set(c.get() + kernels));
        result
    }
}

/// The dtype of accumulated statistics on `device`: f64 where the device has it.
pub fn stat_dtype(device: &Device) -> DType {
    if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

thread_local! {
    static TRANSFERS: Cell<u64> = const { Cell::new(0) };
    static HOST_KERNELS: Cell<u64> = const { Cell::new(0) };
}

/// Host↔device transfers made on this thread through this module so far.
pub fn transfers() -> u64 {
    TRANSFERS.with(Cell::get)
}

/// Host kernels run on this thread so far.
pub fn host_kernels() -> u64 {
    HOST_KERNELS.with(Cell::get)
}

fn count_transfer() {
    TRANSFERS.with(|c| c.set(c.get() + 1));
}

/// Marks the start of a host kernel (a custom op reading CPU memory).
pub fn host_kernel_ran() {
    HOST_KERNELS.with(|c| c.set(c.get() + 1));
}

/// A tensor's values on the host, as f32 (one counted transfer).
pub fn read_f32(t: &Tensor) -> Result<Vec<f32>> {
    count_transfer();
    Ok(t.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

/// A one-element tensor's value on the host (one counted transfer).
pub fn read_scalar(t: &Tensor) -> Result<f64> {
    count_transfer();
    Ok(t.detach().to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?[0])
}

/// Host values onto `device` (one counted transfer).
pub fn upload_f32(
    data: &[f32],
    shape: impl Into<candle_core::Shape>,
    device: &Device,
) -> Result<Tensor> {
    count_transfer();
    Ok(Tensor::from_slice(data, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host steps run on a pool thread and their counts reach the caller's counters; portable
    /// steps stay on the calling thread.
    #[test]
    fn host_steps_run_on_the_pool_and_keep_their_counts() {
        let outside = std::thread::spawn(|| {
            let before = host_kernels();
            let pooled = Kernels::Host.run(|| {
                host_kernel_ran();
                rayon::current_thread_index().is_some()
            });
            let here = Kernels::Portable.run(|| rayon::current_thread_index().is_some());
            (pooled, here, host_kernels() - before)
        });
        assert_eq!(outside.join().unwrap(), (true, false, 1));
    }
}
