//! Network namespaces for multi-node tests: each simulated node gets a namespace of its own
//! joined to the host namespace by a veth pair, so an agent listens on an address of its own
//! that the controller (in the host namespace) reaches, and that no other node shares.
//!
//! - Names and addresses come from a *slot* (0..[`SLOTS`]) held for the life of a [`Net`] by
//!   an exclusive lock on a file in [`LOCK_DIR`]. The kernel drops the lock when the holder
//!   dies, so parallel tests, parallel runs and other sessions never use the same names, and a
//!   free slot's leftovers (namespaces and links with its prefix, from a run killed before its
//!   Drop) are provably nobody's: they are removed when the slot is taken, nothing else is.
//! - Slot `s`, node `i`: namespace `hf-s<s>-<i>`, host-side link `hfs<s>n<i>h` with
//!   `10.231.<s>.<4i+1>/30`, node-side link `hfs<s>n<i>a` with `10.231.<s>.<4i+2>/30` and a
//!   default route via the host side (so the node reaches every address of the host
//!   namespace; the host answers on the pair, no forwarding involved).
//! - Processes join only the network namespace (`nsenter --net`), not a mount namespace as
//!   `ip netns exec` would make: an agent's stage and publish mounts must be visible on the
//!   host, as they are to a kubelet, and the tests' clean-up must see them.
//! - Drop deletes every namespace (its veth end goes with it, and so does the peer) and the
//!   host-side links, also after a panic.

// Each integration test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Where the slot locks live (tmpfs, per boot: a lock file outlives nothing it guards).
pub const LOCK_DIR: &str = "/run/holdfast-test-netns";
/// How many slots exist (third octet of `10.231.0.0/16`).
pub const SLOTS: u8 = 250;
/// Nodes per slot: each takes a /30 of the slot's /24.
pub const MAX_NODES: usize = 63;

/// One node's namespace and the addresses of its veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    /// The namespace's name (`ip netns` / `/run/netns/<name>`).
    pub ns: String,
    /// The host-side link.
    pub host_link: String,
    /// The node-side link (inside the namespace).
    pub node_link: String,
    /// The host side's address: the node's default gateway, where it reaches the host.
    pub host_ip: Ipv4Addr,
    /// The node's own address, reachable from the host namespace.
    pub ip: Ipv4Addr,
}

impl NodeNet {
    /// A command that runs `program` inside this node's network namespace (and nowhere else:
    /// mounts, pids and files are the host's). With util-linux's `setpriv`, the process is
    /// also killed when the thread that spawned it goes away, so a test killed before its Drop
    /// leaves no agent running.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns));
        if has_setpriv() {
            c.args(["setpriv", "--pdeathsig", "KILL", "--"]);
        } else {
            c.arg("--");
        }
        c.arg(program);
        c
    }
}

/// A set of node namespaces, removed again on Drop.
#[derive(Debug)]
pub struct Net {
    slot: u8,
    nodes: Vec<NodeNet>,
    // Held, not read: the slot is ours while this file is locked.
    _lock: Flock<File>,
}

impl Net {
    /// Makes `count` namespaces, each with its veth pair, addresses and default route.
    pub fn new(count: usize) -> Result<Net, String> {
        assert!(count <= MAX_NODES, "a slot has room for {MAX_NODES} nodes");
        require_tools()?;
        let (slot, lock) = take_slot()?;
        // From here on Drop removes whatever part was made.
        let mut net = Net { slot, nodes: Vec::with_capacity(count), _lock: lock };
        for i in 0..count {
            let node = net.plan(i);
            // Recorded before it exists, so a failure half-way is still cleaned up.
            net.nodes.push(node.clone());
            make_node(&node)?;
        }
        Ok(net)
    }

    /// The slot this set holds (its names and addresses derive from it).
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NodeNet {
        &self.nodes[i]
    }

    /// Every node.
    pub fn nodes(&self) -> &[NodeNet] {
        &self.nodes
    }

    /// An address of the host namespace every node reaches (node 0's gateway): where the
    /// controller listens.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.nodes.first().expect("a Net with at least one node").host_ip
    }

    fn plan(&self, i: usize) -> NodeNet {
        let s = self.slot;
        let base = u8::try_from(4 * i).expect("node index within MAX_NODES");
        NodeNet {
            ns: format!("hf-s{s}-{i}"),
            host_link: format!("hfs{s}n{i}h"),
            node_link: format!("hfs{s}n{i}a"),
            host_ip: Ipv4Addr::new(10, 231, s, base + 1),
            ip: Ipv4Addr::new(10, 231, s, base + 2),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.nodes {
            remove_node(n);
        }
    }
}

/// Whether `ip` (iproute2) and `nsenter` (util-linux) are installed, with a clear error if not.
pub fn require_tools() -> Result<(), String> {
    for (tool, package) in [("ip", "iproute2"), ("nsenter", "util-linux")] {
        let found = Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        if !found {
            return Err(format!("`{tool}` is not installed (Debian package {package}; scripts/install-deps installs it)"));
        }
    }
    Ok(())
}

fn has_setpriv() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new("setpriv").arg("--help").output().map(|o| String::from_utf8_lossy(&o.stdout).contains("--pdeathsig")).unwrap_or(false)
    })
}

/// Locks the first free slot, then removes what a dead holder of it may have left.
fn take_slot() -> Result<(u8, Flock<File>), String> {
    std::fs::create_dir_all(LOCK_DIR).map_err(|e| format!("create {LOCK_DIR}: {e}"))?;
    for slot in 0..SLOTS {
        let path = Path::new(LOCK_DIR).join(format!("slot-{slot}.lock"));
        let file =
            File::options().create(true).truncate(false).write(true).open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                remove_leftovers(slot);
                if address_in_use(slot) {
                    // Someone outside this scheme uses the range: leave it alone.
                    continue;
                }
                return Ok((slot, lock));
            }
            Err((_, Errno::EWOULDBLOCK)) => continue,
            Err((_, e)) => return Err(format!("lock {}: {e}", path.display())),
        }
    }
    Err(format!("all {SLOTS} network slots under {LOCK_DIR} are taken"))
}

/// Namespaces and links named for `slot`: only a run that held its lock made them, and that
/// run is gone.
fn remove_leftovers(slot: u8) {
    let ns_prefix = format!("hf-s{slot}-");
    for ns in list_namespaces() {
        if ns.strip_prefix(&ns_prefix).is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit())) {
            eprintln!("netns: removing namespace {ns} left by a dead run");
            ip(&["netns", "delete", &ns]);
        }
    }
    let link_prefix = format!("hfs{slot}n");
    for link in list_links() {
        if link.strip_prefix(&link_prefix).is_some_and(|rest| rest.ends_with('h') || rest.ends_with('a')) {
            eprintln!("netns: removing link {link} left by a dead run");
            ip(&["link", "delete", &link]);
        }
    }
}

/// Whether an address of `10.231.<slot>.0/24` is configured in the host namespace.
fn address_in_use(slot: u8) -> bool {
    let out = Command::new("ip").args(["-o", "-4", "addr", "show"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let needle = format!(" 10.231.{slot}.");
    out.map(|text| text.contains(&needle)).unwrap_or(true)
}

fn make_node(n: &NodeNet) -> Result<(), String> {
    let host_cidr = format!("{}/30", n.host_ip);
    let node_cidr = format!("{}/30", n.ip);
    let gateway = n.host_ip.to_string();
    let steps: [&[&str]; 8] = [
        &["netns", "add", &n.ns],
        &["link", "add", &n.host_link, "type", "veth", "peer", "name", &n.node_link, "netns", &n.ns],
        &["addr", "add", &host_cidr, "dev", &n.host_link],
        &["link", "set", &n.host_link, "up"],
        &["-n", &n.ns, "link", "set", "lo", "up"],
        &["-n", &n.ns, "addr", "add", &node_cidr, "dev", &n.node_link],
        &["-n", &n.ns, "link", "set", &n.node_link, "up"],
        &["-n", &n.ns, "route", "add", "default", "via", &gateway],
    ];
    for args in steps {
        ip_checked(args)?;
    }
    Ok(())
}

fn remove_node(n: &NodeNet) {
    // The namespace's end of the pair goes with the namespace and takes its peer along; the
    // explicit delete covers a pair whose far end never made it into the namespace.
    if list_namespaces().contains(&n.ns) {
        ip(&["netns", "delete", &n.ns]);
    }
    if list_links().contains(&n.host_link) {
        ip(&["link", "delete", &n.host_link]);
    }
}

/// The names `ip netns list` shows.
pub fn list_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
}

/// The link names of the host namespace.
pub fn list_links() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "link", "show"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    // "4: hfs0n0h@if2: <…": the name, without the peer's index.
    text.lines().filter_map(|l| l.split(": ").nth(1)).map(|name| name.split('@').next().unwrap_or(name).to_owned()).collect()
}

fn ip(args: &[&str]) -> bool {
    ip_checked(args).map_err(|e| eprintln!("netns: {e}")).is_ok()
}

fn ip_checked(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}: {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// Set in the child that plays a run killed before its Drop.
    const HOLDER_ENV: &str = "HOLDFAST_NETNS_TEST_HOLDER";

    fn run_in(n: &NodeNet, program: &str, args: &[&str]) -> std::process::Output {
        n.command(program).args(args).stdin(Stdio::null()).output().expect("run nsenter")
    }

    #[test]
    fn namespaces_are_reachable_both_ways_and_removed() {
        let net = Net::new(2).expect("make namespaces");
        let (a, b) = (net.node(0).clone(), net.node(1).clone());
        assert_ne!(a.ip, b.ip);
        assert!(list_namespaces().contains(&a.ns) && list_namespaces().contains(&b.ns));

        // The node has its own address and none of the host's links.
        let out = run_in(&a, "ip", &["-o", "-4", "addr", "show"]);
        let addrs = String::from_utf8_lossy(&out.stdout);
        assert!(addrs.contains(&format!("{}/30", a.ip)), "{addrs}");
        assert!(!addrs.contains(&a.host_link) && !addrs.contains("eth0"), "host links seen in the namespace: {addrs}");

        // Node → host: node b reaches the host's listener on node a's gateway address (through
        // its default route, not its own pair's address), and the host sees b's address.
        let listener = TcpListener::bind((net.host_ip(), 0)).expect("bind on the host side");
        let port = listener.local_addr().unwrap().port();
        let accept = std::thread::spawn(move || {
            let (mut s, peer) = listener.accept().expect("accept");
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            (peer.ip(), text)
        });
        let script = format!("exec 3<>/dev/tcp/{}/{port} && printf hello >&3", net.host_ip());
        let out = run_in(&b, "bash", &["-c", &script]);
        assert!(out.status.success(), "connect from the namespace: {}", String::from_utf8_lossy(&out.stderr));
        let (peer, text) = accept.join().unwrap();
        assert_eq!((peer, text.as_str()), (std::net::IpAddr::V4(b.ip), "hello"));

        // Host → node: a listener inside node a, on a's address, answers the host namespace.
        let code = format!(
            "import socket\ns=socket.socket()\ns.bind(('{}',7002))\ns.listen()\nprint('up',flush=True)\nc,_=s.accept()\nc.sendall(b'pong')",
            a.ip
        );
        let mut server = a.command("python3").args(["-c", &code]).stdout(Stdio::piped()).spawn().expect("spawn python3");
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "up");
        let mut s = TcpStream::connect_timeout(&(a.ip, 7002).into(), Duration::from_secs(5)).expect("connect to the node");
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert_eq!(text, "pong");
        let _ = server.wait();
        // Not reachable from the host's loopback: the port is the namespace's own.
        assert!(TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, 7002).into(), Duration::from_millis(200)).is_err());

        drop(net);
        let (nss, links) = (list_namespaces(), list_links());
        for n in [&a, &b] {
            assert!(!nss.contains(&n.ns), "namespace {} left behind", n.ns);
            assert!(!links.contains(&n.host_link), "link {} left behind", n.host_link);
        }
    }

    #[test]
    fn parallel_sets_never_share_names_or_addresses() {
        let one = Net::new(1).expect("first set");
        let two = Net::new(1).expect("second set");
        assert_ne!(one.slot(), two.slot());
        assert_ne!(one.node(0).ns, two.node(0).ns);
        assert_ne!(one.node(0).ip, two.node(0).ip);
        assert_ne!(one.node(0).host_link, two.node(0).host_link);
    }

    #[test]
    fn a_panicking_test_still_removes_its_namespaces() {
        let payload = std::thread::spawn(|| {
            let net = Net::new(1).expect("make a namespace");
            std::panic::panic_any(net.node(0).ns.clone());
        })
        .join()
        .expect_err("the thread panicked");
        let name = payload.downcast_ref::<String>().expect("the namespace's name").clone();
        assert!(!list_namespaces().contains(&name), "namespace {name} survived the panic");
    }

    /// Plays a test run killed before its Drop: makes a namespace, says which, and waits to be
    /// killed. Runs only as the child of the test below.
    #[test]
    #[ignore = "the child process of leftovers_of_a_killed_run_are_removed_when_its_slot_is_taken_again"]
    fn holder_killed_before_its_drop() {
        if std::env::var_os(HOLDER_ENV).is_none() {
            return;
        }
        let net = Net::new(1).expect("make a namespace");
        println!("HOLDING {} {} {}", net.slot(), net.node(0).ns, net.node(0).host_link);
        std::thread::sleep(Duration::from_secs(120));
    }

    /// The holder's test path in whichever binary includes this module.
    fn holder_test_name() -> &'static str {
        let full = concat!(module_path!(), "::holder_killed_before_its_drop");
        full.split_once("::").map_or(full, |(_crate, path)| path)
    }

    #[test]
    fn leftovers_of_a_killed_run_are_removed_when_its_slot_is_taken_again() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", holder_test_name(), "--ignored", "--nocapture", "--test-threads=1"])
            .env(HOLDER_ENV, "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the holder");
        let mut holding = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.split("HOLDING ").nth(1) {
                holding = Some(rest.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let holding = holding.expect("the holder made a namespace");
        let (slot, ns, link) = (holding[0].parse::<u8>().unwrap(), &holding[1], &holding[2]);
        assert!(list_namespaces().contains(ns), "the killed run left its namespace (the case under test)");

        // The kernel released the dead run's lock; taking the slot clears what it left, and
        // only that.
        let lock = File::options().write(true).open(Path::new(LOCK_DIR).join(format!("slot-{slot}.lock"))).unwrap();
        let _held = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).expect("a dead holder's lock is free");
        remove_leftovers(slot);
        assert!(!list_namespaces().contains(ns), "stale namespace {ns} not removed");
        assert!(!list_links().contains(link), "stale link {link} not removed");
    }
}
