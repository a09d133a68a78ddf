//! What every layer uses: the validated config, devices, file formats and atomic writes, the
//! dense and sparse CPU kernels (and the sink their parameter gradients bypass candle's store
//! through), progress bars, the allocator and memory measurement.

pub mod alloc;
pub mod amx;
pub mod config;
pub mod cpu;
pub mod device;
pub mod fingerprint;
pub mod gemm;
pub mod grad_sink;
pub mod host;
pub mod io;
pub mod lock;
pub mod memory;
pub mod progress;
pub mod screen;
pub mod simd;
pub mod sparse;
