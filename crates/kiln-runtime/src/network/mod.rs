//! Per-sandbox network namespaces, veth pairs, NAT and egress policy.
//!
//! Every sandbox gets a slot `n`: a netns `<prefix>-s<n>` holding `eth0` (sandbox_ip, a /30 out
//! of the subnet) whose peer `<prefix>-h<n>` on the host carries host_ip, the default gateway.
//! One nft table (`inet kiln` by default) enforces the isolation rules; see `docs/network.md`.
//!
//! A few slots are kept ready ahead ([`NetworkConfig::spare_slots`]): their netns, veth pair
//! and addresses exist, but no rules, so no traffic passes. An acquire takes one and only adds
//! its rules; a background thread makes new ones. A released slot loses its rules, gets its
//! addresses back (gVisor's netstack takes them off `eth0`) and becomes a spare again, at the
//! back of the queue, so a just-freed address is reused last.

mod cmd;
mod config;
mod error;
mod nft;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

pub use config::{EgressPolicy, GUEST_IFNAME, NETNS_DIR, NetworkConfig, Slot};
pub use error::NetworkError;

use config::Layout;

/// Owns the slots of one subnet and the nft table guarding them.
pub struct NetworkManager {
    layout: Layout,
    /// Active slots and their policies; also the index allocator.
    slots: Mutex<Slots>,
    /// Serializes nft transactions (each is atomic, but ordering between threads matters for
    /// table recreation versus per-slot changes).
    nft_lock: Mutex<()>,
    /// A thread is making spare slots.
    refilling: AtomicBool,
    /// Set by [`shutdown`](Self::shutdown): no more spares are made.
    closed: AtomicBool,
}

struct Slots {
    active: BTreeMap<u32, EgressPolicy>,
    /// Ready slots, oldest first.
    spare: VecDeque<u32>,
    /// Indices being made into spares right now.
    making: HashSet<u32>,
    /// Where the next search for a free index starts. Round-robin, so a just-released index
    /// (whose conntrack entries may linger) is not handed out again immediately.
    next: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data that is still consistent enough.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NetworkManager {
    /// Creates (replaces) the nft table, enables ip_forward, and removes stale netns/veths of
    /// this prefix left by a crashed earlier run.
    pub fn init(cfg: NetworkConfig) -> Result<Arc<Self>, NetworkError> {
        Self::adopt(cfg, &HashMap::new())
    }

    /// Like [`init`](Self::init) but keeps the slots in `in_use` (index → policy) alive, for
    /// crash recovery of running sandboxes, and sweeps only the others. A kept slot whose
    /// netns or veth is missing is recreated.
    pub fn adopt(
        cfg: NetworkConfig,
        in_use: &HashMap<u32, EgressPolicy>,
    ) -> Result<Arc<Self>, NetworkError> {
        let started = Instant::now();
        let dns_upstream = match cfg.dns_upstream {
            Some(ip) => Some(ip),
            None => {
                let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                let found = config::first_ipv4_nameserver(&text);
                if found.is_none() {
                    tracing::warn!(
                        "no IPv4 nameserver in /etc/resolv.conf: sandboxes get no DNS forwarding"
                    );
                }
                found
            }
        };
        let egress = match &cfg.egress_interface {
            Some(i) => Some(i.clone()),
            None => {
                let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
                let found = config::default_route_interface(&text);
                if found.is_none() {
                    tracing::warn!(
                        "no IPv4 default route: masquerading out of every non-sandbox interface"
                    );
                }
                found
            }
        };
        let layout = Layout::new(&cfg, dns_upstream, egress)?;
        for &index in in_use.keys() {
            layout.check_index(index)?;
        }

        let mgr = NetworkManager {
            layout,
            slots: Mutex::new(Slots {
                active: in_use.iter().map(|(i, p)| (*i, p.clone())).collect(),
                spare: VecDeque::new(),
                making: HashSet::new(),
                next: in_use.keys().max().map_or(0, |m| m + 1),
            }),
            nft_lock: Mutex::new(()),
            refilling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        };
        let keep: HashSet<u32> = in_use.keys().copied().collect();
        mgr.sweep(&keep)?;
        mgr.check_subnet_is_free()?;

        let mut adopted: Vec<(u32, &EgressPolicy)> = in_use.iter().map(|(i, p)| (*i, p)).collect();
        adopted.sort_by_key(|(i, _)| *i);
        for (index, _) in &adopted {
            if !mgr.links_exist(*index) {
                tracing::warn!(index, "adopted network slot is incomplete; recreating it");
                mgr.teardown_links(*index)?;
                mgr.create_links(*index)?;
            } else {
                mgr.host_veth_sysctls(*index)?;
            }
        }
        {
            let _nft = lock(&mgr.nft_lock);
            cmd::nft(
                &nft::table_script(&mgr.layout, &adopted),
                &format!("creating nft table inet {}", mgr.layout.table),
            )?;
        }
        // Only now that the rules are in place may the host start forwarding.
        cmd::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        tracing::info!(
            subnet = %mgr.layout.subnet,
            dns = %mgr.layout.dns_ip,
            upstream = ?mgr.layout.dns_upstream,
            egress = ?mgr.layout.egress_interface,
            table = %mgr.layout.table,
            adopted = adopted.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "network manager ready"
        );
        let mgr = Arc::new(mgr);
        mgr.refill();
        Ok(mgr)
    }

    /// Address sandboxes use as their resolver (`nameserver` in their resolv.conf).
    pub fn dns_address(&self) -> Ipv4Addr {
        self.layout.dns_ip
    }

    /// The deterministic slot description for `index` (e.g. to rebuild an adopted slot).
    pub fn slot(&self, index: u32) -> Result<Slot, NetworkError> {
        self.layout.check_index(index)?;
        Ok(self.layout.slot(index))
    }

    /// Indices currently in use, ascending.
    pub fn active_slots(&self) -> Vec<u32> {
        lock(&self.slots).active.keys().copied().collect()
    }

    /// Slots kept ready for the next acquires, oldest first.
    pub fn spare_slots(&self) -> Vec<Slot> {
        let spare: Vec<u32> = lock(&self.slots).spare.iter().copied().collect();
        spare.into_iter().map(|i| self.layout.slot(i)).collect()
    }

    /// A free index (neither in use, spare, nor being made), reserved with `reserve`.
    fn take_free_index(
        &self,
        slots: &mut Slots,
        reserve: impl FnOnce(&mut Slots, u32),
    ) -> Result<u32, NetworkError> {
        let max = self.layout.max_slots;
        let start = slots.next % max;
        let index = (0..max)
            .map(|i| (start + i) % max)
            .find(|i| {
                !slots.active.contains_key(i)
                    && !slots.making.contains(i)
                    && !slots.spare.contains(i)
            })
            .ok_or(NetworkError::Exhausted(max))?;
        reserve(slots, index);
        slots.next = (index + 1) % max;
        Ok(index)
    }

    /// A slot for a sandbox: a spare one when there is one (only its egress rules are added),
    /// else a new netns with a veth pair, addresses, default route via the host side, loopback
    /// up, and the rules. Either way the guest side is configured and ready for runsc.
    pub fn acquire(self: &Arc<Self>, policy: &EgressPolicy) -> Result<Slot, NetworkError> {
        let started = Instant::now();
        let (index, spare) = {
            let mut slots = lock(&self.slots);
            match slots.spare.pop_front() {
                Some(index) => {
                    slots.active.insert(index, policy.clone());
                    (index, true)
                }
                None => {
                    let policy = policy.clone();
                    let index = self.take_free_index(&mut slots, move |s, i| {
                        s.active.insert(i, policy);
                    })?;
                    (index, false)
                }
            }
        };
        let made = if spare {
            self.refill();
            Ok(())
        } else {
            self.fresh_links(index)
        };
        match made.and_then(|()| self.add_rules(index, policy)) {
            Ok(()) => {
                tracing::debug!(
                    index,
                    spare,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "network slot acquired"
                );
                Ok(self.layout.slot(index))
            }
            Err(err) => {
                tracing::warn!(index, %err, "preparing network slot failed; cleaning up");
                if let Err(cleanup) = self.destroy_slot(index) {
                    // Keep the index reserved: its leftovers would collide with a new slot.
                    tracing::error!(index, %cleanup, "cleanup of failed slot failed");
                } else {
                    lock(&self.slots).active.remove(&index);
                }
                Err(err)
            }
        }
    }

    /// Creates the slot's netns and veth pair, first removing whatever a crash left of them.
    fn fresh_links(&self, index: u32) -> Result<(), NetworkError> {
        if self.links_exist_any(index) {
            tracing::warn!(
                index,
                "stale network objects for a free slot; removing them"
            );
            self.teardown_links(index)?;
        }
        self.create_links(index)
    }

    /// The slot's chain and map entry: from now on its traffic passes by `policy`.
    fn add_rules(&self, index: u32, policy: &EgressPolicy) -> Result<(), NetworkError> {
        let _nft = lock(&self.nft_lock);
        cmd::nft(
            &nft::slot_script(&self.layout, index, policy),
            &format!("adding nft rules of slot {index}"),
        )
    }

    /// (Re)puts the guest address, loopback and default route inside the netns (idempotent).
    /// runsc's netstack takes the address off `eth0`, so this runs before every run/restore.
    pub fn prepare(&self, slot: &Slot) -> Result<(), NetworkError> {
        self.layout.check_index(slot.index)?;
        self.configure_guest(slot.index)
    }

    /// Changes the slot's egress policy in place (one atomic nft transaction).
    pub fn apply_policy(&self, slot: &Slot, policy: &EgressPolicy) -> Result<(), NetworkError> {
        let index = slot.index;
        let mut slots = lock(&self.slots);
        let current = slots
            .active
            .get_mut(&index)
            .ok_or(NetworkError::UnknownSlot(index))?;
        {
            let _nft = lock(&self.nft_lock);
            cmd::nft(
                &nft::slot_script(&self.layout, index, policy),
                &format!("changing nft rules of slot {index}"),
            )?;
        }
        *current = policy.clone();
        tracing::debug!(index, ?policy, "egress policy applied");
        Ok(())
    }

    /// Removes the slot's rules and makes it the newest spare (addresses restored); when that
    /// makes one spare too many, the oldest is deleted. Without spares, its netns and veth are
    /// deleted and the index is free. Idempotent.
    pub fn release(&self, index: u32) -> Result<(), NetworkError> {
        self.layout.check_index(index)?;
        let started = Instant::now();
        let reuse = self.layout.spare_slots > 0
            && !self.closed.load(Ordering::SeqCst)
            && lock(&self.slots).active.contains_key(&index);
        // Whoever gets this address next must not inherit its flows.
        cmd::flush_conntrack(self.layout.slot(index).sandbox_ip);
        if reuse {
            let reused = {
                let _nft = lock(&self.nft_lock);
                cmd::nft(
                    &nft::slot_remove_script(&self.layout, index),
                    &format!("removing nft rules of slot {index}"),
                )
            }
            .and_then(|()| {
                if self.links_exist(index) {
                    self.configure_guest(index)
                } else {
                    Err(NetworkError::UnknownSlot(index))
                }
            });
            match reused {
                Ok(()) => {
                    let extra = {
                        let mut slots = lock(&self.slots);
                        slots.active.remove(&index);
                        slots.spare.push_back(index);
                        let have = (slots.spare.len() + slots.making.len()) as u32;
                        let extra = (have > self.layout.spare_slots)
                            .then(|| slots.spare.pop_front())
                            .flatten();
                        // Reserved while it is deleted, so no acquire builds on top of it.
                        if let Some(extra) = extra {
                            slots.making.insert(extra);
                        }
                        extra
                    };
                    if let Some(extra) = extra {
                        if let Err(err) = self.teardown_links(extra) {
                            tracing::warn!(index = extra, %err, "deleting a surplus spare slot failed");
                        }
                        lock(&self.slots).making.remove(&extra);
                    }
                    tracing::debug!(
                        index,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "network slot released as a spare"
                    );
                    return Ok(());
                }
                Err(err) => tracing::warn!(index, %err, "cannot reuse the slot; deleting it"),
            }
        }
        self.destroy_slot(index)?;
        lock(&self.slots).active.remove(&index);
        tracing::debug!(
            index,
            elapsed_us = started.elapsed().as_micros() as u64,
            "network slot released"
        );
        Ok(())
    }

    /// Makes spare slots in the background until there are `spare_slots` of them.
    fn refill(self: &Arc<Self>) {
        if self.layout.spare_slots == 0
            || self.closed.load(Ordering::SeqCst)
            || self.refilling.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let mgr = self.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-net-spares".into())
            .spawn(move || {
                loop {
                    let index = {
                        let mut slots = lock(&mgr.slots);
                        let have = (slots.spare.len() + slots.making.len()) as u32;
                        if have >= mgr.layout.spare_slots || mgr.closed.load(Ordering::SeqCst) {
                            None
                        } else {
                            mgr.take_free_index(&mut slots, |s, i| {
                                s.making.insert(i);
                            })
                            .ok()
                        }
                    };
                    let Some(index) = index else { break };
                    let made = mgr.fresh_links(index);
                    let mut slots = lock(&mgr.slots);
                    slots.making.remove(&index);
                    match made {
                        Ok(()) if !mgr.closed.load(Ordering::SeqCst) => {
                            slots.spare.push_back(index);
                        }
                        Ok(()) => {
                            drop(slots);
                            let _ = mgr.teardown_links(index);
                        }
                        Err(err) => {
                            drop(slots);
                            tracing::warn!(index, %err, "making a spare network slot failed");
                            let _ = mgr.teardown_links(index);
                            break;
                        }
                    }
                }
                mgr.refilling.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.refilling.store(false, Ordering::SeqCst);
        }
    }

    /// Removes the whole nft table and every slot of this prefix (tests, `kiln serve` shutdown).
    /// ip_forward is left on: other software on the host may rely on it.
    pub fn shutdown(&self) -> Result<(), NetworkError> {
        self.closed.store(true, Ordering::SeqCst);
        // A spare being made right now must not outlive the sweep.
        let waited = Instant::now();
        while self.refilling.load(Ordering::SeqCst) && waited.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut slots = lock(&self.slots);
        let _nft = lock(&self.nft_lock);
        cmd::nft(
            &nft::delete_table_script(&self.layout),
            &format!("deleting nft table inet {}", self.layout.table),
        )?;
        self.sweep(&HashSet::new())?;
        slots.active.clear();
        slots.spare.clear();
        tracing::info!(table = %self.layout.table, "network manager shut down");
        Ok(())
    }

    fn destroy_slot(&self, index: u32) -> Result<(), NetworkError> {
        // Rules first: once the veth is gone a stale map entry could never match anyway, but
        // removing the rules first keeps the order symmetrical with creation.
        {
            let _nft = lock(&self.nft_lock);
            cmd::nft(
                &nft::slot_remove_script(&self.layout, index),
                &format!("removing nft rules of slot {index}"),
            )?;
        }
        self.teardown_links(index)
    }

    /// Host side: netns, veth pair with the guest end moved into the netns, host address.
    /// Guest side: a second `ip -batch` run inside the netns (addresses are flushed when an
    /// interface changes namespace, so they cannot be set before the move).
    fn create_links(&self, index: u32) -> Result<(), NetworkError> {
        let l = &self.layout;
        let ns = l.netns_name(index);
        let veth = l.host_veth(index);
        let slot = l.slot(index);
        let script = format!(
            "netns add {ns}\n\
             link add {veth} address {hmac} type veth peer name {GUEST_IFNAME} address {gmac} netns {ns}\n\
             addr add {host}/30 dev {veth}\n\
             link set {veth} up\n",
            hmac = l.host_mac(index),
            gmac = slot.mac,
            host = slot.host_ip,
        );
        cmd::ip_batch(
            None,
            false,
            &script,
            &format!("creating netns/veth of slot {index}"),
        )?;
        self.host_veth_sysctls(index)?;
        self.configure_guest(index)
    }

    fn host_veth_sysctls(&self, index: u32) -> Result<(), NetworkError> {
        let veth = self.layout.host_veth(index);
        // No IPv6 on the host side: sandboxes are IPv4-only and the input hook drops v6 anyway.
        cmd::write_sysctl(&format!("/proc/sys/net/ipv6/conf/{veth}/disable_ipv6"), "1")?;
        if self.layout.dns_upstream.is_some_and(|u| u.is_loopback()) {
            // A DNAT to 127.x from a non-loopback interface is a martian unless route_localnet is
            // on. The input hook still drops everything else addressed to 127/8 from sandboxes.
            cmd::write_sysctl(
                &format!("/proc/sys/net/ipv4/conf/{veth}/route_localnet"),
                "1",
            )?;
        }
        Ok(())
    }

    fn configure_guest(&self, index: u32) -> Result<(), NetworkError> {
        let slot = self.layout.slot(index);
        let script = format!(
            "link set lo up\n\
             addr replace {ip}/{len} dev {GUEST_IFNAME}\n\
             link set {GUEST_IFNAME} up\n\
             route replace default via {gw} dev {GUEST_IFNAME}\n",
            ip = slot.sandbox_ip,
            len = slot.prefix_len,
            gw = slot.gateway,
        );
        cmd::ip_batch(
            Some(&slot.netns_name),
            false,
            &script,
            &format!("configuring {GUEST_IFNAME} in netns {}", slot.netns_name),
        )
    }

    fn netns_exists(&self, index: u32) -> bool {
        Path::new(NETNS_DIR)
            .join(self.layout.netns_name(index))
            .exists()
    }

    fn veth_exists(&self, index: u32) -> bool {
        Path::new("/sys/class/net")
            .join(self.layout.host_veth(index))
            .exists()
    }

    fn links_exist(&self, index: u32) -> bool {
        self.netns_exists(index) && self.veth_exists(index)
    }

    fn links_exist_any(&self, index: u32) -> bool {
        self.netns_exists(index) || self.veth_exists(index)
    }

    /// Deletes the host veth (which takes its peer along) and the netns, whichever exist.
    fn teardown_links(&self, index: u32) -> Result<(), NetworkError> {
        let mut script = String::new();
        if self.veth_exists(index) {
            // Explicitly: a netns still pinned by a process would keep the pair alive.
            let _ = writeln!(script, "link del {}", self.layout.host_veth(index));
        }
        if self.netns_exists(index) {
            let _ = writeln!(script, "netns del {}", self.layout.netns_name(index));
        }
        if script.is_empty() {
            return Ok(());
        }
        let res = cmd::ip_batch(
            None,
            false,
            &script,
            &format!("deleting netns/veth of slot {index}"),
        );
        // A concurrent release of the same index may have won the race: gone is gone.
        if res.is_err() && !self.links_exist_any(index) {
            return Ok(());
        }
        res
    }

    /// Fails when an interface that is not one of ours has an address in our subnet (e.g.
    /// another Kiln node, or leftovers of one, with another prefix): packets to sandboxes would
    /// go astray, which otherwise shows up only as sandboxes that never answer.
    fn check_subnet_is_free(&self) -> Result<(), NetworkError> {
        let out = std::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show"])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| NetworkError::io("running ip -4 addr show", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            // `3: eth0    inet 10.0.0.5/24 brd … scope global eth0`
            let mut words = line.split_whitespace();
            let Some(ifname) = words.nth(1) else { continue };
            let ifname = ifname.split('@').next().unwrap_or(ifname);
            let Some(addr) = words
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if self.layout.subnet.contains(&addr) && self.layout.parse_host_veth(ifname).is_none() {
                return Err(NetworkError::Config(format!(
                    "subnet {} is already in use on this host: {ifname} has {addr} (another Kiln \
                     node, or its leftovers, with another interface prefix?); choose another subnet",
                    self.layout.subnet
                )));
            }
        }
        Ok(())
    }

    /// Deletes every netns and host veth of this prefix whose index is not in `keep`.
    fn sweep(&self, keep: &HashSet<u32>) -> Result<(), NetworkError> {
        let mut script = String::new();
        let mut stale = 0usize;
        for (dir, is_netns) in [("/sys/class/net", false), (NETNS_DIR, true)] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let index = if is_netns {
                    self.layout.parse_netns(&name)
                } else {
                    self.layout.parse_host_veth(&name)
                };
                if let Some(index) = index
                    && !keep.contains(&index)
                {
                    stale += 1;
                    let verb = if is_netns { "netns del" } else { "link del" };
                    let _ = writeln!(script, "{verb} {name}");
                }
            }
        }
        if stale == 0 {
            return Ok(());
        }
        tracing::info!(stale, prefix = %self.layout.prefix, "removing stale netns/veths");
        // -force: a veth that vanished with its netns in the meantime must not stop the rest.
        let res = cmd::ip_batch(None, true, &script, "removing stale netns/veths");
        if let Err(err) = res {
            // Whatever is really left over is what counts.
            let left: Vec<String> = script
                .lines()
                .filter_map(|l| l.rsplit(' ').next())
                .filter(|name| {
                    Path::new("/sys/class/net").join(name).exists()
                        || (self.layout.parse_netns(name).is_some()
                            && Path::new(NETNS_DIR).join(name).exists())
                })
                .map(str::to_string)
                .collect();
            if !left.is_empty() {
                tracing::error!(?left, "stale network objects could not be removed");
                return Err(err);
            }
        }
        Ok(())
    }
}
