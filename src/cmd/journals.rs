//! `stockflow journals`: the summary journals the accounting connector posted per period and
//! currency, and the per-SKU detail behind each (docs/connectors.md, "Posting policy").

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use rust_decimal::Decimal;
use stockflow_connectors::journals::{Fragment, Posting, PostingState, covered};
use stockflow_state::StoreError;
use stockflow_state::book::{BookStore, book_all};

/// The connector whose book is read.
const CONNECTOR: &str = "accounting";

/// Arguments of `stockflow journals`.
#[derive(Debug, clap::Args)]
pub struct JournalsArgs {
    #[command(subcommand)]
    action: JournalsAction,
    #[command(flatten)]
    pub(crate) store: crate::cmd::store::StoreArgs,
}

#[derive(Debug, clap::Subcommand)]
enum JournalsAction {
    /// One line per journal posted (or owed): period, currency, number (0 = the summary, then
    /// adjustments), state, COGS, inventory received, journal lines summed.
    List,
    /// The per-SKU detail behind a period's journals: which posting booked each SKU's COGS and
    /// receipts (`open` = not posted yet), as CSV or JSON lines.
    Show {
        /// The period, as `journals list` prints it (`2026-11-27`, or `2026-11-27T13+01:00`).
        #[arg(long)]
        period: String,
        /// `csv` or `json`.
        #[arg(long, default_value = "csv", value_parser = ["csv", "json"])]
        format: String,
    },
    /// Send refused (dead) journals again, by the next `run`/`consume`.
    Retry,
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("journal book: {e}"))
}

/// Every posting of the book, by period, currency and number.
pub async fn postings<S: BookStore>(store: &S) -> Result<Vec<Posting>, StoreError> {
    book_all(store, CONNECTOR, "post#")
        .await?
        .into_iter()
        .map(|(_, v)| serde_json::from_str(&v).map_err(corrupt))
        .collect()
}

/// Prints postings as aligned lines (also `demo`'s report).
pub fn print_postings(out: &mut impl Write, postings: &[Posting]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<22} {:<4} {:>3}  {:<10} {:<8} {:>14} {:>14} {:>8}",
        "period", "cur", "n", "kind", "state", "cogs", "received", "lines"
    )?;
    for p in postings {
        let kind = format!("{:?}", p.kind).to_lowercase();
        let state = format!("{:?}", p.state).to_lowercase();
        writeln!(
            out,
            "{:<22} {:<4} {:>3}  {:<10} {:<8} {:>14} {:>14} {:>8}",
            p.period, p.currency, p.n, kind, state, p.cogs, p.received, p.effects
        )?;
        if let (PostingState::Dead, Some(e)) = (&p.state, &p.error) {
            writeln!(out, "    refused: {e}")?;
        }
    }
    Ok(())
}

/// Detail rows: (currency, posting, SKU, kind) → (units, amount, journal lines).
type Detail = BTreeMap<(String, String, String, String), (i64, Decimal, u64)>;

/// The detail of `period`: per currency, posting, SKU and kind.
async fn detail<S: BookStore>(store: &S, period: &str) -> Result<Detail, StoreError> {
    let posts: Vec<Posting> = postings(store).await?.into_iter().filter(|p| p.period == period).collect();
    let mut out = Detail::new();
    for (key, json) in book_all(store, CONNECTOR, &format!("frag#{period}#")).await? {
        let currency = key.split('#').nth(2).unwrap_or_default().to_string();
        let f: Fragment = serde_json::from_str(&json).map_err(corrupt)?;
        // Postings cover cumulatively: the first that covers the fragment booked it.
        let posting = posts
            .iter()
            .filter(|p| p.currency == currency)
            .find(|p| covered(&p.covers, &f))
            .map_or_else(|| "open".to_string(), |p| p.n.to_string());
        for l in &f.lines {
            let kind =
                serde_json::to_value(l.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            let e = out.entry((currency.clone(), posting.clone(), l.sku.clone(), kind)).or_default();
            e.0 = e.0.saturating_add(l.qty);
            e.1 += l.amount;
            e.2 += u64::from(l.effects);
        }
    }
    Ok(out)
}

/// Runs `stockflow journals`.
pub async fn run<S: BookStore>(args: JournalsArgs, store: &S) -> anyhow::Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.action {
        JournalsAction::List => print_postings(&mut out, &postings(store).await?)?,
        JournalsAction::Show { period, format } => {
            let rows = detail(store, &period).await?;
            if rows.is_empty() {
                anyhow::bail!("no journal detail for period {period:?} (see `stockflow journals list`)");
            }
            if format == "csv" {
                writeln!(out, "period,currency,posting,sku,kind,qty,amount,journal_lines")?;
            }
            for ((currency, posting, sku, kind), (qty, amount, n)) in rows {
                if format == "csv" {
                    let sku =
                        if sku.contains([',', '"', '\n']) { format!("\"{}\"", sku.replace('"', "\"\"")) } else { sku };
                    writeln!(out, "{period},{currency},{posting},{sku},{kind},{qty},{amount},{n}")?;
                } else {
                    let v = serde_json::json!({"period": period, "currency": currency, "posting": posting, "sku": sku,
                        "kind": kind, "qty": qty, "amount": amount.to_string(), "journal_lines": n});
                    writeln!(out, "{v}")?;
                }
            }
        }
        JournalsAction::Retry => {
            let n = stockflow_connectors::drain::retry_dead_postings(store, CONNECTOR).await?;
            writeln!(out, "{n} journal(s) flagged for another attempt")?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `stockflow journals …` on the store the flags name.
pub async fn dispatch(args: JournalsArgs, settings: crate::runtime::config::Settings) -> anyhow::Result<ExitCode> {
    use crate::cmd::store::with_store;
    use crate::runtime::open_store;
    let store_args = args.store.clone();
    with_store!(settings, store_args, |store| run(args, &store).await)
}
