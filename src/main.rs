//! The `mono` command line: parse, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use mono::base::io::matrix::MatrixFile;
use mono::config::FloatType;
use mono::data::import::{dtype_name, import_features, ImportOptions, SplitPlan};
use mono::monoscore::{files, ScorePath};

#[global_allocator]
static ALLOCATOR: mono::base::alloc::PeakTrackingAllocator =
    mono::base::alloc::PeakTrackingAllocator;

#[derive(Parser)]
#[command(name = "mono", version, about = "MonoScore and MonoLoss for vision representations")]
struct Cli {
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// When another mono process holds a directory this command writes, wait for it instead of
    /// failing.
    #[arg(long, global = true)]
    wait: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stages a config names (finetune → extract → train → report), reusing finished
    /// ones, with λ sweeps.
    Run {
        /// The TOML config.
        config: PathBuf,
        /// Print the plan and stop.
        #[arg(long)]
        dry_run: bool,
    },
    /// Rebuild report.html (and the sweep table and plots) of a `mono run` directory.
    Report {
        /// The run directory.
        run_dir: PathBuf,
    },
    /// MonoScore of any representation: N×D similarity embeddings and N×M activations.
    Score(ScoreArgs),
    /// Validate a config file and print it with every default filled in.
    Config {
        /// The TOML config.
        config: PathBuf,
    },
    /// Feature stores.
    #[command(subcommand)]
    Features(FeaturesCommand),
    /// Extract features of the config's data set (train and eval splits) with its encoder.
    Extract {
        /// The TOML config.
        config: PathBuf,
        /// At most this many images per split (a quick look).
        #[arg(long, value_parser = mono::base::config::positive)]
        limit: Option<usize>,
        /// Do part i of n (0-based), e.g. 0/4; join the parts with `mono features merge`.
        #[arg(long)]
        shard: Option<String>,
    },
    /// Train an SAE on the config's feature store with reconstruction + λ·MonoLoss, then evaluate.
    Train {
        /// The TOML config.
        config: PathBuf,
        /// Continue from the run's newest checkpoint (same result as an uninterrupted run).
        #[arg(long)]
        resume: bool,
    },
    /// Finetune a backbone with CE + λ·MonoLoss on an intermediate TopK layer.
    Finetune {
        /// The TOML config.
        config: PathBuf,
        /// Continue from the run's newest (per-epoch) checkpoint.
        #[arg(long)]
        resume: bool,
    },
    /// Evaluate an SAE: R², MSE, L0, dead latents, MonoScore, class purity. Either a run
    /// (`mono eval RUN_DIR|CONFIG`) or any SAE in the SAELens layout on a feature store
    /// (`mono eval --sae DIR --features STORE`).
    Eval {
        /// A run directory (holding config.toml) or a config file.
        #[arg(required_unless_present = "sae", conflicts_with = "sae")]
        target: Option<PathBuf>,
        /// Split of the feature set (default for a run: data.eval_split).
        #[arg(long)]
        split: Option<String>,
        /// An SAE directory in the SAELens layout (cfg.json + sae_weights.safetensors), written
        /// by mono or by SAELens.
        #[arg(long, requires = "features")]
        sae: Option<PathBuf>,
        /// With --sae: a feature store, or a feature set with --split.
        #[arg(long, requires = "sae")]
        features: Option<PathBuf>,
        /// With --sae: similarity embeddings of the same rows (default: the features).
        #[arg(long, requires = "sae")]
        similarity: Option<PathBuf>,
        /// With --sae: also write the results as JSON here.
        #[arg(long, requires = "sae")]
        out: Option<PathBuf>,
        /// With --sae: cpu, cuda, cuda:N, metal or auto.
        #[arg(long, default_value = "auto", requires = "sae")]
        device: String,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum FeaturesCommand {
    /// Build a feature store from a features matrix computed elsewhere (+ labels and paths).
    Import(ImportArgs),
    /// Join the feature sets of `mono extract --shard i/n` parts (in the order given) into one.
    Merge {
        /// The part directories, e.g. features-part-0-of-2 features-part-1-of-2.
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// The merged feature set (one store per split).
        #[arg(long)]
        out: PathBuf,
        /// Rows per shard of the merged stores.
        #[arg(long, default_value_t = 16384, value_parser = mono::base::config::positive)]
        shard_size: usize,
    },
}

#[derive(clap::Args)]
struct ImportArgs {
    /// Features (N×D): file.npy, file.safetensors or file.safetensors:tensor.
    #[arg(long)]
    features: String,
    /// Labels: a 1-D integer .npy (one class per row) or a text file with comma-separated
    /// labels per line (multi-label; an empty line = none).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Class names, one per line (default "0".."C-1").
    #[arg(long)]
    label_names: Option<PathBuf>,
    /// Image paths, one per line (default row-{i}).
    #[arg(long)]
    paths: Option<PathBuf>,
    /// Feature set directory; each split's store goes to OUT/<split>.
    #[arg(long)]
    out: PathBuf,
    /// Split name when all rows go to one store (default train).
    #[arg(long)]
    split: Option<String>,
    /// Fraction of rows for OUT/val (seeded random division).
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Fraction of rows for OUT/test (seeded random division).
    #[arg(long)]
    test_fraction: Option<f64>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Rows per shard.
    #[arg(long, default_value_t = 16384, value_parser = mono::base::config::positive)]
    shard_size: usize,
    /// Stored dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = |s: &str| mono::data::import::parse_dtype(s).map_err(|e| e.to_string()))]
    dtype: FloatType,
    /// Rows read at a time.
    #[arg(long, default_value_t = 4096, value_parser = mono::base::config::positive)]
    batch_rows: usize,
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// Similarity embeddings (N×D): file.npy, file.safetensors or file.safetensors:tensor.
    #[arg(long)]
    embeddings: String,
    /// Activations (N×M), same forms; one row per image, same order.
    #[arg(long)]
    activations: String,
    /// Also compute the O(N²) pairwise reference; its scores go to --out.
    #[arg(long)]
    reference: bool,
    /// Write {n, d, m, mean, median, live, dead, scores} here (null = dead neuron).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rows per batch.
    #[arg(long, default_value_t = 4096, value_parser = mono::base::config::positive)]
    batch_rows: usize,
    /// Accumulation path: auto picks sparse for mostly-zero activations.
    #[arg(long, value_enum, default_value_t = ScorePath::Auto)]
    path: ScorePath,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One-pass MonoScore (sparse and dense paths) against the pairwise reference.
    Monoscore(mono::bench::monoscore::MonoScoreBenchArgs),
    /// Samples/s of an SAE training step per architecture, with and without MonoLoss.
    Train(mono::bench::train::TrainBenchArgs),
    /// Images/s of each encoder's forward pass (real architectures, random weights).
    Extract(mono::bench::extract::ExtractBenchArgs),
    /// Images/s of JPEG decoding (and preprocessing): mono's decoder beside the image crate's.
    Decode(mono::bench::decode::DecodeBenchArgs),
    /// Images/s of a finetuning step for ResNet-50 and CLIP-ViT-B/32.
    Finetune(mono::bench::finetune::FinetuneBenchArgs),
    /// GFLOP/s of the convolution products ResNet-50 trains with, per layer shape.
    Gemm(mono::bench::gemm::GemmBenchArgs),
    /// An ImageNet-size rehearsal on synthetic features: import, reader, training, evaluation.
    Scale(mono::bench::scale::ScaleBenchArgs),
    /// How training and evaluation time and memory grow with N, M, k and D, and what the
    /// paper's SAE runs would take.
    Growth(mono::bench::growth::GrowthBenchArgs),
}

fn main() -> ExitCode {
    mono::base::alloc::configure_allocator();
    let cli = Cli::parse();
    mono::base::progress::set_quiet(cli.quiet);
    mono::base::lock::set_wait(cli.wait);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// One line: the outer context first, then each cause not already said (some errors repeat
/// their source's text in their own).
fn format_error(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !parts.iter().any(|p| p.contains(&cause)) {
            parts.push(cause);
        }
    }
    parts.join(": ")
}

fn run(cli: Cli) -> Result<()> {
    if let Some(threads) = cli.threads {
        limit_threads(threads).context("cannot set --threads")?;
    }
    if matches!(cli.command, Command::Bench(_)) {
        println!("machine: {}", mono::bench::machine());
    }
    match cli.command {
        Command::Score(args) => score(args),
        Command::Run { config, dry_run } => run_pipeline(&config, dry_run),
        Command::Report { run_dir } => {
            println!("wrote {}", mono::report::build(&run_dir)?.display());
            Ok(())
        }
        Command::Config { config } => {
            let config = mono::Config::load(&config)?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Features(FeaturesCommand::Import(args)) => import(args),
        Command::Train { config, resume } => train(&config, resume),
        Command::Finetune { config, resume } => {
            let config = mono::Config::load(&config)?;
            apply_thread_config(&config);
            let results = mono::pipeline::stages::finetune(&config, &config.run_dir(), resume)?;
            let last = &results.final_eval;
            println!(
                "finetuned {} epochs into {}: top-1 {:.4}, top-5 {:.4}, TopK-layer MonoScore {}",
                results.history.len(),
                config.run_dir().display(),
                last.top1,
                last.top5,
                fmt_opt(last.monoscore.mean)
            );
            Ok(())
        }
        Command::Extract { config, limit, shard } => extract(&config, limit, shard.as_deref()),
        Command::Features(FeaturesCommand::Merge { parts, out, shard_size }) => {
            for s in mono::data::merge::merge_feature_sets(&parts, &out, shard_size)? {
                println!(
                    "{}: {} rows ({} skipped) → {}",
                    s.split,
                    s.rows,
                    s.skipped,
                    s.dir.display()
                );
            }
            Ok(())
        }
        Command::Eval { target: Some(target), split, .. } => {
            let (path, results) = mono::eval::eval_run(&target, split.as_deref())?;
            print_results(&results);
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Eval { target: None, split, sae, features, similarity, out, device } => {
            let (sae, features) = (sae.expect("clap: --sae"), features.expect("clap: --features"));
            let device = mono::base::device::open_device(&device)?;
            let kernels =
                mono::base::host::Kernels::choose(mono::base::host::OpsMode::Auto, &device);
            let doc = mono::eval::eval_external(
                &sae,
                &features,
                split.as_deref(),
                similarity.as_deref(),
                &device,
                kernels,
            )?;
            print_results(&doc.results);
            if let Some(out) = out {
                mono::base::io::write_json_atomic(&out, &serde_json::to_value(&doc)?)?;
                println!("wrote {}", out.display());
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Monoscore(args)) => {
            mono::bench::monoscore::run(&args).map(|_| ())
        }
        Command::Bench(BenchCommand::Train(args)) => mono::bench::train::run(&args).map(|_| ()),
        Command::Bench(BenchCommand::Extract(args)) => mono::bench::extract::run(&args).map(|_| ()),
        Command::Bench(BenchCommand::Decode(args)) => mono::bench::decode::run(&args).map(|_| ()),
        Command::Bench(BenchCommand::Gemm(args)) => mono::bench::gemm::run(&args).map(|_| ()),
        Command::Bench(BenchCommand::Scale(args)) => mono::bench::scale::run(&args).map(|_| ()),
        Command::Bench(BenchCommand::Growth(args)) => mono::bench::growth::run(&args).map(|_| ()),
        Command::Bench(BenchCommand::Finetune(args)) => {
            mono::bench::finetune::run(&args).map(|_| ())
        }
    }
}

fn score(args: ScoreArgs) -> Result<()> {
    let embeddings = MatrixFile::open(&args.embeddings)?;
    let activations = MatrixFile::open(&args.activations)?;
    files::check_pair(&embeddings, &activations)?;
    let one_pass = files::score_files(&embeddings, &activations, args.batch_rows, args.path)?;
    let result = if args.reference {
        let reference = files::score_files_pairwise(&embeddings, &activations)?;
        let diff = one_pass.max_relative_difference(&reference, 1e-3)?;
        println!("pairwise reference computed; max relative difference to the one-pass engine: {diff:.2e}");
        reference
    } else {
        one_pass
    };
    let s = result.summary();
    println!(
        "MonoScore over N = {} images, D = {}, M = {} neurons: mean {} median {} ({} live, {} dead)",
        result.n,
        result.d,
        result.m(),
        fmt_opt(s.mean),
        fmt_opt(s.median),
        s.live,
        s.dead
    );
    if let Some(out) = &args.out {
        mono::base::io::write_json_atomic(out, &result.to_json())?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn import(args: ImportArgs) -> Result<()> {
    let opts = ImportOptions {
        plan: SplitPlan::from_args(args.split, args.val_fraction, args.test_fraction, args.seed)?,
        features: args.features,
        labels: args.labels,
        label_names: args.label_names,
        paths: args.paths,
        out: args.out,
        shard_size: args.shard_size,
        dtype: args.dtype,
        batch_rows: args.batch_rows,
    };
    for s in import_features(&opts)?.splits {
        let classes =
            if s.classes > 0 { format!(", {} classes", s.classes) } else { String::new() };
        println!(
            "{}: {} rows × {} ({}), labels {}{classes}, {} shard(s) → {}",
            s.split,
            s.rows,
            s.dim,
            dtype_name(s.dtype),
            s.labels,
            s.shards,
            s.dir.display()
        );
    }
    Ok(())
}

fn train(config_path: &std::path::Path, resume: bool) -> Result<()> {
    let config = mono::Config::load(config_path)?;
    apply_thread_config(&config);
    let outcome = mono::pipeline::stages::train(&config, &config.run_dir(), resume)?;
    println!("trained {} steps into {}", outcome.steps, config.run_dir().display());
    print_results(&outcome.results.results);
    Ok(())
}

/// A score with four decimals, or "n/a".
fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into())
}

fn print_results(r: &mono::layout::EvalResults) {
    println!(
        "{} split, {} images: R² {:.4} (total {:.4})  MSE {:.3e}  L0 {:.1}  dead latents {}/{}",
        r.split,
        r.n_images,
        r.r2,
        r.r2_total,
        r.mse,
        r.l0,
        r.dead_latents,
        r.dead_latents + r.live_latents
    );
    println!(
        "MonoScore mean {} median {} ({} live, {} dead)",
        fmt_opt(r.monoscore.mean),
        fmt_opt(r.monoscore.median),
        r.monoscore.live,
        r.monoscore.dead
    );
    if let Some(p) = &r.purity {
        println!(
            "class purity: binary {:.4}  weighted {:.4}  over {} live latents",
            p.binary, p.weighted, p.latents
        );
    }
}

fn apply_thread_config(config: &mono::Config) {
    if let Some(threads) = config.run.threads {
        // Ignored when --threads already built the pool: the command line wins.
        limit_threads(threads).ok();
    }
}

/// Runs mono's CPU work on `threads` threads: rayon's global pool (our kernels, the gemm crate)
/// and candle's own pool for its element-wise ops, which otherwise sizes itself from the core
/// count when first used. Fails when the pool was already built.
fn limit_threads(threads: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    // Before any candle op: the pool reads it once, when it starts. No other thread reads the
    // environment at this point of start-up.
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    Ok(())
}

fn extract(config_path: &std::path::Path, limit: Option<usize>, shard: Option<&str>) -> Result<()> {
    let config = mono::Config::load(config_path)?;
    apply_thread_config(&config);
    let part = shard.map(mono::extract::parse_part).transpose()?;
    for r in mono::extract::extract(&config, &mono::extract::ExtractOptions { limit, part })? {
        if r.already_done {
            println!("{}: already extracted ({} rows) in {}", r.split, r.rows, r.dir.display());
        } else {
            let new = r.rows - r.resumed_rows + r.skipped;
            println!(
                "{}: {} rows, {} skipped → {} ({:.1} images/s{})",
                r.split,
                r.rows,
                r.skipped,
                r.dir.display(),
                new as f64 / r.seconds.max(1e-9),
                if r.resumed_rows > 0 {
                    format!("; resumed after {} rows", r.resumed_rows)
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

fn run_pipeline(config_path: &std::path::Path, dry_run: bool) -> Result<()> {
    let config = mono::Config::load(config_path)?;
    apply_thread_config(&config);
    // A device that cannot be opened fails before the plan is printed.
    mono::base::device::open_device(&config.run.device)?;
    let plans = mono::pipeline::plan(&config)?;
    for line in mono::pipeline::describe(&config, &plans) {
        println!("{line}");
    }
    if dry_run {
        return Ok(());
    }
    let summary = mono::pipeline::run(&config, &plans)?;
    let run_dir = config.run_dir();
    if let Ok(md) = std::fs::read_to_string(run_dir.join(mono::layout::SWEEP_MD)) {
        print!("\n{md}");
    } else if let Some(run) = summary.runs.first() {
        println!("\n{}", serde_json::to_string_pretty(&run.results)?);
    }
    if config.run.stages.contains(&mono::config::Stage::Report) {
        println!("\nreport: {}", run_dir.join(mono::layout::REPORT_FILE).display());
    }
    Ok(())
}
