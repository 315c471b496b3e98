//! [`OutboxStore`] on DynamoDB: effects are read from `{prefix}-outbox` with a consistent
//! `Query` after a position (a part's chunks joined before splitting lines); cursors and
//! connector dead letters live in `{prefix}-delivery` (`connector` + `key`: `cursor#{shard}`,
//! `dead#{shard}#{request key}`), the value as JSON in `data`.
//!
//! Fencing: a lane's write with a [`Fence`] is one `TransactWriteItems` whose first item is a
//! `ConditionCheck` on the fence's lease row (`leaseEpoch = :epoch`); a cursor put carries its own
//! condition on `pos` (the delivered position as a sortable string), so it never moves back.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::builders::PutBuilder;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem};

use super::{DynamoStore, Item, blob, sdk_error};
use crate::effects::EffectKinds;
use crate::outbox::{ConnectorDeadLetter, Cursor, Fence, OutboxPos, OutboxScan, OutboxStore, row_entries};
use crate::store::{StateStore, StoreError};

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn text(item: &Item, name: &str) -> String {
    item.get(name).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default()
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn dead_key(shard: &str, key: &str) -> String {
    format!("dead#{shard}#{key}")
}

impl DynamoStore {
    pub(super) fn delivery_item(&self, connector: &str, key: String, json: String) -> Item {
        HashMap::from([
            ("connector".to_string(), s(connector)),
            ("key".to_string(), s(key)),
            ("data".to_string(), s(json)),
        ])
    }

    /// The conditional put of a cursor (never backwards).
    pub(super) fn cursor_put(
        &self,
        connector: &str,
        shard: &str,
        cursor: &Cursor,
    ) -> Result<TransactWriteItem, StoreError> {
        let json = serde_json::to_string(cursor).map_err(corrupt)?;
        let mut item = self.delivery_item(connector, format!("cursor#{shard}"), json);
        if let Some(p) = &cursor.delivered {
            item.insert("pos".into(), s(p.sort_key()));
        }
        let put = cursor_condition(Put::builder().table_name(&self.tables.delivery).set_item(Some(item)), cursor)
            .build()
            .map_err(sdk_error)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The item of a connector dead letter.
    fn dead_letter_item(&self, d: &ConnectorDeadLetter) -> Result<Item, StoreError> {
        Ok(self.delivery_item(
            &d.connector,
            dead_key(&d.shard, &d.request.key),
            serde_json::to_string(d).map_err(corrupt)?,
        ))
    }

    /// One write of one delivery item.
    async fn put_delivery(&self, item: Item) -> Result<(), StoreError> {
        self.stats.delivery_writes.fetch_add(1, Ordering::Relaxed);
        self.client
            .put_item()
            .table_name(&self.tables.delivery)
            .set_item(Some(item))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    /// The `ConditionCheck` of a fence: its lease row still has its epoch.
    pub(super) fn fence_check(&self, fence: &Fence) -> Result<TransactWriteItem, StoreError> {
        let check = ConditionCheck::builder()
            .table_name(&self.tables.leases)
            .key("leaseKey", s(&fence.lease))
            .condition_expression("leaseEpoch = :e")
            .expression_attribute_values(":e", AttributeValue::N(fence.epoch.to_string()))
            .build()
            .map_err(sdk_error)?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    fn put_item(&self, item: Item) -> Result<Put, StoreError> {
        Put::builder().table_name(&self.tables.delivery).set_item(Some(item)).build().map_err(sdk_error)
    }

    /// Writes `items` in one transaction, the fence's check first. A failed condition is
    /// `Fenced` (the lease moved), for the item at `cursor_at` `CursorRegression`, and for an item
    /// named in `book_keys` (by its index in `items`) `Conflict`.
    pub(super) async fn fenced_write(
        &self,
        fence: Option<&Fence>,
        items: Vec<TransactWriteItem>,
        cursor_at: Option<usize>,
        what: (&str, &str),
    ) -> Result<(), StoreError> {
        self.fenced_book_write(fence, items, cursor_at, what, &[]).await
    }

    /// [`Self::fenced_write`] with the book keys of the items (`(index, key)`).
    pub(super) async fn fenced_book_write(
        &self,
        fence: Option<&Fence>,
        items: Vec<TransactWriteItem>,
        cursor_at: Option<usize>,
        what: (&str, &str),
        book_keys: &[(usize, String)],
    ) -> Result<(), StoreError> {
        let mut all = Vec::with_capacity(items.len() + 1);
        if let Some(f) = fence {
            all.push(self.fence_check(f)?);
        }
        let offset = all.len();
        all.extend(items);
        self.stats.delivery_writes.fetch_add(1, Ordering::Relaxed);
        match self.client.transact_write_items().set_transact_items(Some(all)).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let reasons: Vec<bool> = match e.as_service_error() {
                    Some(TransactWriteItemsError::TransactionCanceledException(ex)) => {
                        ex.cancellation_reasons().iter().map(|r| r.code() == Some("ConditionalCheckFailed")).collect()
                    }
                    _ => return Err(sdk_error(e)),
                };
                if let Some(f) = fence
                    && reasons.first() == Some(&true)
                {
                    return Err(StoreError::Fenced { shard: f.lease.clone(), epoch: f.epoch });
                }
                if cursor_at.is_some_and(|i| reasons.get(i + offset) == Some(&true)) {
                    return Err(StoreError::CursorRegression { connector: what.0.into(), shard: what.1.into() });
                }
                if let Some((_, key)) = book_keys.iter().find(|(i, _)| reasons.get(i + offset) == Some(&true)) {
                    return Err(StoreError::Conflict { key: key.clone() });
                }
                Err(sdk_error(e))
            }
        }
    }
}

/// A cursor's item condition: `delivered` never moves back (`pos` is its sortable form).
pub(super) fn cursor_condition(put: PutBuilder, cursor: &Cursor) -> PutBuilder {
    match &cursor.delivered {
        Some(p) => put
            .condition_expression("attribute_not_exists(#p) OR #p <= :p")
            .expression_attribute_names("#p", "pos")
            .expression_attribute_values(":p", s(p.sort_key())),
        None => put.condition_expression("attribute_not_exists(#p)").expression_attribute_names("#p", "pos"),
    }
}

impl OutboxStore for DynamoStore {
    async fn outbox_shards(&self) -> Result<Vec<String>, StoreError> {
        // Every shard that committed has a checkpoint in the lease table.
        Ok(self.checkpoints().await?.into_iter().map(|(shard, _)| shard).collect())
    }

    async fn scan_outbox(
        &self,
        shard: &str,
        after: Option<&OutboxPos>,
        max: usize,
        kinds: EffectKinds,
    ) -> Result<OutboxScan, StoreError> {
        let mut out = OutboxScan::default();
        let mut start: Option<Item> = None;
        // The part being joined: (row = "{checkpointKey}#{part}", bytes).
        let mut part: Option<(String, Vec<u8>)> = None;
        let flush = |part: &mut Option<(String, Vec<u8>)>, out: &mut OutboxScan| -> Result<(), StoreError> {
            if let Some((row, bytes)) = part.take() {
                let skip = after.filter(|a| *a.row == *row).map(|a| a.line);
                row_entries(&row, &bytes, skip, max, kinds, out)?;
            }
            Ok(())
        };
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&self.tables.outbox)
                .consistent_read(true)
                .key_condition_expression(if after.is_some() { "#s = :s AND #q > :after" } else { "#s = :s" })
                .expression_attribute_names("#s", "shard")
                .expression_attribute_values(":s", s(shard))
                .set_exclusive_start_key(start.take())
                .limit(64);
            if let Some(a) = after {
                q = q.expression_attribute_names("#q", "seq").expression_attribute_values(":after", s(&*a.row));
            }
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            let page = q.send().await.map_err(sdk_error)?;
            for item in page.items() {
                let seq = text(item, "seq");
                let row = seq.rsplit_once('#').map_or(seq.as_str(), |(p, _)| p).to_string();
                if part.as_ref().is_none_or(|(r, _)| *r != row) {
                    flush(&mut part, &mut out)?;
                    if out.scanned >= max {
                        return Ok(out);
                    }
                    part = Some((row, Vec::new()));
                }
                if let Some((_, bytes)) = part.as_mut() {
                    bytes.extend_from_slice(&blob(item, "data"));
                }
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        flush(&mut part, &mut out)?;
        Ok(out)
    }

    async fn cursor(&self, connector: &str, shard: &str) -> Result<Cursor, StoreError> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.delivery)
            .key("connector", s(connector))
            .key("key", s(format!("cursor#{shard}")))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        match out.item() {
            Some(item) => serde_json::from_str(&text(item, "data")).map_err(corrupt),
            None => Ok(Cursor::default()),
        }
    }

    async fn save_cursor(
        &self,
        connector: &str,
        shard: &str,
        cursor: &Cursor,
        dead: Option<&ConnectorDeadLetter>,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        let mut items = vec![self.cursor_put(connector, shard, cursor)?];
        if let Some(d) = dead {
            // The dead letter and the cursor past it, together.
            items.push(TransactWriteItem::builder().put(self.put_item(self.dead_letter_item(d)?)?).build());
        }
        self.fenced_write(fence, items, Some(0), (connector, shard)).await
    }

    async fn connector_dead_letters(&self, connector: Option<&str>) -> Result<Vec<ConnectorDeadLetter>, StoreError> {
        let items = match connector {
            Some(c) => {
                let q = self
                    .client
                    .query()
                    .table_name(&self.tables.delivery)
                    .consistent_read(true)
                    .key_condition_expression("#c = :c AND begins_with(#k, :dead)")
                    .expression_attribute_names("#c", "connector")
                    .expression_attribute_names("#k", "key")
                    .expression_attribute_values(":c", s(c))
                    .expression_attribute_values(":dead", s("dead#"));
                self.query_all(q).await?
            }
            None => self.scan_all(&self.tables.delivery).await?,
        };
        let mut out: Vec<ConnectorDeadLetter> = Vec::new();
        for item in items.iter().filter(|i| text(i, "key").starts_with("dead#")) {
            out.push(serde_json::from_str(&text(item, "data")).map_err(corrupt)?);
        }
        out.sort_by(|a, b| (&a.connector, &a.shard, &a.request.key).cmp(&(&b.connector, &b.shard, &b.request.key)));
        Ok(out)
    }

    async fn put_dead_letter(&self, dead: &ConnectorDeadLetter, fence: Option<&Fence>) -> Result<(), StoreError> {
        let item = self.dead_letter_item(dead)?;
        match fence {
            None => self.put_delivery(item).await,
            Some(_) => {
                let put = TransactWriteItem::builder().put(self.put_item(item)?).build();
                self.fenced_write(fence, vec![put], None, (&dead.connector, &dead.shard)).await
            }
        }
    }

    async fn prune_delivered(
        &self,
        shard: &str,
        through: &crate::outbox::Delivered,
        written_before_ms: i64,
    ) -> Result<u64, StoreError> {
        use crate::outbox::Delivered;
        let before = match through {
            Delivered::Nothing => return Ok(0),
            Delivered::All => None,
            Delivered::Before(pos) => Some(pos.row.to_string()),
        };
        let after = self.pruned.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(shard).cloned();
        if let (Some(a), Some(b)) = (&after, &before)
            && a >= b
        {
            // Everything before the cursors was marked already (a connector added since may
            // hold the bound further back: nothing more to do until it passes).
            return Ok(0);
        }
        let mut start: Option<Item> = None;
        let mut marked = 0u64;
        let expires = AttributeValue::N((crate::now_ms() / 1000).to_string());
        loop {
            // Items of rows before `before` (a row's items are `{row}#…`, after the row itself).
            let cond = match (&after, &before) {
                (Some(_), Some(_)) => "#s = :s AND #q BETWEEN :a AND :b",
                (Some(_), None) => "#s = :s AND #q > :a",
                (None, Some(_)) => "#s = :s AND #q < :b",
                (None, None) => "#s = :s",
            };
            let mut q = self
                .client
                .query()
                .table_name(&self.tables.outbox)
                .key_condition_expression(cond)
                .projection_expression("#q, #at, expires_at")
                .expression_attribute_names("#s", "shard")
                .expression_attribute_names("#q", "seq")
                .expression_attribute_names("#at", "at")
                .expression_attribute_values(":s", s(shard))
                .set_exclusive_start_key(start.take())
                .limit(100);
            if let Some(a) = &after {
                q = q.expression_attribute_values(":a", s(a));
            }
            if let Some(b) = &before {
                q = q.expression_attribute_values(":b", s(b));
            }
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            let page = q.send().await.map_err(sdk_error)?;
            for item in page.items() {
                let seq = text(item, "seq");
                if after.as_deref() == Some(seq.as_str()) {
                    continue;
                }
                // Items written before `at` was recorded count as old.
                let at = item.get("at").and_then(|v| v.as_n().ok()).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                if at > written_before_ms {
                    return Ok(marked);
                }
                if !item.contains_key("expires_at") {
                    self.stats.delivery_writes.fetch_add(1, Ordering::Relaxed);
                    self.client
                        .update_item()
                        .table_name(&self.tables.outbox)
                        .key("shard", s(shard))
                        .key("seq", s(&seq))
                        .update_expression("SET expires_at = :t")
                        .condition_expression("attribute_exists(#q)")
                        .expression_attribute_names("#q", "seq")
                        .expression_attribute_values(":t", expires.clone())
                        .send()
                        .await
                        .map_err(sdk_error)?;
                    marked += 1;
                }
                self.pruned.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(shard.to_string(), seq);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(marked),
            }
        }
    }

    async fn remove_dead_letter(
        &self,
        connector: &str,
        shard: &str,
        key: &str,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        if fence.is_some() {
            let del = Delete::builder()
                .table_name(&self.tables.delivery)
                .key("connector", s(connector))
                .key("key", s(dead_key(shard, key)))
                .build()
                .map_err(sdk_error)?;
            let item = TransactWriteItem::builder().delete(del).build();
            return self.fenced_write(fence, vec![item], None, (connector, shard)).await;
        }
        self.stats.delivery_writes.fetch_add(1, Ordering::Relaxed);
        self.client
            .delete_item()
            .table_name(&self.tables.delivery)
            .key("connector", s(connector))
            .key("key", s(dead_key(shard, key)))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}
