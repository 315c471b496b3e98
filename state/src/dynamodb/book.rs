//! [`BookStore`] on DynamoDB: book keys are items of the delivery table in the connector's
//! partition, sort key `book#{key}`, value in `data`; a write is one `TransactWriteItems` (the
//! fence's check, the lane's cursor, then each put or delete with its condition on `data`).

use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem};

use super::{DynamoStore, sdk_error};
use crate::book::{BookStore, BookWrite, CursorWrite, Expect, MAX_BOOK_WRITES};
use crate::outbox::Fence;
use crate::store::StoreError;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn book_key(key: &str) -> String {
    format!("book#{key}")
}

impl BookStore for DynamoStore {
    async fn committed_max_ts(&self, shard: &str) -> Result<Option<i64>, StoreError> {
        self.stats.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.leases)
            .key("leaseKey", s(shard))
            .projection_expression("maxTs")
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out.item().and_then(|i| i.get("maxTs")).and_then(|v| v.as_n().ok()).and_then(|n| n.parse().ok()))
    }

    async fn book_get(&self, connector: &str, key: &str) -> Result<Option<String>, StoreError> {
        self.stats.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.delivery)
            .key("connector", s(connector))
            .key("key", s(book_key(key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out.item().and_then(|i| i.get("data")).and_then(|v| v.as_s().ok()).cloned())
    }

    async fn book_range(
        &self,
        connector: &str,
        prefix: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        let mut start = after.filter(|a| *a >= prefix).map(|a| {
            std::collections::HashMap::from([
                ("connector".to_string(), s(connector)),
                ("key".to_string(), s(book_key(a))),
            ])
        });
        loop {
            self.stats.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let page = self
                .client
                .query()
                .table_name(&self.tables.delivery)
                .consistent_read(true)
                .key_condition_expression("#c = :c AND begins_with(#k, :p)")
                .expression_attribute_names("#c", "connector")
                .expression_attribute_names("#k", "key")
                .expression_attribute_values(":c", s(connector))
                .expression_attribute_values(":p", s(book_key(prefix)))
                .set_exclusive_start_key(start.take())
                .limit(i32::try_from(max.clamp(1, 1000)).unwrap_or(1000))
                .send()
                .await
                .map_err(sdk_error)?;
            for item in page.items() {
                let key =
                    item.get("key").and_then(|v| v.as_s().ok()).map_or("", |k| k.strip_prefix("book#").unwrap_or(k));
                let data = item.get("data").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
                out.push((key.to_string(), data));
                if out.len() >= max {
                    return Ok(out);
                }
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    async fn book_write(
        &self,
        connector: &str,
        writes: &[BookWrite],
        cursor: Option<CursorWrite<'_>>,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        if writes.len() > MAX_BOOK_WRITES {
            return Err(StoreError::Unavailable(format!(
                "a book write of {} keys is over the limit of {MAX_BOOK_WRITES}",
                writes.len()
            )));
        }
        if writes.is_empty() && cursor.is_none() && fence.is_none() {
            return Ok(());
        }
        let mut items = Vec::with_capacity(writes.len() + 1);
        let cursor_at = match cursor {
            Some(c) => {
                items.push(self.cursor_put(connector, c.shard, c.cursor)?);
                Some(0)
            }
            None => None,
        };
        let mut keys = Vec::with_capacity(writes.len());
        for w in writes {
            let (cond, old) = match &w.expect {
                Expect::Any => (None, None),
                Expect::Absent => (Some("attribute_not_exists(#d)"), None),
                Expect::Equals(old) => (Some("#d = :old"), Some(old)),
            };
            let item =
                match &w.value {
                    Some(v) => {
                        let mut put = Put::builder()
                            .table_name(&self.tables.delivery)
                            .set_item(Some(self.delivery_item(connector, book_key(&w.key), v.clone())));
                        if let Some(c) = cond {
                            put = put.condition_expression(c).expression_attribute_names("#d", "data");
                        }
                        if let Some(o) = old {
                            put = put.expression_attribute_values(":old", s(o));
                        }
                        TransactWriteItem::builder().put(put.build().map_err(sdk_error)?).build()
                    }
                    None => {
                        let mut del = Delete::builder()
                            .table_name(&self.tables.delivery)
                            .key("connector", s(connector))
                            .key("key", s(book_key(&w.key)));
                        if let Some(c) = cond {
                            del = del.condition_expression(c).expression_attribute_names("#d", "data");
                        }
                        if let Some(o) = old {
                            del = del.expression_attribute_values(":old", s(o));
                        }
                        TransactWriteItem::builder().delete(del.build().map_err(sdk_error)?).build()
                    }
                };
            keys.push((items.len(), w.key.clone()));
            items.push(item);
        }
        let shard = cursor.map_or("", |c| c.shard);
        self.fenced_book_write(fence, items, cursor_at, (connector, shard), &keys).await
    }
}
