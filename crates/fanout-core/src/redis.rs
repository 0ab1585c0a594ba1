//! The Redis connections every component shares: a [`Pool`] built from `[redis]`, and a
//! [`SharedConnection`] per component for scripts and other non-blocking commands.
//!
//! `redis.url` names either one server (`redis://`, `rediss://`, `unix://`) or a Redis Cluster
//! (`redis-cluster://`, `rediss-cluster://`, see [`Topology`]); the rest of Fanout sees the same
//! [`Pool`] and [`Connection`] either way. On a cluster every script touches keys of one hash
//! slot, and the cluster connection routes each command to the master serving its first key.
//!
//! Every `Pool::get` of a recycled connection costs a PING round trip (its health check). A
//! multiplexed connection serves any number of concurrent callers, so the hot paths (enqueue,
//! claim, budget, completion) keep one, taken out of the pool, and go back to the pool only after
//! a connection-level error. Blocking reads (`XREADGROUP BLOCK`, `XREAD BLOCK`) get a connection
//! of their own ([`Pool::blocking`]): nothing may queue behind a blocked command.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

pub use deadpool_redis::PoolError;

use crate::config::{RedisConfig, redact_url};

/// What `redis.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server (or a primary behind a proxy): the URL as given.
    Single(String),
    /// A Redis Cluster: `redis://` (or `rediss://`) URLs of its seed nodes. The client asks them
    /// for the slot map and follows it (and its changes) from then on.
    ///
    /// Written `redis-cluster://[user:password@]host:port[?node=host:port&node=…]`, or
    /// `rediss-cluster://…` for TLS (`#insecure` at the end skips the certificate check): the
    /// form the `fred` client uses. One seed is enough; more let a client start while a seed
    /// is down. A managed cluster's configuration endpoint is one seed.
    Cluster(Vec<String>),
}

impl Topology {
    /// Parse `redis.url`; the error says what is wrong, with any password redacted.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis-cluster://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("rediss-cluster://") {
            (true, rest)
        } else if ["redis://", "rediss://", "unix://", "redis+unix://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Ok(Self::Single(url.to_owned()));
        } else {
            return Err(format!(
                "`{}` is not a Redis URL; expected redis://host:port[/db], rediss://…, or \
                 redis-cluster://host:port[?node=host:port&…] for a Redis Cluster",
                redact_url(url)
            ));
        };
        let (rest, fragment) = match rest.split_once('#') {
            Some((rest, fragment)) => (rest, Some(fragment)),
            None => (rest, None),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (credentials, first) = match rest.rsplit_once('@') {
            Some((credentials, host)) => (Some(credentials), host),
            None => (None, rest),
        };
        let first = match first.split_once('/') {
            Some((host, "" | "0")) => host,
            Some(_) => {
                return Err(format!(
                    "`{}`: a Redis Cluster has only database 0; drop the /db path",
                    redact_url(url)
                ));
            }
            None => first,
        };
        let mut hosts = vec![first.to_owned()];
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("node", host)) if !host.is_empty() => hosts.push(host.to_owned()),
                _ => {
                    return Err(format!(
                        "`{}`: unknown parameter `{pair}`; the only one is node=host:port",
                        redact_url(url)
                    ));
                }
            }
        }
        let scheme = if tls { "rediss" } else { "redis" };
        let mut nodes = Vec::with_capacity(hosts.len());
        for host in hosts {
            let valid = match host.rsplit_once(':') {
                Some((name, port)) => !name.is_empty() && port.parse::<u16>().is_ok(),
                None => false,
            };
            if !valid {
                return Err(format!("`{}`: `{host}` is not host:port", redact_url(url)));
            }
            let auth = credentials.map(|c| format!("{c}@")).unwrap_or_default();
            let suffix = fragment.map(|f| format!("/#{f}")).unwrap_or_default();
            nodes.push(format!("{scheme}://{auth}{host}{suffix}"));
        }
        Ok(Self::Cluster(nodes))
    }
}

/// Connections to the Redis that `[redis]` names: one server or a cluster. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: PoolInner,
    /// `redis.wait_replicas` and the time to give them (`redis.command_timeout_ms`).
    wait_replicas: u32,
    wait_timeout: Duration,
}

#[derive(Clone)]
enum PoolInner {
    Single(deadpool_redis::Pool),
    Cluster {
        pool: managed::Pool<ClusterManager>,
        /// Connections for blocking reads of up to [`BLOCKING_WINDOW`].
        blocking: managed::Pool<ClusterManager>,
        nodes: Arc<Vec<String>>,
        timeout: Duration,
    },
}

/// The response timeout of a cluster connection kept for blocking reads: the longest block
/// Fanout asks for, plus a margin (a longer one gets a connection of its own).
const BLOCKING_WINDOW: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("cluster", &self.is_cluster())
            .field("status", &self.status())
            .finish()
    }
}

/// A connection pool sized and timed from the config. `redis.command_timeout_ms` bounds
/// connecting, waiting for a pooled connection and each response (the client's own default is
/// 500 ms, which a busy machine exceeds at start-up under a burst of jobs).
pub fn pool(config: &RedisConfig) -> Result<Pool, String> {
    let timeout = Duration::from_millis(config.command_timeout_ms);
    let inner = match Topology::parse(&config.url)? {
        Topology::Single(url) => {
            let connection = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            let manager = deadpool_redis::Manager::new_with_config(url.as_str(), connection)
                .map_err(|e| format!("redis url {}: {e}", redact_url(&url)))?;
            let pool = deadpool_redis::Pool::builder(manager)
                .max_size(config.pool_size)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .runtime(deadpool_redis::Runtime::Tokio1)
                .build()
                .map_err(|e| format!("redis pool for {}: {e}", redact_url(&url)))?;
            PoolInner::Single(pool)
        }
        Topology::Cluster(nodes) => {
            let client = cluster_client(&nodes, timeout)
                .map_err(|e| format!("redis url {}: {e}", redact_url(&config.url)))?;
            // Connecting to a cluster asks a seed for the slot map, then opens one connection
            // per master: allow a few command timeouts.
            let build = |client| {
                managed::Pool::builder(ClusterManager { client })
                    .max_size(config.pool_size)
                    .wait_timeout(Some(timeout))
                    .create_timeout(Some(timeout * 3))
                    .recycle_timeout(Some(timeout))
                    .runtime(deadpool::Runtime::Tokio1)
                    .build()
                    .map_err(|e| format!("redis pool for {}: {e}", redact_url(&config.url)))
            };
            let pool = build(client)?;
            let blocking = build(
                cluster_client(&nodes, BLOCKING_WINDOW)
                    .map_err(|e| format!("redis url {}: {e}", redact_url(&config.url)))?,
            )?;
            PoolInner::Cluster {
                pool,
                blocking,
                nodes: Arc::new(nodes),
                timeout,
            }
        }
    };
    Ok(Pool {
        inner,
        wait_replicas: config.wait_replicas,
        wait_timeout: timeout,
    })
}

/// A cluster client whose every request is bounded by `timeout`, with the same bound again for
/// the redirects and retries of a slot moving or a failover.
fn cluster_client(
    nodes: &[String],
    response_timeout: Duration,
) -> Result<ClusterClient, RedisError> {
    ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(response_timeout)
        .response_timeout(response_timeout)
        .overall_response_timeout(Some(response_timeout * 2))
        .build()
}

impl Pool {
    /// Whether `redis.url` names a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner, PoolInner::Cluster { .. })
    }

    /// A connection, back to the pool when dropped.
    pub async fn get(&self) -> Result<PooledConnection, PoolError> {
        Ok(match &self.inner {
            PoolInner::Single(pool) => PooledConnection::Single(pool.get().await?),
            PoolInner::Cluster { pool, .. } => PooledConnection::Cluster(pool.get().await?),
        })
    }

    /// A connection of its own for a blocking read whose response may take `timeout`, kept in
    /// `slot` for the next read (clear the slot after an error). On one server the connection is
    /// taken out of the pool and its response timeout set for each read. A cluster connection's
    /// timeout is fixed when it connects (to every master): it comes from a second pool whose
    /// connections wait up to a minute, and goes back there when the slot is dropped; a longer
    /// read opens one of its own.
    pub async fn blocking<'a>(
        &self,
        slot: &'a mut Option<Blocking>,
        timeout: Duration,
    ) -> Result<&'a mut Connection, PoolError> {
        let reusable = match (&self.inner, slot.as_ref()) {
            (_, None) => false,
            (PoolInner::Single(_), Some(_)) => true,
            (PoolInner::Cluster { .. }, Some(b)) => b.window >= timeout,
        };
        if !reusable {
            // Back to its pool (if it came from one) before another is taken.
            *slot = None;
            let opened = match &self.inner {
                PoolInner::Single(pool) => Blocking {
                    conn: Connection::Single(deadpool_redis::Connection::take(pool.get().await?)),
                    window: timeout,
                    _lease: None,
                },
                PoolInner::Cluster { blocking, .. } if timeout <= BLOCKING_WINDOW => {
                    let lease = blocking.get().await?;
                    Blocking {
                        conn: Connection::Cluster((*lease).clone()),
                        window: BLOCKING_WINDOW,
                        _lease: Some(lease),
                    }
                }
                PoolInner::Cluster {
                    nodes,
                    timeout: connect,
                    ..
                } => {
                    let client = cluster_client(nodes, timeout).map_err(PoolError::Backend)?;
                    let conn = tokio::time::timeout(*connect * 3, client.get_async_connection())
                        .await
                        .map_err(|_| PoolError::Timeout(managed::TimeoutType::Create))?
                        .map_err(PoolError::Backend)?;
                    Blocking {
                        conn: Connection::Cluster(conn),
                        window: timeout,
                        _lease: None,
                    }
                }
            };
            *slot = Some(opened);
        }
        let blocking = slot.as_mut().expect("just opened");
        if let Connection::Single(c) = &mut blocking.conn {
            c.set_response_timeout(timeout);
        }
        Ok(&mut blocking.conn)
    }

    /// The pool's size and idle connections, for logs.
    pub fn status(&self) -> deadpool::Status {
        match &self.inner {
            PoolInner::Single(pool) => pool.status(),
            PoolInner::Cluster { pool, .. } => pool.status(),
        }
    }
}

/// A cluster connection per pool object; the client follows the cluster's slot map.
pub struct ClusterManager {
    client: ClusterClient,
}

impl std::fmt::Debug for ClusterManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterManager").finish_non_exhaustive()
    }
}

impl managed::Manager for ClusterManager {
    type Type = ClusterConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<ClusterConnection, RedisError> {
        self.client.get_async_connection().await
    }

    async fn recycle(
        &self,
        conn: &mut ClusterConnection,
        _: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        // One node is enough: the connection follows the cluster by itself, and a PING to
        // every master would fail every checkout while one of them fails over.
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        conn.route_command(redis::cmd("PING"), route).await?;
        Ok(())
    }
}

/// `ConnectionLike` for an enum of a one-server and a cluster connection: each call goes to
/// whichever it holds.
macro_rules! delegate_connection_like {
    ($t:ty) => {
        impl ConnectionLike for $t {
            fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
                match self {
                    Self::Single(c) => c.req_packed_command(cmd),
                    Self::Cluster(c) => c.req_packed_command(cmd),
                }
            }

            fn req_packed_commands<'a>(
                &'a mut self,
                cmd: &'a Pipeline,
                offset: usize,
                count: usize,
            ) -> RedisFuture<'a, Vec<Value>> {
                match self {
                    Self::Single(c) => c.req_packed_commands(cmd, offset, count),
                    Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
                }
            }

            fn get_db(&self) -> i64 {
                match self {
                    Self::Single(c) => c.get_db(),
                    Self::Cluster(c) => c.get_db(),
                }
            }
        }
    };
}

/// A connection checked out of a [`Pool`]; back to the pool when dropped.
#[allow(missing_debug_implementations)] // neither connection type is Debug
pub enum PooledConnection {
    Single(deadpool_redis::Connection),
    Cluster(managed::Object<ClusterManager>),
}

impl PooledConnection {
    /// Take the connection out of its pool for good (the pool opens another in its place).
    pub fn take(this: Self) -> Connection {
        match this {
            Self::Single(c) => Connection::Single(deadpool_redis::Connection::take(c)),
            Self::Cluster(c) => Connection::Cluster(managed::Object::take(c)),
        }
    }
}

delegate_connection_like!(PooledConnection);

/// A multiplexed connection to one server or to a cluster; cheap to clone, and every clone
/// shares the same sockets.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // neither connection type is Debug
pub enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

delegate_connection_like!(Connection);

impl Connection {
    /// Every key matching `pattern` (`SCAN … MATCH`, 500 at a time): for operator reads, never a
    /// hot path. On a cluster the scan runs on the master serving the slot of the pattern's hash
    /// tag, so `pattern` must start with one (`{ns:budget}:bucket:*`): a SCAN cursor belongs to
    /// one node.
    pub async fn scan_matching(&self, pattern: &str) -> Result<Vec<String>, RedisError> {
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500);
            let (next, keys): (u64, Vec<String>) = match self {
                Self::Single(c) => cmd.query_async(&mut c.clone()).await?,
                Self::Cluster(c) => {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::new(key_slot(pattern.as_bytes()), SlotAddr::Master),
                    ));
                    redis::from_redis_value(c.clone().route_command(cmd, route).await?)
                        .map_err(RedisError::from)?
                }
            };
            out.extend(keys);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Send `cmds`, whose keys may sit in different hash slots, all at once and collect their
    /// replies in order. A pipeline may not cross slots on a cluster; concurrent commands on a
    /// multiplexed connection go out back to back all the same (one round trip per node).
    pub async fn query_each<T: redis::FromRedisValue>(
        &self,
        cmds: impl IntoIterator<Item = Cmd>,
    ) -> Result<Vec<T>, RedisError> {
        futures::future::try_join_all(cmds.into_iter().map(|cmd| {
            let mut conn = self.clone();
            async move { cmd.query_async::<T>(&mut conn).await }
        }))
        .await
    }
}

/// `INFO <section>` of every server that holds data: one server's text (its node name empty),
/// or, on a cluster, each master's with its address (`host:port`), in address order.
pub async fn info_by_node(
    conn: &mut (impl ConnectionLike + Send),
    section: &str,
) -> Result<Vec<(String, String)>, RedisError> {
    let info: Value = redis::cmd("INFO").arg(section).query_async(conn).await?;
    let mut nodes = match info {
        // A cluster connection asks every master and answers with a map node -> text.
        Value::Map(nodes) => nodes
            .into_iter()
            .map(|(node, text)| {
                Ok((
                    redis::from_redis_value(node)?,
                    redis::from_redis_value(text)?,
                ))
            })
            .collect::<Result<Vec<_>, redis::ParsingError>>()?,
        one => vec![(String::new(), redis::from_redis_value(one)?)],
    };
    nodes.sort();
    Ok(nodes)
}

/// Each command's `calls` in `INFO commandstats` texts (one per node), summed over them, by
/// name (`xadd`, `config|resetstat`).
pub fn command_calls<'a>(infos: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    for line in infos.into_iter().flat_map(str::lines) {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let n: u64 = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        *calls.entry(name.to_owned()).or_default() += n;
    }
    calls
}

fn try_again(detail: String) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain),
        "the write is not on enough replicas yet",
        detail,
    ))
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the
/// first `{` and the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&len| len > 0)
            .map(|len| &rest[..len])
    });
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(key) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// A connection kept for blocking reads; see [`Pool::blocking`].
#[allow(missing_debug_implementations)] // neither connection type is Debug
pub struct Blocking {
    conn: Connection,
    window: Duration,
    /// The pooled cluster connection `conn` is a handle of, back to its pool on drop.
    _lease: Option<managed::Object<ClusterManager>>,
}

/// One multiplexed connection shared by every non-blocking call of a component; cheap to clone.
#[derive(Clone)]
pub struct SharedConnection {
    pool: Pool,
    slot: Arc<Mutex<Option<Connection>>>,
}

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConnection")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl SharedConnection {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            slot: Arc::new(Mutex::new(None)),
        }
    }

    /// The pool, for blocking reads that need a connection of their own.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A barrier after writes that a later step (in another slot, or a reply to a client)
    /// builds on: returns once `redis.wait_replicas` replicas hold everything `conn` (the
    /// connection that made the writes, taken from [`SharedConnection::get`]) wrote so far to
    /// the masters of `keys` (`WAIT` on each; on one server, one `WAIT`), at once when that is 0.
    /// Fewer within half of `redis.command_timeout_ms`, or no answer (a master failing over), is
    /// an error (`TRYAGAIN`), and the caller retries as after any Redis error: the write was
    /// made on the master, and repeating it is idempotent.
    pub async fn replicated(&self, conn: &Connection, keys: &[&str]) -> Result<(), RedisError> {
        let want = self.pool.wait_replicas;
        if want == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(want)
            .arg((self.pool.wait_timeout / 2).as_millis() as u64);
        let acked: Vec<Result<i64, RedisError>> = match conn {
            Connection::Single(c) => {
                let mut c = c.clone();
                vec![wait.query_async(&mut c).await]
            }
            Connection::Cluster(c) => {
                let mut slots: Vec<u16> = keys.iter().map(|k| key_slot(k.as_bytes())).collect();
                slots.sort_unstable();
                slots.dedup();
                futures::future::join_all(slots.into_iter().map(|slot| {
                    let mut c = c.clone();
                    let wait = wait.clone();
                    async move {
                        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                            Route::new(slot, SlotAddr::Master),
                        ));
                        let v = c.route_command(wait, route).await?;
                        redis::from_redis_value::<i64>(v).map_err(RedisError::from)
                    }
                }))
                .await
            }
        };
        for acked in acked {
            match acked {
                Ok(n) if n >= i64::from(want) => {}
                Ok(n) => {
                    return Err(try_again(format!(
                        "{n} of redis.wait_replicas = {want} replicas acknowledged the write"
                    )));
                }
                Err(e) => {
                    self.check(&e);
                    return Err(try_again(format!("waiting for replicas: {e}")));
                }
            }
        }
        Ok(())
    }

    /// The shared connection, opened (taken out of the pool) on first use or after a failure.
    pub async fn get(&self) -> Result<Connection, PoolError> {
        if let Some(c) = self.slot.lock().expect("connection slot").as_ref() {
            return Ok(c.clone());
        }
        let c = PooledConnection::take(self.pool.get().await?);
        let mut slot = self.slot.lock().expect("connection slot");
        Ok(slot.get_or_insert(c).clone())
    }

    /// Retire the shared connection after a connection-level error, so the next call opens a
    /// fresh one (a restarted Redis, a dropped socket). Other errors leave it alone.
    pub fn check(&self, e: &RedisError) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            self.slot.lock().expect("connection slot").take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis_cluster() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        // The CRC16-XMODEM check value of "123456789" is 0x31C3 (12739, below 16384).
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"{fanout:queue}:ready"), key_slot(b"fanout:queue"));
    }

    #[test]
    fn command_calls_are_summed_over_nodes() {
        let a = "# Commandstats\r\ncmdstat_xadd:calls=3,usec=10,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\ncmdstat_config|resetstat:calls=1,usec=2\r\n";
        let b = "# Commandstats\r\ncmdstat_xadd:calls=4,usec=5\r\ncmdstat_get:calls=2,usec=1\r\n";
        let calls = command_calls([a, b]);
        assert_eq!(
            calls.into_iter().collect::<Vec<_>>(),
            [
                ("config|resetstat".to_owned(), 1),
                ("get".to_owned(), 2),
                ("xadd".to_owned(), 7)
            ]
        );
    }

    #[test]
    fn cluster_urls_parse_into_seed_nodes() {
        assert_eq!(
            Topology::parse("redis://h:6379/2"),
            Ok(Topology::Single("redis://h:6379/2".into()))
        );
        assert_eq!(
            Topology::parse("redis-cluster://:pw@a:7000?node=b:7001&node=c:7002"),
            Ok(Topology::Cluster(vec![
                "redis://:pw@a:7000".into(),
                "redis://:pw@b:7001".into(),
                "redis://:pw@c:7002".into(),
            ]))
        );
        assert_eq!(
            Topology::parse("rediss-cluster://cfg.example:6379#insecure"),
            Ok(Topology::Cluster(vec![
                "rediss://cfg.example:6379/#insecure".into()
            ]))
        );
        for (bad, says) in [
            ("redis-cluster://a:7000/3", "only database 0"),
            ("redis-cluster://a", "not host:port"),
            ("redis-cluster://a:7000?nodes=b:1", "unknown parameter"),
            ("http://a:7000", "not a Redis URL"),
        ] {
            let e = Topology::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // A password never shows in an error.
        let e = Topology::parse("redis-cluster://:secret@a:7000/3").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
