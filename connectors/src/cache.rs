//! An in-process TTL cache for slow-changing answers of a receiver (the manufacturer's lead
//! times and catalogue): the role ElastiCache plays in the seed design, without a network hop.
//! Hits and misses are counted in `stockflow_connector_cache_total{connector, result}`.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Values kept for `ttl` after they were fetched.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    connector: &'static str,
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<K, (V, Instant)>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// An empty cache; at most `max_entries` (expired ones are swept when it is full).
    pub fn new(connector: &'static str, ttl: Duration, max_entries: usize) -> Self {
        TtlCache {
            connector,
            ttl,
            max_entries: max_entries.max(1),
            entries: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Instant)>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached value, or `fetch`'s (cached when it succeeds). Failures are not cached.
    pub async fn get_or_fetch<E, F, Fut>(&self, key: &K, fetch: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let now = Instant::now();
        if let Some((v, at)) = self.lock().get(key)
            && now < *at + self.ttl
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("stockflow_connector_cache_total", "connector" => self.connector, "result" => "hit")
                .increment(1);
            return Ok(v.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("stockflow_connector_cache_total", "connector" => self.connector, "result" => "miss")
            .increment(1);
        let v = fetch().await?;
        let mut entries = self.lock();
        if entries.len() >= self.max_entries {
            let ttl = self.ttl;
            let now = Instant::now();
            entries.retain(|_, (_, at)| now < *at + ttl);
            if entries.len() >= self.max_entries {
                entries.clear();
            }
        }
        entries.insert(key.clone(), (v.clone(), Instant::now()));
        Ok(v)
    }

    /// `(hits, misses)` so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl_and_failures_are_not_kept() {
        let cache: TtlCache<String, u32> = TtlCache::new("test", Duration::from_secs(60), 10);
        let fetches = AtomicU64::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::Relaxed);
            Ok::<_, ()>(7)
        };
        let k = "A".to_string();
        assert_eq!(cache.get_or_fetch(&k, fetch).await, Ok(7));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(cache.get_or_fetch(&k, fetch).await, Ok(7));
        assert_eq!((cache.counts(), fetches.load(Ordering::Relaxed)), ((1, 1), 1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(cache.get_or_fetch(&k, fetch).await, Ok(7));
        assert_eq!((cache.counts(), fetches.load(Ordering::Relaxed)), ((1, 2), 2));
        let b = "B".to_string();
        assert_eq!(cache.get_or_fetch(&b, || async { Err::<u32, _>("down") }).await, Err("down"));
        assert_eq!(cache.get_or_fetch(&b, fetch).await, Ok(7), "a failure is not cached");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cache_sweeps_expired_entries() {
        let cache: TtlCache<u32, u32> = TtlCache::new("test", Duration::from_secs(10), 2);
        for k in 0..2 {
            cache.get_or_fetch(&k, || async { Ok::<_, ()>(k) }).await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        cache.get_or_fetch(&9, || async { Ok::<_, ()>(9) }).await.unwrap();
        assert_eq!(cache.lock().len(), 1);
    }
}
