//! `stockflow generate` (the demo's deterministic stream to a file) and `stockflow loadgen` (a
//! profile's order stream with its schedule and expected result); the generators themselves live
//! in [`crate::loadtest`].

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::runtime::config::Settings;

/// Arguments of `stockflow generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Output file (NDJSON).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub stream: crate::loadtest::generate::StreamArgs,
}

/// Writes the stream of `args` as NDJSON.
pub fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let stream = crate::loadtest::generate::generate(&args.stream.to_config());
    let out = File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    stream.write_ndjson(std::io::BufWriter::new(out))?;
    println!("wrote {} events ({} bytes) to {}", stream.len(), stream.bytes(), args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes a profile's stream, schedule and expected result.
pub fn loadgen(args: &crate::loadtest::loadgen::LoadgenArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    crate::loadtest::loadgen::run(args, std::sync::Arc::clone(&settings.engine), &settings.amazon)?;
    Ok(ExitCode::SUCCESS)
}
