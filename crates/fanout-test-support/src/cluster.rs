//! A private Redis Cluster for one test: `redis-server --cluster-enabled yes` nodes joined by
//! `redis-cli --cluster create`.

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, redis_server_path};

/// The number of hash slots in a Redis Cluster.
const SLOTS: usize = 16384;

/// A private Redis Cluster on free ports, one temp dir per node. Every node is killed when
/// dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// Masters first, in the order `redis-cli --cluster create` was given them, then replicas.
    nodes: Vec<Node>,
    node_timeout_ms: u64,
}

/// One `redis-server` of the cluster.
#[derive(Debug)]
struct Node {
    port: u16,
    /// The cluster bus port (`--cluster-port`), picked free like `port`.
    bus_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    port: u16,
    flags: Vec<String>,
    /// Inclusive slot ranges this node serves.
    slots: Vec<(usize, usize)>,
}

impl NodeLine {
    fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Flagged `fail` or `fail?` by the node that was asked.
    fn is_failing(&self) -> bool {
        self.flags.iter().any(|f| f.starts_with("fail"))
    }
}

impl RedisCluster {
    /// 3 masters, no replicas.
    pub fn start() -> Self {
        Self::start_with(3, 0, 5000)
    }

    /// `masters` masters, each with `replicas_per_master` replicas, cluster-node-timeout
    /// `node_timeout_ms`. A replica fails over whenever its master is down, however stale.
    pub fn start_with(masters: usize, replicas_per_master: usize, node_timeout_ms: u64) -> Self {
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs 3 masters or more"
        );
        // A port can be taken between probing and binding; try a few.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(masters, replicas_per_master, node_timeout_ms) {
                Ok(cluster) => return cluster,
                Err(e) => last = e,
            }
        }
        panic!("could not start a Redis Cluster ({last}); is redis-server installed?");
    }

    fn try_start(masters: usize, replicas: usize, node_timeout_ms: u64) -> Result<Self, String> {
        let count = masters * (1 + replicas);
        let mut ports = Vec::with_capacity(2 * count);
        while ports.len() < 2 * count {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let mut cluster = Self {
            nodes: Vec::new(),
            node_timeout_ms,
        };
        for pair in ports.chunks(2) {
            cluster.nodes.push(Node {
                port: pair[0],
                bus_port: pair[1],
                dir: tempfile::tempdir().map_err(|e| format!("temp dir for redis: {e}"))?,
                child: None,
            });
        }
        for node in &mut cluster.nodes {
            node.spawn(node_timeout_ms)?;
        }
        for node in &mut cluster.nodes {
            node.wait_ready()?;
        }
        cluster.create(replicas);

        // redis-cli is done once it sent CLUSTER REPLICATE to the replicas; the other nodes
        // learn of their new role by gossip a moment later.
        let deadline = Instant::now() + Duration::from_secs(20);
        let masters_now = loop {
            if let Some(found) = cluster.agreed_masters(masters) {
                break found;
            }
            assert!(
                Instant::now() < deadline,
                "Redis Cluster nodes do not agree on {masters} masters 20 s after \
                 redis-cli --cluster create; CLUSTER NODES:\n{}",
                cluster.dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // Stable: masters keep their creation order, then the replicas.
        cluster
            .nodes
            .sort_by_key(|n| !masters_now.contains(&n.port));

        assert!(
            cluster.wait_ok(Duration::from_secs(20)),
            "Redis Cluster not ok 20 s after redis-cli --cluster create; CLUSTER NODES:\n{}",
            cluster.dump()
        );
        Ok(cluster)
    }

    /// The masters, if every node sees all nodes and the same `expected` masters.
    fn agreed_masters(&self, expected: usize) -> Option<HashSet<u16>> {
        let mut agreed: Option<HashSet<u16>> = None;
        for node in &self.nodes {
            let view = parse_cluster_nodes(&query(node.port, &["CLUSTER", "NODES"])?);
            let masters: HashSet<u16> = view
                .iter()
                .filter(|n| n.is_master())
                .map(|n| n.port)
                .collect();
            if view.len() != self.nodes.len() || masters.len() != expected {
                return None;
            }
            if agreed.as_ref().is_some_and(|a| *a != masters) {
                return None;
            }
            agreed = Some(masters);
        }
        agreed
    }

    /// `CLUSTER NODES` of the first node that answers, for panic messages.
    fn dump(&self) -> String {
        self.nodes
            .iter()
            .find_map(|n| query(n.port, &["CLUSTER", "NODES"]))
            .unwrap_or_default()
    }

    /// Join the nodes with `redis-cli --cluster create`; panics with its output if it fails.
    fn create(&self, replicas: usize) {
        let mut child = Command::new(redis_cli_path())
            .args(["--cluster", "create"])
            .args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run redis-cli (it comes with redis-server)");
        let mut pipes = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .map(|pipe| {
            std::thread::spawn(move || {
                let mut out = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut out);
                }
                out
            })
        })
        .into_iter();
        // It waits for the nodes to agree on the configuration, with no limit of its own.
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let stdout = pipes.next().and_then(|t| t.join().ok()).unwrap_or_default();
        let stderr = pipes.next().and_then(|t| t.join().ok()).unwrap_or_default();
        if !status.is_some_and(|s| s.success()) {
            panic!(
                "redis-cli --cluster create failed ({}):\n{stdout}\n{stderr}",
                status.map_or("no exit within 60 s".into(), |s| s.to_string())
            );
        }
    }

    /// Seed URL in the form `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=127.0.0.1:P3`,
    /// naming every node: masters and replicas.
    pub fn url(&self) -> String {
        let mut url = String::from("redis-cluster://");
        for (i, node) in self.nodes.iter().enumerate() {
            let sep = match i {
                0 => "",
                1 => "?node=",
                _ => "&node=",
            };
            url.push_str(&format!("{sep}127.0.0.1:{}", node.port));
        }
        url
    }

    /// `redis://127.0.0.1:P` for every node, masters first as created, killed nodes included.
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The ports of the live nodes serving as masters, as `CLUSTER NODES` on a live node tells.
    pub fn master_ports(&self) -> Vec<u16> {
        let masters: HashSet<u16> = self
            .cluster_nodes()
            .into_iter()
            .filter(|n| n.is_master() && !n.is_failing())
            .map(|n| n.port)
            .collect();
        self.live_ports()
            .into_iter()
            .filter(|p| masters.contains(p))
            .collect()
    }

    /// The port of the master serving hash slot `slot`, as `CLUSTER NODES` on a live node tells
    /// (masters it flags `fail` or `fail?` left out). Panics if none does.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        let slot = usize::from(slot);
        let view = self.cluster_nodes();
        view.iter()
            .find(|n| {
                n.is_master()
                    && !n.is_failing()
                    && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {view:?}"))
    }

    /// SIGKILL the node on `port` (it stays down).
    pub fn kill_node(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
    }

    /// Start the node on `port` again after [`RedisCluster::kill_node`], from its
    /// `nodes.conf` and without data (no persistence): it rejoins the cluster, and once a
    /// replica has taken over its slots, it becomes that replica's replica (as a restarted
    /// pod of a managed cluster does). Waits until it answers.
    pub fn restart_node(&mut self, port: u16) {
        let timeout = self.node_timeout_ms;
        let node = self.node_mut(port);
        node.kill();
        node.spawn(timeout).expect("restart a cluster node");
        node.wait_ready().expect("restarted cluster node answers");
    }

    /// Wait until every live node reports `cluster_state:ok` and, in its `CLUSTER NODES`, every
    /// slot is served by a live master not flagged failing; polls every 50 ms up to `timeout`.
    /// Returns whether it happened.
    pub fn wait_ok(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_ok() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_ok(&self) -> bool {
        let live = self.live_ports();
        !live.is_empty()
            && live.iter().all(|&port| {
                let Some(info) = query(port, &["CLUSTER", "INFO"]) else {
                    return false;
                };
                if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    return false;
                }
                let Some(nodes) = query(port, &["CLUSTER", "NODES"]) else {
                    return false;
                };
                let mut served = vec![false; SLOTS];
                for n in parse_cluster_nodes(&nodes) {
                    if n.is_master() && !n.is_failing() && live.contains(&n.port) {
                        for (a, b) in n.slots {
                            served[a..=b].fill(true);
                        }
                    }
                }
                served.iter().all(|&s| s)
            })
    }

    /// A synchronous cluster-aware connection for assertions: a
    /// [`redis::cluster::ClusterClient`] over [`RedisCluster::node_urls`]. A connection opened
    /// before a failover keeps trying the dead master (the sync cluster connection of redis 1.8
    /// refreshes its slot map on `MOVED`, not on a refused connection): connect again after
    /// [`RedisCluster::wait_ok`].
    pub fn client(&self) -> redis::cluster::ClusterClient {
        redis::cluster::ClusterClient::new(self.node_urls()).expect("cluster node urls")
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `CLUSTER NODES` from the first live node that answers, retried for up to 10 s.
    fn cluster_nodes(&self) -> Vec<NodeLine> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(text) = self
                .live_ports()
                .into_iter()
                .find_map(|p| query(p, &["CLUSTER", "NODES"]))
            {
                return parse_cluster_nodes(&text);
            }
            assert!(
                Instant::now() < deadline,
                "no live node of the cluster answers CLUSTER NODES"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

impl Node {
    fn spawn(&mut self, node_timeout_ms: u64) -> Result<(), String> {
        let child = Command::new(redis_server_path())
            .current_dir(self.dir.path())
            .args(["--port", &self.port.to_string()])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--cluster-allow-replica-migration", "no"])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(["--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start redis-server: {e}"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Wait until this very process (not another one that won the port) answers on `port`.
    fn wait_ready(&mut self) -> Result<(), String> {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return Err("redis-server not started".into());
        };
        let expect = format!("process_id:{pid}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if query(self.port, &["INFO", "server"])
                .is_some_and(|i| i.lines().any(|l| l.trim() == expect))
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && !matches!(child.try_wait(), Ok(None))
            {
                self.child = None;
                return Err(format!(
                    "redis-server on ports {}/{} exited at start",
                    self.port, self.bus_port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(format!(
            "redis-server on port {} did not answer in 30 s",
            self.port
        ))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `redis-cli` beside `REDIS_SERVER` when that names a path holding one, else from `PATH`.
fn redis_cli_path() -> PathBuf {
    let server = redis_server_path();
    server
        .parent()
        .map(|dir| dir.join("redis-cli"))
        .filter(|cli| cli.is_file())
        .unwrap_or_else(|| PathBuf::from("redis-cli"))
}

/// Run one command on the node on `port` over a fresh connection; `None` on any error.
fn query(port: u16, args: &[&str]) -> Option<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .ok()?;
    con.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    con.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let (name, rest) = args.split_first()?;
    redis::cmd(name).arg(rest).query(&mut con).ok()
}

/// Parse `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
/// <pong-recv> <config-epoch> <link-state> <slot> <slot> ...`.
fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let addr = fields[1].split(['@', ',']).next()?;
            let port = addr.rsplit(':').next()?.parse().ok()?;
            let flags = fields[2].split(',').map(str::to_owned).collect();
            let slots = fields[8..]
                .iter()
                // `[slot->-id]` / `[slot-<-id]`: a slot being migrated or imported.
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .filter(|&(a, b): &(usize, usize)| a <= b && b < SLOTS)
                .collect();
            Some(NodeLine { port, flags, slots })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Commands;

    #[test]
    fn cluster_reads_back_what_it_wrote() {
        let started = Instant::now();
        let cluster = RedisCluster::start();
        eprintln!("3-master cluster started in {:?}", started.elapsed());
        assert_eq!(cluster.node_urls().len(), 3);
        assert_eq!(cluster.master_ports().len(), 3);
        assert!(cluster.url().starts_with("redis-cluster://127.0.0.1:"));
        assert_eq!(cluster.url().matches("node=").count(), 2);

        let mut con = cluster
            .client()
            .get_connection()
            .expect("cluster connection");
        for key in ["a", "b", "{x}1", "{x}2"] {
            let () = con.set(key, format!("v-{key}")).expect("SET");
        }
        for key in ["a", "b", "{x}1", "{x}2"] {
            let got: String = con.get(key).expect("GET");
            assert_eq!(got, format!("v-{key}"));
        }
        // `{x}1` and `{x}2` share a hash tag, so one slot and one master.
        let mut slot = |key: &str| -> u16 {
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query(&mut con)
                .expect("CLUSTER KEYSLOT")
        };
        assert_eq!(slot("{x}1"), slot("{x}2"));
        let ports = cluster.master_ports();
        assert!(ports.contains(&cluster.master_of_slot(slot("a"))));
    }

    #[test]
    fn cluster_fails_over_a_killed_master() {
        let started = Instant::now();
        let mut cluster = RedisCluster::start_with(3, 1, 1000);
        eprintln!(
            "3-master, 3-replica cluster started in {:?}",
            started.elapsed()
        );
        assert_eq!(cluster.node_urls().len(), 6);
        assert_eq!(cluster.master_ports().len(), 3);

        let mut con = cluster
            .client()
            .get_connection()
            .expect("cluster connection");
        let () = con.set("a", "before").expect("SET before the kill");
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg("a")
            .query(&mut con)
            .expect("CLUSTER KEYSLOT");
        let old = cluster.master_of_slot(slot);

        let killed = Instant::now();
        cluster.kill_node(old);
        assert!(
            cluster.wait_ok(Duration::from_secs(30)),
            "no failover in 30 s"
        );
        eprintln!(
            "failover (node timeout 1000 ms) took {:?}",
            killed.elapsed()
        );

        let new = cluster.master_of_slot(slot);
        assert_ne!(new, old);
        assert_eq!(cluster.master_ports().len(), 3);
        assert!(!cluster.master_ports().contains(&old));

        let mut con = cluster
            .client()
            .get_connection()
            .expect("cluster connection");
        let () = con.set("a", "after").expect("SET after the failover");
        let got: String = con.get("a").expect("GET after the failover");
        assert_eq!(got, "after");
    }
}
