//! Rendering of the nftables scripts. Pure string building, so it is unit-testable without root.
//!
//! Layout of `table inet <table>`:
//! - `prerouting` (nat): DNS to `dns_ip:53` (udp/tcp) from a sandbox veth is DNATed to the upstream.
//! - `postrouting` (nat): masquerade of the sandbox subnet out of the egress interface.
//! - `input` (filter): everything from a sandbox veth to the host is dropped, except replies
//!   to host-initiated connections and DNATed DNS to a loopback upstream.
//! - `forward` (filter): sandbox→sandbox dropped, then `iifname vmap @slots` jumps to the
//!   slot's own chain `sbx-<n>`; a veth without an entry is dropped. Nothing is forwarded *into*
//!   a sandbox except replies.
//! - `sbx-<n>`: anti-spoofing, IPv6 drop, DNS accept, allow_out, deny_out, private ranges,
//!   internet yes/no. It is evaluated for every packet (not only `ct state new`), so a policy
//!   change also cuts flows that are already established.

use std::fmt::Write;
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

use super::config::{EgressPolicy, Layout};

/// Destinations a sandbox may not reach unless they are in its `allow_out`.
pub(crate) const BLOCKED_RANGES: &[&str] = &[
    "0.0.0.0/8",      // "this" network
    "10.0.0.0/8",     // RFC 1918
    "100.64.0.0/10",  // carrier-grade NAT
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local, incl. cloud metadata 169.254.169.254
    "172.16.0.0/12",  // RFC 1918
    "192.0.0.0/24",   // IETF protocol assignments
    "192.168.0.0/16", // RFC 1918
    "198.18.0.0/15",  // benchmarking
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved + limited broadcast
];

/// Renders an anonymous nft set of merged IPv4 prefixes, or `None` when empty.
fn v4_set(nets: impl IntoIterator<Item = Ipv4Net>) -> Option<String> {
    let nets: Vec<Ipv4Net> = nets.into_iter().map(|n| n.trunc()).collect();
    // Overlapping elements are rejected by nft in interval sets, so merge them first.
    let merged = Ipv4Net::aggregate(&nets);
    if merged.is_empty() {
        return None;
    }
    let items: Vec<String> = merged.iter().map(ToString::to_string).collect();
    Some(format!("{{ {} }}", items.join(", ")))
}

fn v4_only(nets: &[IpNet]) -> impl Iterator<Item = Ipv4Net> + '_ {
    nets.iter().filter_map(|n| match n {
        IpNet::V4(v4) => Some(*v4),
        // IPv6 never leaves a sandbox, so v6 entries have nothing to allow or deny.
        IpNet::V6(_) => None,
    })
}

fn blocked(layout: &Layout) -> Vec<Ipv4Net> {
    BLOCKED_RANGES
        .iter()
        .map(|s| s.parse().expect("valid constant range"))
        .chain(std::iter::once(layout.subnet))
        .collect()
}

fn dns_match(dns_ip: Ipv4Addr) -> String {
    format!("meta l4proto {{ tcp, udp }} th dport 53 ct status dnat ct original ip daddr {dns_ip}")
}

/// Atomically (re)creates the table with the given slots already present.
pub(crate) fn table_script(layout: &Layout, slots: &[(u32, &EgressPolicy)]) -> String {
    let t = &layout.table;
    let veths = layout.veth_glob();
    let subnet = layout.subnet;
    let dns = layout.dns_ip;
    let mut s = String::new();
    // `add` + `delete` makes the delete succeed whether or not the table existed.
    let _ = writeln!(s, "add table inet {t}");
    let _ = writeln!(s, "delete table inet {t}");
    let _ = writeln!(s, "table inet {t} {{");
    let _ = writeln!(s, "  map slots {{ type ifname : verdict; }}");

    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;"
    );
    if let Some(up) = layout.dns_upstream {
        let _ = writeln!(
            s,
            "    iifname \"{veths}\" ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {up}"
        );
    }
    let _ = writeln!(s, "  }}");

    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;"
    );
    match &layout.egress_interface {
        Some(ifname) => {
            let _ = writeln!(
                s,
                "    ip saddr {subnet} ip daddr != {subnet} oifname \"{ifname}\" masquerade"
            );
        }
        None => {
            let _ = writeln!(
                s,
                "    ip saddr {subnet} ip daddr != {subnet} oifname != \"{veths}\" masquerade"
            );
        }
    }
    let _ = writeln!(s, "  }}");

    let _ = writeln!(
        s,
        "  chain input {{\n    type filter hook input priority filter; policy accept;"
    );
    let _ = writeln!(s, "    iifname \"{veths}\" jump sandbox_to_host");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain sandbox_to_host {{");
    // Replies to connections the host opened (runtime → envd, proxy → exposed port).
    let _ = writeln!(s, "    ct state established,related accept");
    // Only reachable with a loopback upstream (route_localnet): the DNATed DNS query itself.
    let _ = writeln!(s, "    ip saddr {subnet} {} accept", dns_match(dns));
    let _ = writeln!(s, "    counter drop");
    let _ = writeln!(s, "  }}");

    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
    );
    // Sandbox to sandbox: never, whatever allow_out says.
    let _ = writeln!(
        s,
        "    iifname \"{veths}\" oifname \"{veths}\" counter drop"
    );
    let _ = writeln!(s, "    iifname \"{veths}\" iifname vmap @slots");
    let _ = writeln!(s, "    iifname \"{veths}\" counter drop");
    let _ = writeln!(
        s,
        "    oifname \"{veths}\" ct state established,related accept"
    );
    let _ = writeln!(s, "    oifname \"{veths}\" counter drop");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");

    for (index, policy) in slots {
        s.push_str(&slot_script(layout, *index, policy));
    }
    s
}

/// Creates or replaces the slot's chain and its map entry.
pub(crate) fn slot_script(layout: &Layout, index: u32, policy: &EgressPolicy) -> String {
    let t = &layout.table;
    let chain = layout.chain(index);
    let veth = layout.host_veth(index);
    let sandbox_ip = layout.sandbox_ip(index);
    let mut s = String::new();
    let _ = writeln!(s, "add chain inet {t} {chain}");
    let _ = writeln!(s, "flush chain inet {t} {chain}");
    let rule = |s: &mut String, r: &str| {
        let _ = writeln!(s, "add rule inet {t} {chain} {r}");
    };
    rule(&mut s, "meta nfproto != ipv4 counter drop");
    rule(&mut s, &format!("ip saddr != {sandbox_ip} counter drop"));
    rule(&mut s, &format!("{} accept", dns_match(layout.dns_ip)));
    if let Some(set) = v4_set(v4_only(&policy.allow_out)) {
        rule(&mut s, &format!("ip daddr {set} accept"));
    }
    if let Some(set) = v4_set(v4_only(&policy.deny_out)) {
        rule(&mut s, &format!("ip daddr {set} counter drop"));
    }
    let blocked = v4_set(blocked(layout)).expect("non-empty");
    rule(&mut s, &format!("ip daddr {blocked} counter drop"));
    rule(
        &mut s,
        if policy.internet {
            "accept"
        } else {
            "counter drop"
        },
    );
    let _ = writeln!(
        s,
        "add element inet {t} slots {{ \"{veth}\" : jump {chain} }}"
    );
    s
}

/// Removes the slot's map entry and chain; succeeds whether or not they exist.
pub(crate) fn slot_remove_script(layout: &Layout, index: u32) -> String {
    let t = &layout.table;
    let chain = layout.chain(index);
    let veth = layout.host_veth(index);
    format!(
        "add chain inet {t} {chain}\n\
         flush chain inet {t} {chain}\n\
         add element inet {t} slots {{ \"{veth}\" : jump {chain} }}\n\
         delete element inet {t} slots {{ \"{veth}\" }}\n\
         delete chain inet {t} {chain}\n"
    )
}

/// Deletes the table whether or not it exists.
pub(crate) fn delete_table_script(layout: &Layout) -> String {
    let t = &layout.table;
    format!("add table inet {t}\ndelete table inet {t}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::NetworkConfig;

    fn layout() -> Layout {
        Layout::new(
            &NetworkConfig::default(),
            Some(Ipv4Addr::new(127, 0, 0, 53)),
            Some("eth0".into()),
        )
        .unwrap()
    }

    #[test]
    fn table_has_dnat_masquerade_and_guards() {
        let s = table_script(&layout(), &[]);
        assert!(s.contains("iifname \"kiln-h*\" ip daddr 10.11.255.254 meta l4proto { tcp, udp } th dport 53 dnat ip to 127.0.0.53"));
        assert!(s.contains(
            "ip saddr 10.11.0.0/16 ip daddr != 10.11.0.0/16 oifname \"eth0\" masquerade"
        ));
        assert!(s.contains("iifname \"kiln-h*\" oifname \"kiln-h*\" counter drop"));
        assert!(s.contains("iifname \"kiln-h*\" iifname vmap @slots"));
        assert!(s.starts_with("add table inet kiln\ndelete table inet kiln\n"));
    }

    #[test]
    fn slot_chain_orders_allow_before_deny_before_private() {
        let policy = EgressPolicy {
            internet: false,
            allow_out: vec![
                "10.99.0.0/24".parse().unwrap(),
                "10.99.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            deny_out: vec!["8.8.8.8/32".parse().unwrap()],
        };
        let s = slot_script(&layout(), 3, &policy);
        let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in {s}"));
        let spoof = pos("ip saddr != 10.11.0.14 counter drop");
        let dns = pos("ct original ip daddr 10.11.255.254 accept");
        let allow = pos("ip daddr { 10.99.0.0/16 } accept");
        let deny = pos("ip daddr { 8.8.8.8/32 } counter drop");
        let private = pos("169.254.0.0/16");
        let last = pos("add rule inet kiln sbx-00003 counter drop\n");
        assert!(spoof < dns && dns < allow && allow < deny && deny < private && private < last);
        assert!(!s.contains("fd00"));
        // The subnet itself is inside 10/8 here, so aggregation folds it in.
        assert!(!s.contains("10.11.0.0/16"));
        assert!(s.ends_with("add element inet kiln slots { \"kiln-h00003\" : jump sbx-00003 }\n"));
    }

    #[test]
    fn subnet_outside_private_ranges_is_still_blocked() {
        let cfg = NetworkConfig {
            subnet: "203.0.113.0/24".parse().unwrap(),
            ..Default::default()
        };
        let l = Layout::new(&cfg, None, None).unwrap();
        let s = slot_script(&l, 0, &EgressPolicy::default());
        assert!(s.contains("203.0.113.0/24"));
        assert!(s.contains("add rule inet kiln sbx-00000 accept\n"));
        let t = table_script(&l, &[]);
        assert!(!t.contains("dnat ip to"));
        assert!(t.contains("oifname != \"kiln-h*\" masquerade"));
    }

    #[test]
    fn remove_is_idempotent_by_construction() {
        let s = slot_remove_script(&layout(), 7);
        assert!(s.starts_with("add chain inet kiln sbx-00007\n"));
        assert!(s.ends_with("delete chain inet kiln sbx-00007\n"));
    }
}
