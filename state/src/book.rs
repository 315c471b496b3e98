//! The connectors' book: a small ordered key–value space per connector, for bookkeeping that
//! spans shards (the accounting connector's period summaries: docs/connectors.md, "Posting
//! policy"). Keys are strings read back in order by prefix; values are JSON. A write is a list of
//! puts and deletes, each with an expectation on the stored value, applied together or not at all —
//! optionally with a lane's delivery cursor, under the lane's [`Fence`], in the same atomic write.
//! That is what makes a lane's fold (its cursor moves past effects *and* their sums land in the
//! book) exactly once across crashes and lease moves, and what lets several members agree on one
//! summary without a coordinator: the first to create it wins, the others read what it wrote.
//!
//! Embedded: a redb table `(connector, key) → value`. DynamoDB: items of the delivery table, key
//! `book#{key}` in the connector's partition (one `TransactWriteItems` per write, at most
//! [`MAX_BOOK_WRITES`] items).

use std::future::Future;

use crate::outbox::{Cursor, Fence, OutboxStore};
use crate::store::StoreError;

/// Most puts and deletes in one [`BookStore::book_write`] (DynamoDB's transaction holds 100 items:
/// the fence check and the cursor take two).
pub const MAX_BOOK_WRITES: usize = 90;

/// What a write expects to find under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Anything (or nothing).
    Any,
    /// Nothing: the write creates the key.
    Absent,
    /// Exactly this value (compare-and-set).
    Equals(String),
}

/// One put (`value: Some`) or delete (`None`) of a book key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookWrite {
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete.
    pub value: Option<String>,
    /// What must be stored for the write to apply.
    pub expect: Expect,
}

impl BookWrite {
    /// Puts `value` whatever is stored.
    pub fn put(key: impl Into<String>, value: impl Into<String>) -> Self {
        BookWrite { key: key.into(), value: Some(value.into()), expect: Expect::Any }
    }

    /// Creates `key`; the write fails with [`StoreError::Conflict`] if it exists.
    pub fn create(key: impl Into<String>, value: impl Into<String>) -> Self {
        BookWrite { key: key.into(), value: Some(value.into()), expect: Expect::Absent }
    }

    /// Replaces `old` by `value` (`None`: deletes `key` if it still holds `old`).
    pub fn swap(key: impl Into<String>, old: impl Into<String>, value: Option<String>) -> Self {
        BookWrite { key: key.into(), value, expect: Expect::Equals(old.into()) }
    }
}

/// A lane's delivery cursor written with a book write (same atomic write, same rules as
/// [`OutboxStore::save_cursor`]: fenced, never backwards).
#[derive(Debug, Clone, Copy)]
pub struct CursorWrite<'a> {
    /// The shard.
    pub shard: &'a str,
    /// The new cursor.
    pub cursor: &'a Cursor,
}

/// The book of every connector, and the committed event time of a shard.
pub trait BookStore: OutboxStore {
    /// The largest event time committed on `shard` (the base of its watermark), if any.
    fn committed_max_ts(&self, shard: &str) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// The value of `key` in `connector`'s book (consistent read).
    fn book_get(&self, connector: &str, key: &str) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Keys starting with `prefix`, strictly after `after`, in key order, at most `max`
    /// (consistent read).
    fn book_range(
        &self,
        connector: &str,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> impl Future<Output = Result<Vec<(String, String)>, StoreError>> + Send;

    /// Applies `writes` (at most [`MAX_BOOK_WRITES`], distinct keys) and `cursor` in one atomic
    /// write; with a fence, only while its lease has its epoch. A failed expectation is
    /// [`StoreError::Conflict`] and writes nothing.
    fn book_write(
        &self,
        connector: &str,
        writes: &[BookWrite],
        cursor: Option<CursorWrite<'_>>,
        fence: Option<&Fence>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Every `(key, value)` under `prefix`, page by page.
pub async fn book_all<S: BookStore>(
    store: &S,
    connector: &str,
    prefix: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    const PAGE: usize = 500;
    let mut out: Vec<(String, String)> = Vec::new();
    loop {
        let page = store.book_range(connector, prefix, out.last().map(|(k, _)| k.as_str()), PAGE).await?;
        let n = page.len();
        out.extend(page);
        if n < PAGE {
            return Ok(out);
        }
    }
}
