//! The FBA inventory ledger summary report (`GET_LEDGER_SUMMARY_VIEW_DATA`): tab-separated,
//! plain or gzip (detected by its magic bytes), one row per day (or month), FNSKU, disposition
//! and location. Columns are found by **header name** — real files spell them with spaces
//! ("Ending Warehouse Balance"), some tools with underscores or other case — and extra or missing
//! columns are tolerated; `Date`, `MSKU`, `Disposition` and `Ending Warehouse Balance` are required.
//!
//! Per MSKU, the **latest date** in the file counts (rows of that date summed over FNSKUs and
//! locations, or one location with [`LedgerFilter::location`]):
//! - `SELLABLE` ending balance → [`FbaCount::fulfillable`] (the ledger counts units physically in
//!   the warehouse, which includes those picked for customer orders until they ship — stockflow's
//!   `on_hand`); its "In Transit Between Warehouses" → `transshipment`;
//! - every other disposition's ending balance (`CUSTOMER_DAMAGED`, `DEFECTIVE`, …) →
//!   `unfulfillable`;
//! - the end of the latest date (UTC) → `last_updated_ms`: events after it are timing.

use std::collections::BTreeMap;
use std::io::Read;

use super::{AmazonError, FbaCount};

/// Which rows count.
#[derive(Debug, Clone, Default)]
pub struct LedgerFilter {
    /// Only rows of this `Location` (a country code such as `US`), when set.
    pub location: Option<String>,
}

/// Reads a report's bytes (plain or gzip) into one count per MSKU, sorted by MSKU.
pub fn parse(bytes: &[u8], filter: &LedgerFilter) -> Result<Vec<FbaCount>, AmazonError> {
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_string(&mut s)
            .map_err(|e| AmazonError::Malformed(format!("ledger report: not a readable gzip file: {e}")))?;
        s
    } else {
        String::from_utf8(bytes.to_vec()).map_err(|_| AmazonError::Malformed("ledger report: not UTF-8 text".into()))?
    };
    parse_text(&text, filter)
}

fn norm(h: &str) -> String {
    h.trim().trim_matches('"').chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase()
}

/// A date cell (`2026-11-30`, `11/30/2026`, `11/2026`) as (year, month, day) — a month counts as
/// its last day.
fn date_of(cell: &str) -> Option<(i16, i8, i8)> {
    let c = cell.trim().trim_matches('"');
    let c = c.split(['T', ' ']).next().unwrap_or(c);
    let parts: Vec<&str> = c.split(['-', '/']).collect();
    let num = |s: &str| s.parse::<i32>().ok();
    let (y, m, d) = match parts.as_slice() {
        [y, m, d] if y.len() == 4 => (num(y)?, num(m)?, num(d)?),
        [m, d, y] if y.len() == 4 => (num(y)?, num(m)?, num(d)?),
        [m, y] if y.len() == 4 => {
            let (y, m) = (num(y)?, num(m)?);
            let last = jiff::civil::Date::new(i16::try_from(y).ok()?, i8::try_from(m).ok()?, 1).ok()?.last_of_month();
            (y, m, i32::from(last.day()))
        }
        _ => return None,
    };
    let date = jiff::civil::Date::new(i16::try_from(y).ok()?, i8::try_from(m).ok()?, i8::try_from(d).ok()?).ok()?;
    Some((date.year(), date.month(), date.day()))
}

fn end_of_day_ms((y, m, d): (i16, i8, i8)) -> Option<i64> {
    let next = jiff::civil::Date::new(y, m, d).ok()?.tomorrow().ok()?;
    Some(next.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp().as_millisecond() - 1)
}

/// [`parse`] on text.
pub fn parse_text(text: &str, filter: &LedgerFilter) -> Result<Vec<FbaCount>, AmazonError> {
    // Row numbers as an editor shows them (1 = the header), blank lines skipped but counted.
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| AmazonError::Malformed("ledger report: empty file".into()))?;
    let header = header.trim_start_matches('\u{feff}');
    let names: Vec<String> = header.split('\t').map(norm).collect();
    let col = |name: &str| names.iter().position(|n| n == name);
    let required = |name: &str, shown: &str| {
        col(name).ok_or_else(|| AmazonError::Malformed(format!("ledger report: no {shown:?} column")))
    };
    let (date_at, sku_at, disposition_at, ending_at) = (
        required("date", "Date")?,
        required("msku", "MSKU")?,
        required("disposition", "Disposition")?,
        required("endingwarehousebalance", "Ending Warehouse Balance")?,
    );
    let (transit_at, location_at) = (col("intransitbetweenwarehouses"), col("location"));
    if filter.location.is_some() && location_at.is_none() {
        return Err(AmazonError::Malformed("ledger report: no \"Location\" column to filter on".into()));
    }
    // MSKU → (latest date, count over that date's rows).
    let mut latest: BTreeMap<String, ((i16, i8, i8), FbaCount)> = BTreeMap::new();
    for (row, line) in lines {
        let cells: Vec<&str> = line.split('\t').collect();
        let cell = |i: usize| cells.get(i).map_or("", |c| c.trim().trim_matches('"'));
        if let (Some(want), Some(at)) = (&filter.location, location_at)
            && !cell(at).eq_ignore_ascii_case(want)
        {
            continue;
        }
        let sku = cell(sku_at);
        if sku.is_empty() {
            continue;
        }
        let qty = |i: Option<usize>| -> Result<i64, AmazonError> {
            let Some(i) = i else { return Ok(0) };
            let v = cell(i);
            if v.is_empty() {
                return Ok(0);
            }
            v.parse::<i64>()
                .map_err(|_| AmazonError::Malformed(format!("ledger report row {row}: {v:?} is not a quantity")))
        };
        let date = date_of(cell(date_at))
            .ok_or_else(|| AmazonError::Malformed(format!("ledger report row {row}: bad Date")))?;
        let entry = latest
            .entry(sku.to_string())
            .or_insert_with(|| (date, FbaCount { sku: sku.into(), ..FbaCount::default() }));
        if date < entry.0 {
            continue;
        }
        if date > entry.0 {
            *entry = (date, FbaCount { sku: sku.into(), ..FbaCount::default() });
        }
        let ending = qty(Some(ending_at))?;
        let c = &mut entry.1;
        if cell(disposition_at).eq_ignore_ascii_case("SELLABLE") {
            c.fulfillable = c.fulfillable.saturating_add(ending);
            c.transshipment = c.transshipment.saturating_add(qty(transit_at)?.max(0));
        } else {
            c.unfulfillable = c.unfulfillable.saturating_add(ending.max(0));
        }
    }
    Ok(latest
        .into_values()
        .map(|(date, mut c)| {
            c.last_updated_ms = end_of_day_ms(date);
            c
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented attributes, spelled as real files spell them.
    const HEADER: &str = "Date\tFNSKU\tASIN\tMSKU\tTitle\tDisposition\tStarting Warehouse Balance\tIn Transit Between Warehouses\tReceipts\tCustomer Shipments\tCustomer Returns\tVendor Returns\tWarehouse Transfer In/Out\tFound\tLost\tDamaged\tDisposed\tOther Events\tEnding Warehouse Balance\tUnknown Events\tLocation";

    fn row(date: &str, msku: &str, disposition: &str, transit: i64, ending: i64, location: &str) -> String {
        format!(
            "{date}\tX00{msku}\tB0{msku}\t{msku}\tA mug\t{disposition}\t10\t{transit}\t0\t-2\t0\t0\t0\t0\t0\t0\t0\t0\t{ending}\t0\t{location}"
        )
    }

    #[test]
    fn the_latest_day_counts_summed_over_locations_with_dispositions_split() {
        let text = [
            HEADER.to_string(),
            row("11/29/2026", "MUG-1", "SELLABLE", 0, 99, "US"),
            row("11/30/2026", "MUG-1", "SELLABLE", 3, 40, "US"),
            row("11/30/2026", "MUG-1", "SELLABLE", 1, 2, "CA"),
            row("11/30/2026", "MUG-1", "CUSTOMER_DAMAGED", 0, 4, "US"),
            row("11/30/2026", "MUG-2", "SELLABLE", 0, 7, "US"),
        ]
        .join("\n");
        let counts = parse_text(&text, &LedgerFilter::default()).unwrap();
        assert_eq!(counts.len(), 2);
        let m1 = &counts[0];
        assert_eq!((m1.sku.as_str(), m1.fulfillable, m1.transshipment, m1.unfulfillable), ("MUG-1", 42, 4, 4));
        assert_eq!(m1.count(), 42);
        // End of 2026-11-30 UTC.
        assert_eq!(m1.last_updated_ms, Some(1_796_083_199_999));
        let us = parse_text(&text, &LedgerFilter { location: Some("us".into()) }).unwrap();
        assert_eq!(us[0].fulfillable, 40);
    }

    #[test]
    fn gzip_underscored_headers_missing_columns_and_bad_cells() {
        use std::io::Write;
        let text = "date\tmsku\tdisposition\tending_warehouse_balance\n2026-12-01\tA\tSELLABLE\t5\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        let counts = parse(&gz.finish().unwrap(), &LedgerFilter::default()).unwrap();
        assert_eq!((counts[0].sku.as_str(), counts[0].fulfillable), ("A", 5));

        let no_date = "MSKU\tDisposition\tEnding Warehouse Balance\nA\tSELLABLE\t5\n";
        assert!(parse_text(no_date, &LedgerFilter::default()).unwrap_err().to_string().contains("\"Date\""));
        let no_location = "Date\tMSKU\tDisposition\tEnding Warehouse Balance\n2026-12-01\tA\tSELLABLE\t5\n";
        assert!(parse_text(no_location, &LedgerFilter { location: Some("US".into()) }).is_err());
        let no_balance = "Date\tMSKU\tDisposition\n2026-12-01\tA\tSELLABLE\n";
        let e = parse_text(no_balance, &LedgerFilter::default()).unwrap_err();
        assert!(e.to_string().contains("Ending Warehouse Balance"), "{e}");
        let bad = "Date\tMSKU\tDisposition\tEnding Warehouse Balance\n\n2026-12-01\tA\tSELLABLE\tmany\n";
        let e = parse_text(bad, &LedgerFilter::default()).unwrap_err();
        assert!(e.to_string().contains("row 3"), "the row an editor shows, blank lines counted: {e}");
        assert!(parse(&[0x1f, 0x8b, 0, 1], &LedgerFilter::default()).is_err());
    }
}
