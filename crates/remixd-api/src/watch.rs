//! Shared task watchers for the SSE stream, and the per-key cap on open streams.
//!
//! Every open stream used to poll the database on its own, so a hundred streams on one
//! task made a hundred reads every 200 ms. [`Watchers`] keeps one poller per watched
//! task instead: the first stream on a task starts it, every later stream subscribes to
//! the same `tokio::sync::watch` channel of the latest record, and the poller stops
//! when the last subscriber leaves or the task reaches its final state. It still reads
//! the store (not an in-process event), so it follows a task whichever node runs it.
//!
//! [`StreamSlots`] counts open streams per API key (`limits.streams_per_key`); a slot
//! is held by the stream and given back when the stream ends or its client goes away.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remixd_domain::TaskId;
use tokio::sync::watch;

/// What a watcher publishes: nothing read yet, the latest record, or the task is gone.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen<T> {
    /// The poller has not read the task yet (only before its first read).
    Unread,
    /// The latest record read.
    Task(T),
    /// The task no longer exists (deleted by retention).
    Gone,
}

/// Reads one task; an error is logged and retried at the next interval.
pub type FetchFn<T> = Arc<
    dyn Fn(TaskId) -> Pin<Box<dyn Future<Output = Result<Option<T>, String>> + Send>> + Send + Sync,
>;

struct Inner<T> {
    channels: Mutex<HashMap<TaskId, watch::Sender<Seen<T>>>>,
    fetch: FetchFn<T>,
    is_final: fn(&T) -> bool,
    interval: Duration,
    pollers: AtomicUsize,
}

/// The registry: task id → the one channel its poller publishes on.
pub struct Watchers<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Watchers<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Clone + PartialEq + Send + Sync + 'static> Watchers<T> {
    /// `fetch` reads a task, `is_final` says when to stop, `interval` is the poll period.
    pub fn new(fetch: FetchFn<T>, is_final: fn(&T) -> bool, interval: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                channels: Mutex::new(HashMap::new()),
                fetch,
                is_final,
                interval,
                pollers: AtomicUsize::new(0),
            }),
        }
    }

    /// Follows task `id`: joins its poller, or starts one. The first `changed()` of the
    /// receiver returns at once, so a subscriber compares the current value with what
    /// it already has instead of missing a change made just before it joined.
    pub fn subscribe(&self, id: TaskId) -> watch::Receiver<Seen<T>> {
        let mut channels = self.inner.channels.lock().expect("watchers lock");
        let mut rx = match channels.get(&id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(Seen::Unread);
                channels.insert(id, tx.clone());
                self.inner.pollers.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(poll(self.inner.clone(), id, tx));
                rx
            }
        };
        rx.mark_changed();
        rx
    }

    /// Pollers running now (one per watched task).
    pub fn pollers(&self) -> usize {
        self.inner.pollers.load(Ordering::SeqCst)
    }
}

/// One task's poller: reads the task every interval and publishes changes, until no
/// one watches, the task is final or gone.
async fn poll<T: Clone + PartialEq + Send + Sync + 'static>(
    inner: Arc<Inner<T>>,
    id: TaskId,
    tx: watch::Sender<Seen<T>>,
) {
    // Counts this poller down however it ends.
    struct Running<'a>(&'a AtomicUsize);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _running = Running(&inner.pollers);
    // Takes this channel out of the registry unless someone subscribed meanwhile
    // (`only_if_unwatched`); under the lock, so a subscriber either joins before the
    // removal (and keeps the poller alive) or starts a new poller after it.
    let release = |only_if_unwatched: bool| -> bool {
        let mut channels = inner.channels.lock().expect("watchers lock");
        if only_if_unwatched && tx.receiver_count() > 0 {
            return false;
        }
        if channels.get(&id).is_some_and(|c| c.same_channel(&tx)) {
            channels.remove(&id);
        }
        true
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(inner.interval) => {}
            _ = tx.closed() => {}
        }
        if release(true) {
            return;
        }
        match (inner.fetch)(id).await {
            Ok(Some(task)) => {
                let last = (inner.is_final)(&task);
                tx.send_if_modified(|cur| {
                    let fresh = Seen::Task(task);
                    let changed = *cur != fresh;
                    *cur = fresh;
                    changed
                });
                if last {
                    release(false);
                    return;
                }
            }
            Ok(None) => {
                tx.send_replace(Seen::Gone);
                release(false);
                return;
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "stream watcher could not read the task")
            }
        }
    }
}

/// Open streams per API key, capped.
pub struct StreamSlots {
    cap: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream's slot; given back on drop.
pub struct StreamSlot {
    key: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamSlots {
    /// At most `cap` open streams per key; `0` means no cap.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            open: Arc::default(),
        }
    }

    /// A slot for one more stream of `key`, or `None` when the key is at its cap.
    pub fn acquire(&self, key: &str) -> Option<StreamSlot> {
        let mut open = self.open.lock().expect("stream slots lock");
        let n = open.entry(key.to_string()).or_insert(0);
        if self.cap > 0 && *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            key: key.to_string(),
            open: self.open.clone(),
        })
    }

    /// The cap (`0`: none).
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Streams open now for `key`.
    pub fn open(&self, key: &str) -> usize {
        let open = self.open.lock().expect("stream slots lock");
        open.get(key).copied().unwrap_or(0)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("stream slots lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A task that advances one step per read and is final at `end`; counts reads.
    fn stepping(end: u32) -> (FetchFn<u32>, Arc<AtomicU32>) {
        let reads = Arc::new(AtomicU32::new(0));
        let r = reads.clone();
        let f: FetchFn<u32> = Arc::new(move |_| {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move { Ok(Some(n.min(end))) })
        });
        (f, reads)
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met in 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn many_subscribers_share_one_poller_and_each_sees_every_value() {
        let (fetch, reads) = stepping(5);
        let w = Watchers::new(fetch, |n| *n >= 5, Duration::from_millis(20));
        let id = TaskId::new();
        let subs: Vec<_> = (0..50).map(|_| w.subscribe(id)).collect();
        assert_eq!(w.pollers(), 1, "50 subscribers, one poller");
        let mut seen_by_each = Vec::new();
        for mut rx in subs {
            seen_by_each.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while rx.changed().await.is_ok() {
                    if let Seen::Task(n) = *rx.borrow_and_update() {
                        if seen.last() != Some(&n) {
                            seen.push(n);
                        }
                    }
                }
                seen
            }));
        }
        for h in seen_by_each {
            assert_eq!(h.await.unwrap(), vec![1, 2, 3, 4, 5]);
        }
        // Five reads for five values, however many subscribers: not 50 × 5.
        assert_eq!(reads.load(Ordering::SeqCst), 5);
        until(|| w.pollers() == 0).await;
    }

    #[tokio::test]
    async fn the_poller_stops_when_the_last_subscriber_leaves() {
        let (fetch, reads) = stepping(u32::MAX);
        let w = Watchers::new(fetch, |_| false, Duration::from_millis(10));
        let id = TaskId::new();
        let (a, b) = (w.subscribe(id), w.subscribe(id));
        assert_eq!(w.pollers(), 1);
        until(|| reads.load(Ordering::SeqCst) >= 3).await;
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(w.pollers(), 1, "one subscriber left keeps it");
        drop(b);
        until(|| w.pollers() == 0).await;
        let after = reads.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            reads.load(Ordering::SeqCst),
            after,
            "no reads after stopping"
        );
        // A new subscriber starts a new poller.
        let _c = w.subscribe(id);
        assert_eq!(w.pollers(), 1);
        let other = w.subscribe(TaskId::new());
        assert_eq!(w.pollers(), 2, "one poller per task");
        drop(other);
    }

    #[tokio::test]
    async fn a_vanished_task_ends_its_watchers() {
        let f: FetchFn<u32> = Arc::new(|_| Box::pin(async { Ok(None) }));
        let w = Watchers::new(f, |_| false, Duration::from_millis(5));
        let mut rx = w.subscribe(TaskId::new());
        let mut last = Seen::Unread;
        while rx.changed().await.is_ok() {
            last = rx.borrow_and_update().clone();
        }
        assert_eq!(last, Seen::Gone);
        until(|| w.pollers() == 0).await;
    }

    #[test]
    fn slots_cap_each_key_and_come_back_on_drop() {
        let s = StreamSlots::new(2);
        let a1 = s.acquire("a").unwrap();
        let _a2 = s.acquire("a").unwrap();
        assert!(s.acquire("a").is_none(), "the third of key a is refused");
        let _b = s.acquire("b").expect("keys are counted apart");
        drop(a1);
        assert_eq!(s.open("a"), 1);
        assert!(s.acquire("a").is_some(), "a closed stream frees its slot");
        let unlimited = StreamSlots::new(0);
        let held: Vec<_> = (0..100).map(|_| unlimited.acquire("k").unwrap()).collect();
        assert_eq!(unlimited.open("k"), 100);
        drop(held);
        assert_eq!(unlimited.open("k"), 0);
    }
}
