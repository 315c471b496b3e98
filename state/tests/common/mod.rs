//! What several property tests share: generated events rendered as canonical JSON.

/// Renders `(type, sku, order, qty/delta, ts step)` tuples as canonical events: ids `e{i}`, SKUs
/// `SKU-{n}`, orders `o{sku}-{n}`, times stepping from 2026-11-27T10:00Z.
pub fn render(events: &[(u8, u8, u8, i64, i64)]) -> Vec<String> {
    let mut ts = 1_795_773_600_000i64;
    events
        .iter()
        .enumerate()
        .map(|(i, &(kind, sku, order, n, step))| {
            ts += step;
            let head = format!(r#""id":"e{i}","sku":"SKU-{sku}","ts":{ts}"#);
            let order = format!("o{sku}-{order}");
            match kind {
                0 | 1 => format!(r#"{{{head},"type":"order_placed","order_id":"{order}","qty":{n},"unit_price":"9.99","currency":"USD"}}"#),
                2 => format!(r#"{{{head},"type":"order_cancelled","order_id":"{order}","qty":{n}}}"#),
                3 => format!(r#"{{{head},"type":"order_shipped","order_id":"{order}"}}"#),
                4 => format!(r#"{{{head},"type":"order_shipped","order_id":"{order}","shipped_total":{n}}}"#),
                5 => format!(r#"{{{head},"type":"stock_received","qty":{},"unit_cost":"3.3{n}","currency":"USD"}}"#, n * 3),
                6 => format!(r#"{{{head},"type":"stock_adjusted","delta":{}}}"#, if n == 3 { 4 } else { 3 - n }),
                _ => format!(r#"{{{head},"type":"stock_counted","on_hand":{n}}}"#),
            }
        })
        .collect()
}
