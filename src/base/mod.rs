//! What every layer uses: the validated config, devices, file formats and atomic writes, the
//! dense and sparse CPU kernels, progress bars, the allocator and memory measurement.

pub mod alloc;
pub mod config;
pub mod cpu;
pub mod device;
pub mod fingerprint;
pub mod gemm;
pub mod host;
pub mod io;
pub mod lock;
pub mod memory;
pub mod progress;
pub mod simd;
pub mod sparse;
