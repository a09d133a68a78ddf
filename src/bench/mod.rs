//! `mono bench ...`: benchmarks that print timings and ratios (never asserted in tests).

pub mod decode;
pub mod extract;
pub mod finetune;
pub mod gemm;
pub mod growth;
pub mod monoscore;
pub mod scale;
pub mod synthetic;
pub mod train;

/// The machine a benchmark runs on, for its header and JSON: the CPU as the OS names it, with
/// its x86 family and model (a VM often gives different generations one name, and the
/// generation decides the GEMM speed: AVX-512 or not), the vector instructions mono's own
/// kernels use, and the thread count.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let name = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let generation = match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => format!(" (family {family}, model {model})"),
        _ => String::new(),
    };
    let simd = match crate::base::simd::level() {
        crate::base::simd::Level::Avx512 => "AVX-512",
        crate::base::simd::Level::Avx2 => "AVX2",
        crate::base::simd::Level::Baseline => "baseline SIMD",
    };
    format!("{name}{generation}, {simd}, {} threads", rayon::current_num_threads())
}

/// Writes a benchmark's JSON document (an object) with the `machine` it ran on.
pub(crate) fn write_json(path: &std::path::Path, mut doc: serde_json::Value) -> anyhow::Result<()> {
    if let Some(object) = doc.as_object_mut() {
        object.insert("machine".into(), machine().into());
    }
    crate::base::io::write_json_atomic(path, &doc)
}

/// The median of timings (the upper one of an even count): robust to the one-off page faults
/// and machine noise that a mean carries into a handful of steps.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
