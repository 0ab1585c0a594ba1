//! Every Redis key the queue touches, built in one place.

use crate::job::Lane;

/// The consumer group every worker joins, on every stream.
pub const GROUP: &str = "workers";

/// Key names for one namespace. All share the hash tag `{<namespace>:queue}`, so every script
/// touches a single cluster slot.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{{{namespace}:queue}}"),
        }
    }

    /// The stream of one (lane, priority).
    pub(crate) fn stream(&self, lane: Lane, priority: u8) -> String {
        format!("{}:stream:{}:{priority}", self.prefix, lane.as_str())
    }

    /// Parse a stream key back into its lane and priority.
    pub(crate) fn parse_stream(&self, key: &str) -> Option<(Lane, u8)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":stream:")?;
        let (lane, priority) = rest.split_once(':')?;
        Some((Lane::parse(lane)?, priority.parse().ok()?))
    }

    /// ZSET of every stream ever written, scored by serving order.
    pub(crate) fn registry(&self) -> String {
        format!("{}:streams", self.prefix)
    }

    /// ZSET of the streams that may hold undelivered entries.
    pub(crate) fn ready(&self) -> String {
        format!("{}:ready", self.prefix)
    }

    /// ZSET job id → due time (ms) of the jobs waiting in one lane.
    pub(crate) fn delayed(&self, lane: Lane) -> String {
        format!("{}:delayed:{}", self.prefix, lane.as_str())
    }

    /// HASH job id → the packed job of every delayed job.
    pub(crate) fn delayed_jobs(&self) -> String {
        format!("{}:delayed-jobs", self.prefix)
    }

    /// Dead-letter stream of one lane.
    pub(crate) fn dead(&self, lane: Lane) -> String {
        format!("{}:dead:{}", self.prefix, lane.as_str())
    }

    /// Stream with one entry per call that makes jobs ready (`ready`) or delayed (`due`); idle
    /// claimers block on it.
    pub(crate) fn wake(&self) -> String {
        format!("{}:wake", self.prefix)
    }

    /// ZSET consumer name → when its worker process counts as gone (ms, Redis clock); kept
    /// fresh by the worker's liveness beat.
    pub(crate) fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// STRING: when any worker process last beat (ms, Redis clock): tells a worker that missed
    /// its beats from Redis having been away.
    pub(crate) fn last_beat(&self) -> String {
        format!("{}:workers-last-beat", self.prefix)
    }

    /// HASH consumer name → what its worker process says about itself (JSON, see
    /// [`crate::WorkerInfo`]).
    pub(crate) fn worker_info(&self) -> String {
        format!("{}:worker-info", self.prefix)
    }

    /// Idempotency key of a job id.
    pub(crate) fn idempotency(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.prefix)
    }
}

/// The serving order of a stream: interactive before batch, higher priority first.
pub(crate) fn order_score(lane: Lane, priority: u8) -> u32 {
    let lane_rank = match lane {
        Lane::Interactive => 0,
        Lane::Batch => 1,
    };
    lane_rank * 256 + (255 - u32::from(priority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_round_trip_and_share_a_hash_tag() {
        let k = Keys::new("fanout");
        let s = k.stream(Lane::Batch, 7);
        assert_eq!(s, "{fanout:queue}:stream:batch:7");
        assert_eq!(k.parse_stream(&s), Some((Lane::Batch, 7)));
        assert_eq!(k.parse_stream("{other:queue}:stream:batch:7"), None);
        for key in [
            k.registry(),
            k.ready(),
            k.delayed(Lane::Interactive),
            k.dead(Lane::Batch),
        ] {
            assert!(key.starts_with("{fanout:queue}:"), "{key}");
        }
    }

    #[test]
    fn interactive_outranks_batch_and_priority_orders_within_a_lane() {
        let mut all = vec![
            (Lane::Batch, 255),
            (Lane::Interactive, 0),
            (Lane::Batch, 0),
            (Lane::Interactive, 9),
        ];
        all.sort_by_key(|(l, p)| order_score(*l, *p));
        assert_eq!(
            all,
            vec![
                (Lane::Interactive, 9),
                (Lane::Interactive, 0),
                (Lane::Batch, 255),
                (Lane::Batch, 0)
            ]
        );
    }
}
