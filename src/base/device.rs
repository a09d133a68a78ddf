//! `run.device`: "auto" | "cpu" | "cuda" | "cuda:N" | "metal" → a candle Device, with a clear
//! error when this binary was built without the backend.

use anyhow::{bail, Context, Result};
use candle_core::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl DeviceSpec {
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "auto" => DeviceSpec::Auto,
            "cpu" => DeviceSpec::Cpu,
            "cuda" | "gpu" => DeviceSpec::Cuda(0),
            "metal" | "mps" => DeviceSpec::Metal,
            _ => match t.strip_prefix("cuda:") {
                Some(n) => DeviceSpec::Cuda(
                    n.parse().with_context(|| format!("`{n}` is not a CUDA device ordinal"))?,
                ),
                None => bail!("unknown device; expected auto, cpu, cuda, cuda:N or metal"),
            },
        })
    }

    /// Opens the device. "auto" picks CUDA, then Metal, then the CPU.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("device cuda:{n} requested, but this binary was built without CUDA; rebuild with `cargo build --release --features cuda`");
                }
                Device::new_cuda(n).with_context(|| format!("cannot open CUDA device {n}"))
            }
            DeviceSpec::Metal => {
                if !candle_core::utils::metal_is_available() {
                    bail!("device metal requested, but this binary was built without Metal; rebuild with `cargo build --release --features metal` on macOS");
                }
                Device::new_metal(0).context("cannot open the Metal device")
            }
        }
    }
}

/// Parses and opens `run.device`.
pub fn open_device(text: &str) -> Result<Device> {
    DeviceSpec::parse(text).with_context(|| format!("run.device = {text:?}"))?.open()
}

/// Checks that `device` computes in `dtype` (a tiny matmul), so that a run asking for bf16 or f16
/// where the device has no such matmul fails at once, naming `key`.
pub fn check_dtype(device: &Device, dtype: candle_core::DType, key: &str) -> Result<()> {
    use candle_core::DType;
    if dtype == DType::F32 || dtype == DType::F64 {
        return Ok(());
    }
    if device.is_cpu() && dtype == DType::BF16 {
        bail!("{key}: bf16 is not supported on the CPU (candle has no bf16 matmul there); use f32 or f16");
    }
    let probe = candle_core::Tensor::ones((2, 2), dtype, device)
        .and_then(|a| a.matmul(&a))
        .and_then(|p| p.to_dtype(DType::F32));
    probe
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{key}: this device cannot compute in {dtype:?} ({e})"))
}
