//! Root-only tests of the per-sandbox network rules (`cargo test -p kiln-runtime --test root_network`).
//!
//! A "sandbox" is plain Linux sockets opened inside the slot's netns (a thread that `setns`es),
//! which the rules treat exactly like a gVisor sandbox. "Outside hosts" are extra netns created
//! here with their own veths. Traffic only goes to loopback or into namespaces created by these
//! tests. Every test uses table `kilntest`, prefix `kt` and 10.213.0.0/16, so a running Kiln
//! (table `kiln`, prefix `kiln`, 10.11.0.0/16) is not disturbed. Tests share the table, so they
//! are serialized with a static mutex. Without root they print a note and pass.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::ops::Deref;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_runtime::network::{EgressPolicy, NetworkConfig, NetworkManager, Slot};

static SERIAL: Mutex<()> = Mutex::new(());

const TABLE: &str = "kilntest";
const PREFIX: &str = "kt";
const SUBNET: &str = "10.213.0.0/16";
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 255, 254);
/// A loopback upstream that no real resolver uses.
const LOOPBACK_UPSTREAM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 77);
/// Blocked connections are dropped silently, so they fail by timing out.
const BLOCKED_TIMEOUT: Duration = Duration::from_millis(700);
const OK_TIMEOUT: Duration = Duration::from_secs(3);

fn serial() -> Option<MutexGuard<'static, ()>> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: this test needs root (netns, veth, nftables)");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

fn config(upstream: Ipv4Addr, egress: Option<&str>) -> NetworkConfig {
    NetworkConfig {
        subnet: SUBNET.parse().unwrap(),
        dns_upstream: Some(upstream),
        table_name: TABLE.into(),
        name_prefix: PREFIX.into(),
        egress_interface: egress.map(str::to_string),
        // Exact make/delete per slot here; spares have a test of their own.
        spare_slots: 0,
    }
}

/// Shuts the manager down (table + every `kt-*` netns/veth) even when the test fails.
struct Mgr(Arc<NetworkManager>);

impl Mgr {
    fn init(upstream: Ipv4Addr, egress: Option<&str>) -> Mgr {
        Mgr(NetworkManager::init(config(upstream, egress)).expect("init"))
    }
}

impl Deref for Mgr {
    type Target = Arc<NetworkManager>;
    fn deref(&self) -> &Arc<NetworkManager> {
        &self.0
    }
}

impl Drop for Mgr {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("shutdown failed: {e}");
        }
    }
}

fn ip(args: &str) -> std::process::Output {
    Command::new("ip")
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .expect("run ip")
}

fn ip_ok(args: &str) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nft_out(args: &str) -> (bool, String) {
    let out = Command::new("nft")
        .args(args.split_whitespace())
        .output()
        .expect("run nft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/var/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Names of our prefix still present anywhere (netns, host links).
fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    for dir in ["/var/run/netns", "/sys/class/net"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("kt-s") || n.starts_with("kt-h") {
                    left.push(n);
                }
            }
        }
    }
    left
}

/// Runs `f` on a fresh thread that has entered netns `ns` (or stays in the host netns).
/// Sockets created there stay in that netns even when used from other threads.
fn in_netns<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.map(|n| format!("/var/run/netns/{n}"));
    std::thread::spawn(move || {
        if let Some(path) = path {
            let file = File::open(&path).expect("open netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A TCP server answering every connection with `hello <peer>` and recording the peers.
struct Server {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: Option<&str>, addr: SocketAddrV4) -> Server {
        let listener = in_netns(ns, move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {ns:?}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (stop2, peers2) = (stop.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        peers2.lock().unwrap().push(peer);
                        let _ = s.write_all(format!("hello {peer}").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            peers,
            thread: Some(thread),
        }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from netns `ns` and returns the server's greeting.
fn connect(ns: Option<&str>, addr: SocketAddrV4, timeout: Duration) -> std::io::Result<String> {
    let stream = in_netns(ns, move || {
        TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout)
    })?;
    let mut stream = stream;
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf)?;
    Ok(buf)
}

fn assert_reach(ns: Option<&str>, addr: SocketAddrV4, what: &str) -> String {
    match connect(ns, addr, OK_TIMEOUT) {
        Ok(greeting) if greeting.starts_with("hello") => greeting,
        other => panic!("{what}: expected {ns:?} → {addr} to work, got {other:?}"),
    }
}

fn assert_blocked(ns: Option<&str>, addr: SocketAddrV4, what: &str) {
    if let Ok(greeting) = connect(ns, addr, BLOCKED_TIMEOUT) {
        panic!("{what}: expected {ns:?} → {addr} to be blocked, but got {greeting:?}");
    }
}

/// A UDP responder answering `answer:<query>`; the DNS stand-in.
struct Udp {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl Udp {
    fn start(ns: Option<&str>, addr: SocketAddrV4) -> Udp {
        let sock = in_netns(ns, move || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (stop2, peers2) = (stop.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    peers2.lock().unwrap().push(peer);
                    let mut reply = b"answer:".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        Udp {
            stop,
            peers,
            thread: Some(thread),
        }
    }
}

impl Drop for Udp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends a UDP query from `ns`; returns the reply and the address it came from.
fn udp_query(
    ns: &str,
    to: SocketAddrV4,
    timeout: Duration,
) -> std::io::Result<(String, SocketAddr)> {
    let sock = in_netns(Some(ns), || UdpSocket::bind("0.0.0.0:0"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(b"example.org?", to)?;
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// A fake outside host: netns `ktx-<name>` owning `addr` on its `eth0`, reached from the host
/// through veth `ktx<name>` which carries `host_side`. Removed on drop.
struct FakeHost {
    ns: String,
    veth: String,
}

impl FakeHost {
    fn new(name: &str, host_side: &str, addr: &str) -> FakeHost {
        let ns = format!("ktx-{name}");
        let veth = format!("ktx{name}");
        // Leftovers of an aborted earlier run.
        let _ = ip(&format!("link del {veth}"));
        let _ = ip(&format!("netns del {ns}"));
        let host = FakeHost { ns, veth };
        let (ns, veth) = (&host.ns, &host.veth);
        ip_ok(&format!("netns add {ns}"));
        ip_ok(&format!(
            "link add {veth} type veth peer name eth0 netns {ns}"
        ));
        ip_ok(&format!("addr add {host_side} dev {veth}"));
        ip_ok(&format!("link set {veth} up"));
        ip_ok(&format!("-n {ns} link set lo up"));
        ip_ok(&format!("-n {ns} addr add {addr} dev eth0"));
        ip_ok(&format!("-n {ns} link set eth0 up"));
        let gw = host_side.split('/').next().unwrap();
        ip_ok(&format!("-n {ns} route add default via {gw} dev eth0"));
        host
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = ip(&format!("link del {}", self.veth));
        let _ = ip(&format!("netns del {}", self.ns));
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn host_addresses() -> Vec<Ipv4Addr> {
    let out = ip("-4 -o addr show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let cidr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            cidr.split('/').next()?.parse().ok()
        })
        .collect()
}

#[test]
fn root_host_reaches_sandbox_but_sandbox_cannot_reach_host() {
    let Some(_serial) = serial() else { return };
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    let slot = mgr.acquire(&EgressPolicy::default()).unwrap();
    let ns = Some(slot.netns_name.as_str());

    // Host → sandbox (the runtime talking to envd).
    let envd = Server::start(ns, sa(slot.sandbox_ip, 49983));
    assert_reach(None, sa(slot.sandbox_ip, 49983), "host → envd");
    assert_eq!(envd.peers()[0].ip(), slot.host_ip);

    // Sandbox → host services on every host address, incl. the gateway address.
    let host_srv = Server::start(None, sa(Ipv4Addr::UNSPECIFIED, 18081));
    assert_reach(None, sa(Ipv4Addr::LOCALHOST, 18081), "host listener works");
    assert_blocked(ns, sa(slot.host_ip, 18081), "sandbox → gateway address");
    for addr in host_addresses() {
        if !addr.is_loopback()
            && !"10.213.0.0/16"
                .parse::<ipnet::Ipv4Net>()
                .unwrap()
                .contains(&addr)
        {
            assert_blocked(ns, sa(addr, 18081), "sandbox → other host address");
        }
    }
    assert!(host_srv.peers().iter().all(|p| p.ip().is_loopback()));

    // Sandbox → the host's loopback: route_localnet is on for the loopback DNS upstream, so a
    // sandbox that routes 127.0.0.1 to its gateway gets its packets to the host's input hook.
    let lo_srv = Server::start(None, sa(Ipv4Addr::LOCALHOST, 18082));
    let n = &slot.netns_name;
    in_netns(ns, || {
        std::fs::write("/proc/sys/net/ipv4/conf/eth0/route_localnet", "1").unwrap();
        std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1").unwrap();
    });
    ip_ok(&format!("-n {n} rule add pref 1000 lookup local"));
    ip_ok(&format!("-n {n} rule del pref 0"));
    ip_ok(&format!(
        "-n {n} rule add pref 10 to 127.0.0.1/32 lookup 100"
    ));
    ip_ok(&format!(
        "-n {n} route add 127.0.0.1/32 via {} dev eth0 src {} table 100",
        slot.host_ip, slot.sandbox_ip
    ));
    let (_, before) = nft_out(&format!("list chain inet {TABLE} sandbox_to_host"));
    assert_blocked(
        ns,
        sa(Ipv4Addr::LOCALHOST, 18082),
        "sandbox → host loopback",
    );
    let (_, after) = nft_out(&format!("list chain inet {TABLE} sandbox_to_host"));
    assert_ne!(
        before, after,
        "the drop counter should have seen the packets"
    );
    assert!(lo_srv.peers().is_empty());

    mgr.release(slot.index).unwrap();
}

#[test]
fn root_sandboxes_cannot_reach_each_other() {
    let Some(_serial) = serial() else { return };
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    let a = mgr.acquire(&EgressPolicy::default()).unwrap();
    let b = mgr.acquire(&EgressPolicy::default()).unwrap();
    assert_ne!(a.index, b.index);
    let b_srv = Server::start(Some(&b.netns_name), sa(b.sandbox_ip, 8080));
    assert_reach(None, sa(b.sandbox_ip, 8080), "host → B");
    assert_blocked(Some(&a.netns_name), sa(b.sandbox_ip, 8080), "A → B");
    // Not even when A's policy allows all of 10/8.
    let open = EgressPolicy {
        internet: true,
        allow_out: vec!["10.0.0.0/8".parse().unwrap(), "0.0.0.0/0".parse().unwrap()],
        deny_out: vec![],
    };
    mgr.apply_policy(&a, &open).unwrap();
    assert_blocked(
        Some(&a.netns_name),
        sa(b.sandbox_ip, 8080),
        "A → B with allow_out",
    );
    assert_blocked(Some(&a.netns_name), sa(b.host_ip, 8080), "A → B's gateway");
    assert_eq!(b_srv.peers().len(), 1);
}

#[test]
fn root_private_ranges_blocked_unless_allowed() {
    let Some(_serial) = serial() else { return };
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    let private = FakeHost::new("priv", "10.99.0.2/24", "10.99.0.1/24");
    let meta = FakeHost::new("meta", "169.254.169.253/30", "169.254.169.254/30");
    let cgnat = FakeHost::new("cgn", "100.64.7.2/24", "100.64.7.1/24");
    let priv_srv = Server::start(Some(&private.ns), sa(Ipv4Addr::new(10, 99, 0, 1), 8080));
    let meta_srv = Server::start(Some(&meta.ns), sa(Ipv4Addr::new(169, 254, 169, 254), 80));
    let _cgn_srv = Server::start(Some(&cgnat.ns), sa(Ipv4Addr::new(100, 64, 7, 1), 8080));
    // The fake hosts themselves work.
    assert_reach(
        None,
        sa(Ipv4Addr::new(10, 99, 0, 1), 8080),
        "host → fake private host",
    );
    assert_reach(
        None,
        sa(Ipv4Addr::new(169, 254, 169, 254), 80),
        "host → fake metadata",
    );
    assert_reach(
        None,
        sa(Ipv4Addr::new(100, 64, 7, 1), 8080),
        "host → fake cgnat host",
    );

    let slot = mgr.acquire(&EgressPolicy::default()).unwrap();
    let ns = Some(slot.netns_name.as_str());
    assert_blocked(
        ns,
        sa(Ipv4Addr::new(10, 99, 0, 1), 8080),
        "sandbox → 10.99.0.1",
    );
    assert_blocked(
        ns,
        sa(Ipv4Addr::new(169, 254, 169, 254), 80),
        "sandbox → metadata",
    );
    assert_blocked(
        ns,
        sa(Ipv4Addr::new(100, 64, 7, 1), 8080),
        "sandbox → 100.64/10",
    );

    let allow = EgressPolicy {
        internet: true,
        allow_out: vec!["10.99.0.0/24".parse().unwrap()],
        deny_out: vec!["10.0.0.0/8".parse().unwrap()],
    };
    mgr.apply_policy(&slot, &allow).unwrap();
    let greeting = assert_reach(ns, sa(Ipv4Addr::new(10, 99, 0, 1), 8080), "allow_out wins");
    assert!(
        greeting.contains(&slot.sandbox_ip.to_string()),
        "no NAT towards non-egress interfaces: {greeting}"
    );
    assert_blocked(
        ns,
        sa(Ipv4Addr::new(169, 254, 169, 254), 80),
        "metadata still blocked",
    );
    assert_eq!(
        meta_srv.peers().len(),
        1,
        "only the host's own probe reached metadata"
    );

    // Back to the default: blocked again, also for new connections right away.
    mgr.apply_policy(&slot, &EgressPolicy::default()).unwrap();
    assert_blocked(ns, sa(Ipv4Addr::new(10, 99, 0, 1), 8080), "policy reverted");
    assert_eq!(priv_srv.peers().len(), 2);
}

#[test]
fn root_internet_policy_and_masquerade() {
    let Some(_serial) = serial() else { return };
    // A documentation-range "internet" host behind its own veth, used as the egress interface
    // so that masquerading is observable.
    let net = FakeHost::new("net", "198.51.100.2/24", "198.51.100.1/24");
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, Some(&net.veth));
    let srv = Server::start(Some(&net.ns), sa(Ipv4Addr::new(198, 51, 100, 1), 8080));
    let target = sa(Ipv4Addr::new(198, 51, 100, 1), 8080);

    let slot = mgr.acquire(&EgressPolicy::default()).unwrap();
    let ns = Some(slot.netns_name.as_str());
    let greeting = assert_reach(ns, target, "internet: true");
    assert!(
        greeting.starts_with("hello 198.51.100.2:"),
        "masqueraded: {greeting}"
    );

    let deny = EgressPolicy {
        internet: true,
        allow_out: vec![],
        deny_out: vec!["198.51.100.0/25".parse().unwrap()],
    };
    mgr.apply_policy(&slot, &deny).unwrap();
    assert_blocked(ns, target, "deny_out");

    let offline = EgressPolicy {
        internet: false,
        ..Default::default()
    };
    mgr.apply_policy(&slot, &offline).unwrap();
    assert_blocked(ns, target, "internet: false");

    let offline_but = EgressPolicy {
        internet: false,
        allow_out: vec!["198.51.100.1/32".parse().unwrap()],
        deny_out: vec!["198.51.100.0/24".parse().unwrap()],
    };
    mgr.apply_policy(&slot, &offline_but).unwrap();
    assert_reach(ns, target, "internet: false + allow_out");

    // A second sandbox acquired with internet: false from the start.
    let other = mgr.acquire(&offline).unwrap();
    assert_blocked(Some(&other.netns_name), target, "acquired offline");
    assert_eq!(srv.peers().len(), 2);
}

#[test]
fn root_dns_is_dnated_to_loopback_upstream() {
    let Some(_serial) = serial() else { return };
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    assert_eq!(mgr.dns_address(), DNS_IP);
    let udp = Udp::start(None, sa(LOOPBACK_UPSTREAM, 53));
    let tcp = Server::start(None, sa(LOOPBACK_UPSTREAM, 53));
    let offline = EgressPolicy {
        internet: false,
        ..Default::default()
    };
    let slot = mgr.acquire(&offline).unwrap();
    let ns = slot.netns_name.as_str();

    let (answer, from) = udp_query(ns, sa(DNS_IP, 53), OK_TIMEOUT).expect("udp dns");
    assert_eq!(answer, "answer:example.org?");
    assert_eq!(
        from,
        SocketAddr::V4(sa(DNS_IP, 53)),
        "reply comes from the DNS address"
    );
    assert_eq!(udp.peers.lock().unwrap()[0].ip(), slot.sandbox_ip);

    assert_reach(Some(ns), sa(DNS_IP, 53), "tcp dns");
    assert_eq!(tcp.peers()[0].ip(), slot.sandbox_ip);

    // Other ports of the DNS address are not served, and the upstream itself is not reachable.
    let other_port = Server::start(None, sa(LOOPBACK_UPSTREAM, 54));
    assert_blocked(Some(ns), sa(slot.host_ip, 53), "DNS on the gateway address");
    assert!(other_port.peers().is_empty());
}

#[test]
fn root_dns_is_dnated_to_remote_upstream() {
    let Some(_serial) = serial() else { return };
    let resolver = FakeHost::new("dns", "10.98.0.2/24", "10.98.0.1/24");
    let upstream = Ipv4Addr::new(10, 98, 0, 1);
    let udp = Udp::start(Some(&resolver.ns), sa(upstream, 53));
    let mgr = Mgr::init(upstream, None);
    let offline = EgressPolicy {
        internet: false,
        ..Default::default()
    };
    let slot = mgr.acquire(&offline).unwrap();
    let ns = slot.netns_name.as_str();
    let (answer, from) = udp_query(ns, sa(DNS_IP, 53), OK_TIMEOUT).expect("udp dns");
    assert_eq!(answer, "answer:example.org?");
    assert_eq!(from, SocketAddr::V4(sa(DNS_IP, 53)));
    // Direct to the (private) upstream, bypassing the DNAT: blocked.
    assert!(udp_query(ns, sa(upstream, 53), BLOCKED_TIMEOUT).is_err());
    assert_eq!(udp.peers.lock().unwrap().len(), 1);
}

#[test]
fn root_prepare_restores_guest_address() {
    let Some(_serial) = serial() else { return };
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    let slot = mgr.acquire(&EgressPolicy::default()).unwrap();
    // What runsc's netstack does: the kernel interface loses its address (and routes).
    ip_ok(&format!("-n {} addr flush dev eth0", slot.netns_name));
    let bind = in_netns(Some(&slot.netns_name), move || {
        TcpListener::bind(sa(slot.sandbox_ip, 8080))
    });
    assert!(bind.is_err(), "address should be gone");
    mgr.prepare(&slot).unwrap();
    mgr.prepare(&slot).unwrap(); // idempotent
    let out = ip(&format!("-n {} route show default", slot.netns_name));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("via {}", slot.host_ip)));
    let _srv = Server::start(Some(&slot.netns_name), sa(slot.sandbox_ip, 8080));
    assert_reach(
        None,
        sa(slot.sandbox_ip, 8080),
        "host → sandbox after prepare",
    );
}

#[test]
fn root_release_removes_netns_veth_and_chain() {
    let Some(_serial) = serial() else { return };
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    let slot: Slot = mgr.acquire(&EgressPolicy::default()).unwrap();
    let veth = format!("kt-h{:05}", slot.index);
    let chain = format!("sbx-{:05}", slot.index);
    assert_eq!(slot.netns_name, format!("kt-s{:05}", slot.index));
    assert!(slot.netns_path.exists());
    assert!(link_exists(&veth));
    assert!(nft_out(&format!("list chain inet {TABLE} {chain}")).0);
    assert!(
        nft_out(&format!("list map inet {TABLE} slots"))
            .1
            .contains(&veth)
    );

    mgr.release(slot.index).unwrap();
    assert!(!netns_exists(&slot.netns_name));
    assert!(!link_exists(&veth));
    assert!(!nft_out(&format!("list chain inet {TABLE} {chain}")).0);
    assert!(
        !nft_out(&format!("list map inet {TABLE} slots"))
            .1
            .contains(&veth)
    );
    assert!(mgr.active_slots().is_empty());
    mgr.release(slot.index).unwrap(); // idempotent

    mgr.shutdown().unwrap();
    assert!(!nft_out(&format!("list table inet {TABLE}")).0);
}

#[test]
fn root_init_sweeps_leftovers_and_adopt_keeps_slots() {
    let Some(_serial) = serial() else { return };
    let unrelated = FakeHost::new("keep", "10.97.0.2/24", "10.97.0.1/24");
    // A "crashed" manager: no shutdown.
    let crashed = NetworkManager::init(config(LOOPBACK_UPSTREAM, None)).unwrap();
    let s0 = crashed.acquire(&EgressPolicy::default()).unwrap();
    let s1 = crashed.acquire(&EgressPolicy::default()).unwrap();
    let s2 = crashed.acquire(&EgressPolicy::default()).unwrap();
    drop(crashed);
    ip_ok("netns add kt-s00042");
    ip_ok("link add kt-h00043 type veth peer name kt-tmp0");

    let kept_policy = EgressPolicy {
        internet: false,
        ..Default::default()
    };
    let in_use = HashMap::from([(s1.index, kept_policy.clone())]);
    let mgr = Mgr(NetworkManager::adopt(config(LOOPBACK_UPSTREAM, None), &in_use).unwrap());
    assert_eq!(mgr.active_slots(), vec![s1.index]);
    assert!(!netns_exists(&s0.netns_name) && !netns_exists(&s2.netns_name));
    assert!(netns_exists(&s1.netns_name));
    assert!(!netns_exists("kt-s00042") && !link_exists("kt-h00043") && !link_exists("kt-tmp0"));
    assert!(netns_exists(&unrelated.ns) && link_exists(&unrelated.veth));
    let (ok, chain) = nft_out(&format!("list chain inet {TABLE} sbx-{:05}", s1.index));
    assert!(ok && chain.contains("counter"), "{chain}");
    let _srv = Server::start(Some(&s1.netns_name), sa(s1.sandbox_ip, 8080));
    assert_reach(
        None,
        sa(s1.sandbox_ip, 8080),
        "adopted slot still reachable",
    );
    assert_eq!(mgr.slot(s1.index).unwrap(), s1);
    // New slots never collide with the adopted one.
    let fresh = mgr.acquire(&EgressPolicy::default()).unwrap();
    assert_ne!(fresh.index, s1.index);
    drop(_srv);

    // A plain init sweeps everything of the prefix.
    drop(mgr);
    let crashed = NetworkManager::init(config(LOOPBACK_UPSTREAM, None)).unwrap();
    crashed.acquire(&EgressPolicy::default()).unwrap();
    drop(crashed);
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    assert!(leftovers().is_empty(), "{:?}", leftovers());
    assert!(mgr.active_slots().is_empty());
}

#[test]
fn root_concurrent_acquire_release_leaves_nothing() {
    let Some(_serial) = serial() else { return };
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    let held = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let timings = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..5)
        .map(|t| {
            let (mgr, held, timings) = (mgr.0.clone(), held.clone(), timings.clone());
            std::thread::spawn(move || {
                for i in 0..10 {
                    let policy = EgressPolicy {
                        internet: (t + i) % 2 == 0,
                        ..Default::default()
                    };
                    let started = Instant::now();
                    let slot = mgr.acquire(&policy).expect("acquire");
                    timings.lock().unwrap().push(started.elapsed());
                    assert!(
                        held.lock().unwrap().insert(slot.index),
                        "index handed out twice"
                    );
                    assert!(slot.netns_path.exists());
                    held.lock().unwrap().remove(&slot.index);
                    mgr.release(slot.index).expect("release");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker panicked");
    }
    assert!(mgr.active_slots().is_empty());
    assert!(leftovers().is_empty(), "{:?}", leftovers());
    let (_, table) = nft_out(&format!("list table inet {TABLE}"));
    assert!(!table.contains("sbx-"), "{table}");
    assert!(!table.contains("kt-h0"), "{table}");
    let mut t = timings.lock().unwrap().clone();
    t.sort();
    eprintln!(
        "concurrent acquire (5 threads): median {:?}, max {:?}",
        t[t.len() / 2],
        t[t.len() - 1]
    );
}

#[test]
fn root_spare_slots_are_ready_and_reused() {
    let Some(_serial) = serial() else { return };
    let mut cfg = config(LOOPBACK_UPSTREAM, None);
    cfg.spare_slots = 2;
    let mgr = Mgr(NetworkManager::init(cfg).expect("init"));
    let wait_spares = |n: usize| {
        let started = Instant::now();
        while mgr.spare_slots().len() < n {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "spares never made"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_spares(2);
    let spares: Vec<u32> = mgr.spare_slots().iter().map(|s| s.index).collect();
    for slot in mgr.spare_slots() {
        assert!(netns_exists(&slot.netns_name), "{}", slot.netns_name);
        // Ready, but no rules yet: nothing passes.
        let (_, table) = nft_out(&format!("list table inet {TABLE}"));
        assert!(
            !table.contains(&format!("sbx-{:05}", slot.index)),
            "{table}"
        );
    }

    // An acquire hands out the oldest spare, configured and with its rules.
    let slot = mgr.acquire(&EgressPolicy::default()).unwrap();
    assert_eq!(slot.index, spares[0]);
    let ns = Some(slot.netns_name.as_str());
    let _envd = Server::start(ns, sa(slot.sandbox_ip, 49983));
    assert_reach(
        None,
        sa(slot.sandbox_ip, 49983),
        "host → sandbox in a spare slot",
    );
    let (_, table) = nft_out(&format!("list table inet {TABLE}"));
    assert!(table.contains(&format!("sbx-{:05}", slot.index)), "{table}");
    drop(_envd);
    // The pool is topped up in the background.
    wait_spares(2);
    assert_eq!(mgr.active_slots(), vec![slot.index]);

    // gVisor takes the address off eth0; a released slot gets it back and
    // becomes the newest spare, losing its rules and its tracked flows (the
    // host's connection above); the oldest spare goes.
    let flows = |ip: Ipv4Addr| {
        let out = Command::new("conntrack")
            .args(["-L", "--orig-dst", &ip.to_string()])
            .output()
            .expect("conntrack (package conntrack)");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert!(
        flows(slot.sandbox_ip) > 0,
        "the host's connection is tracked"
    );
    ip_ok(&format!("-n {} addr flush dev eth0", slot.netns_name));
    let oldest = mgr.spare_slots()[0].clone();
    mgr.release(slot.index).unwrap();
    assert_eq!(
        flows(slot.sandbox_ip),
        0,
        "a reused address inherits no flows"
    );
    assert!(mgr.active_slots().is_empty());
    let spare: Vec<u32> = mgr.spare_slots().iter().map(|s| s.index).collect();
    assert_eq!(spare.len(), 2, "{spare:?}");
    assert_eq!(spare.last(), Some(&slot.index), "{spare:?}");
    assert!(
        !netns_exists(&oldest.netns_name),
        "the surplus spare is deleted"
    );
    let (_, table) = nft_out(&format!("list table inet {TABLE}"));
    assert!(
        !table.contains(&format!("sbx-{:05}", slot.index)),
        "{table}"
    );

    // Handed out again, its address is back.
    let mut taken = Vec::new();
    let again = loop {
        let s = mgr.acquire(&EgressPolicy::default()).unwrap();
        if s.index == slot.index {
            break s;
        }
        taken.push(s.index);
        assert!(taken.len() < 10, "the reused slot never came back");
    };
    let _srv = Server::start(Some(&again.netns_name), sa(again.sandbox_ip, 49983));
    assert_reach(None, sa(again.sandbox_ip, 49983), "host → reused slot");
    drop(_srv);

    // Shutdown removes spares with everything else.
    mgr.0.shutdown().unwrap();
    assert!(leftovers().is_empty(), "{:?}", leftovers());
}

#[test]
fn root_acquire_and_release() {
    let Some(_serial) = serial() else { return };
    let mgr = Mgr::init(LOOPBACK_UPSTREAM, None);
    let mut acquire = Vec::new();
    let mut release = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let slot = mgr.acquire(&EgressPolicy::default()).unwrap();
        acquire.push(started.elapsed());
        let started = Instant::now();
        mgr.prepare(&slot).unwrap();
        let prep = started.elapsed();
        let started = Instant::now();
        mgr.release(slot.index).unwrap();
        release.push(started.elapsed());
        eprintln!("prepare {prep:?}");
    }
    acquire.sort();
    release.sort();
    // Figures only: timing is a benchmark's job on a shared machine.
    eprintln!(
        "sequential acquire median {:?} (min {:?}, max {:?}); release median {:?}",
        acquire[5], acquire[0], acquire[9], release[5]
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());
}

#[test]
fn root_init_refuses_a_subnet_in_use() {
    let Some(_serial) = serial() else { return };
    // Someone else's interface with an address in our subnet.
    let _ = ip("link del ktdummy0");
    ip_ok("link add ktdummy0 type veth peer name ktdummy1");
    ip_ok("addr add 10.213.77.1/32 dev ktdummy0");
    let res = NetworkManager::init(config(LOOPBACK_UPSTREAM, None));
    ip_ok("link del ktdummy0");
    let err = match res {
        Ok(mgr) => {
            let _ = mgr.shutdown();
            panic!("init accepted a subnet in use");
        }
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("already in use") && err.contains("ktdummy0"),
        "{err}"
    );
}
