//! NDJSON in and out: the files the load tools write and `replay` reads, and the dumps.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

/// Reads an NDJSON file into its non-empty lines.
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Non-empty lines of an NDJSON buffer (trailing `\r` removed).
pub fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    buf.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).filter(|l| !l.trim_ascii().is_empty())
}

#[derive(Deserialize)]
struct KeyOnly<'a> {
    #[serde(borrow)]
    sku: Cow<'a, str>,
}

/// The partition key of a raw record: its SKU, or `""` for a record without one (it will be
/// dead-lettered by the shard that gets it).
pub fn partition_key(record: &[u8]) -> Cow<'_, str> {
    stockflow_state::event::scanned_sku(record)
        .unwrap_or_else(|| serde_json::from_slice::<KeyOnly<'_>>(record).map(|k| k.sku).unwrap_or(Cow::Borrowed("")))
}

pub fn print_ndjson<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> anyhow::Result<()> {
    write_ndjson(std::io::stdout().lock(), items)
}

/// Writes each item as one JSON line, buffered.
pub fn write_ndjson<T: serde::Serialize>(out: impl Write, items: impl IntoIterator<Item = T>) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(out);
    for item in items {
        serde_json::to_writer(&mut out, &item)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::partition_key;

    #[test]
    fn the_partition_key_is_the_sku_however_the_record_is_written() {
        let flat = br#"{"id":"e","type":"stock_adjusted","sku":"SKU-1","ts":1795737600000,"delta":1}"#;
        assert_eq!(partition_key(flat), "SKU-1");
        // Escapes, nested values and broken events are read by serde, which finds the SKU too.
        let escaped = br#"{"id":"e","sku":"SKU-\u0031","extra":{"a":[1]}}"#;
        assert_eq!(partition_key(escaped), "SKU-1");
        assert_eq!(partition_key(br#"{"id":"e"}"#), "");
        assert_eq!(partition_key(b"not json"), "");
    }
}
