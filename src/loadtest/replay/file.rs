//! `stockflow replay --file F` without a target: the file appended to this data directory's log as
//! fast as it goes (streamed, one batch in memory), then consumed and delivered.

use std::borrow::Cow;
use std::fs::File;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use stockflow_pipeline::{EmbeddedLog, OutRecord, Progress};

use super::ReplayArgs;
use crate::loadtest::ndjson::partition_key;
use crate::runtime::config::Settings;
use crate::runtime::{Embedded, consume_and_deliver, print_reports};

/// Appends `--file` to the embedded log and (unless `--no-consume`) consumes it with the
/// connectors' drains, then stops.
pub async fn append_and_consume(args: &ReplayArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    if args.dir.is_some() || args.profile.is_some() || args.speedup.is_some() || args.rate.is_some() {
        bail!("--dir, --profile, --speedup and --rate drive a --target (embedded, local, http://…, kinesis:…)");
    }
    let file = args.file.as_deref().context("--file is required")?;
    let backend = Embedded::open(settings, true)?;
    let started = std::time::Instant::now();
    let appended = append_file(&backend.log, file, args.batch.unwrap_or(10_000).max(1) as usize)?;
    println!("appended {appended} records from {} in {:.2?}", file.display(), started.elapsed());
    if args.no_consume {
        return Ok(ExitCode::SUCCESS);
    }
    backend.log.seal();
    let reports = consume_and_deliver(&backend, settings, true, Arc::new(Progress::default())).await?;
    print_reports(&reports);
    // Opening the store again gives back what retention freed (compacted when mostly free).
    drop(backend);
    drop(Embedded::open(settings, true)?);
    Ok(ExitCode::SUCCESS)
}

/// Streams an NDJSON file into the log, `batch` lines per append: memory stays at one batch
/// whatever the file's size. Returns the records appended.
pub fn append_file(log: &EmbeddedLog, file: &Path, batch: usize) -> anyhow::Result<u64> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::with_capacity(
        1 << 20,
        File::open(file).with_context(|| format!("reading {}", file.display()))?,
    );
    let mut chunk: Vec<u8> = Vec::with_capacity(batch * 256);
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::with_capacity(batch);
    let mut appended = 0u64;
    let flush = |chunk: &mut Vec<u8>, ranges: &mut Vec<std::ops::Range<usize>>| -> anyhow::Result<u64> {
        let keys: Vec<Cow<'_, str>> = ranges.iter().map(|r| partition_key(&chunk[r.clone()])).collect();
        let out: Vec<OutRecord<'_>> =
            ranges.iter().zip(&keys).map(|(r, k)| OutRecord { key: k, payload: &chunk[r.clone()] }).collect();
        log.append(&out)?;
        let n = out.len() as u64;
        drop(out);
        drop(keys);
        chunk.clear();
        ranges.clear();
        Ok(n)
    };
    loop {
        let start = chunk.len();
        let n = reader.read_until(b'\n', &mut chunk).with_context(|| format!("reading {}", file.display()))?;
        if n == 0 {
            break;
        }
        let line = &chunk[start..];
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.trim_ascii().is_empty() {
            chunk.truncate(start);
            continue;
        }
        ranges.push(start..start + line.len());
        if ranges.len() >= batch {
            appended += flush(&mut chunk, &mut ranges)?;
        }
    }
    if !ranges.is_empty() {
        appended += flush(&mut chunk, &mut ranges)?;
    }
    Ok(appended)
}
