//! The lease keeper: one task per [`Budget`](crate::Budget) that renews the concurrency leases this
//! process holds and does the Redis half of drops (a cancelled waiter leaving the room, an
//! admission dropped without settle releasing its lease).
//!
//! Renewal runs every `lease_secs / 3` in one script call for all live leases, so a live call keeps
//! its lease however long it runs, and a killed process's leases expire within `lease_secs`.
//! The task ends when the last sender (the budget and every admission) is gone.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{Instrument as _, debug, warn};

use crate::keys::Keys;
use crate::redis_conn::{Redis, SCRIPTS};

/// Work handed to the keeper from synchronous `Drop`s.
#[derive(Debug)]
pub(crate) enum Chore {
    /// Take `id` out of `family`'s waiting room and release a lease of that id.
    Leave { family: String, id: String },
}

#[derive(Debug)]
pub(crate) struct Keeper {
    tx: mpsc::UnboundedSender<Chore>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Chore>>>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Lease ids this process holds right now.
    pub(crate) live: Arc<Mutex<HashSet<String>>>,
}

impl Keeper {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            task: Mutex::new(None),
            live: Arc::default(),
        }
    }

    /// Start the task on first use (the budget may be built outside a runtime).
    pub(crate) fn ensure_started(&self, redis: &Arc<Redis>, keys: &Keys, lease: Duration) {
        let mut task = self.task.lock().expect("keeper task");
        if task.is_some() {
            return;
        }
        let Some(rx) = self.rx.lock().expect("keeper rx").take() else {
            return;
        };
        let span = tracing::debug_span!("budget_keeper");
        *task = Some(tokio::spawn(
            run(redis.clone(), keys.clone(), self.live.clone(), lease, rx).instrument(span),
        ));
    }

    pub(crate) fn send(&self, chore: Chore) {
        // Fails only when the keeper is gone, and then so is the runtime that would do the work;
        // leases expire and waiters lose their place on their own.
        let _ = self.tx.send(chore);
    }

    pub(crate) fn hold(&self, id: &str) {
        self.live.lock().expect("live leases").insert(id.to_owned());
    }

    /// Stop renewing `id`; returns whether it was still held.
    pub(crate) fn drop_lease(&self, id: &str) -> bool {
        self.live.lock().expect("live leases").remove(id)
    }
}

async fn run(
    redis: Arc<Redis>,
    keys: Keys,
    live: Arc<Mutex<HashSet<String>>>,
    lease: Duration,
    mut rx: mpsc::UnboundedReceiver<Chore>,
) {
    let every = (lease / 3).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease_ms = lease.as_millis() as u64;
    loop {
        tokio::select! {
            chore = rx.recv() => match chore {
                Some(Chore::Leave { family, id }) => {
                    let mut inv = SCRIPTS.leave.prepare_invoke();
                    inv.key(keys.room(&family))
                        .key(keys.room_expiry(&family))
                        .key(keys.room_cost(&family))
                        .key(keys.leases())
                        .arg(&id);
                    if let Err(e) = redis.run(&inv).await {
                        warn!(error = %e, "budget could not release a dropped lease or waiter; it expires on its own");
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                let ids: Vec<String> = live.lock().expect("live leases").iter().cloned().collect();
                if ids.is_empty() {
                    continue;
                }
                let mut inv = SCRIPTS.renew.prepare_invoke();
                inv.key(keys.leases()).arg(lease_ms).arg(&ids);
                match redis.run(&inv).await {
                    Ok(v) => debug!(held = ids.len(), renewed = ?crate::redis_conn::int(&v), "budget leases renewed"),
                    Err(e) => warn!(held = ids.len(), error = %e, "budget lease renewal failed, will retry"),
                }
            }
        }
    }
}
