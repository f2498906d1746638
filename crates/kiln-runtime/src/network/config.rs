//! Configuration, policy and the deterministic slot layout (addresses, names, MACs).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use super::NetworkError;

/// Where netns created by `ip netns add` are bind-mounted.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Name of the sandbox-side veth inside every slot's netns.
pub const GUEST_IFNAME: &str = "eth0";

/// Digits of the zero-padded slot index in names: fixed-length names avoid prefix ambiguities.
const INDEX_DIGITS: usize = 5;
const MAX_INDEX_BY_NAME: u32 = 99_999;
/// IFNAMSIZ is 16 including the NUL: `<prefix>-h<5 digits>` must fit in 15 bytes.
const MAX_PREFIX_LEN: usize = 15 - 2 - INDEX_DIGITS;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NetworkConfig {
    /// Address pool; every slot takes one /30 and the last /30 is reserved for DNS.
    pub subnet: Ipv4Net,
    /// Resolver that sandbox DNS (to the last address of `subnet`, port 53) is DNATed to.
    /// `None`: the first IPv4 nameserver in the host's /etc/resolv.conf.
    pub dns_upstream: Option<Ipv4Addr>,
    /// nft table (family inet) owned exclusively by this manager.
    pub table_name: String,
    /// Prefix of netns (`<prefix>-s00042`) and host veth (`<prefix>-h00042`) names; at most 8
    /// characters of `[a-z0-9]`.
    pub name_prefix: String,
    /// Interface that sandbox traffic is masqueraded out of. `None`: the interface of the
    /// host's IPv4 default route at init time, or every non-sandbox interface if there is none.
    pub egress_interface: Option<String>,
    /// Slots kept ready ahead (netns, veth and addresses made; no sandbox yet), so that an
    /// acquire only adds the slot's rules. Released slots are reused for them.
    pub spare_slots: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            subnet: "10.11.0.0/16".parse().expect("valid default subnet"),
            dns_upstream: None,
            table_name: "kiln".to_string(),
            name_prefix: "kiln".to_string(),
            egress_interface: None,
            spare_slots: 4,
        }
    }
}

/// What a sandbox may reach. DNS through the platform resolver is always allowed.
/// Order of precedence: `allow_out` > `deny_out` > private-range block > `internet`.
/// Sandbox-to-sandbox and sandbox-to-host traffic is blocked regardless.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct EgressPolicy {
    pub internet: bool,
    pub allow_out: Vec<IpNet>,
    pub deny_out: Vec<IpNet>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
        }
    }
}

/// One sandbox's network: a netns with `eth0` (sandbox_ip/30) whose peer on the host is
/// `host_ip`, the default gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub netns_name: String,
    pub netns_path: PathBuf,
    pub host_ip: Ipv4Addr,
    pub sandbox_ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
}

/// A validated config with everything derived from it.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub subnet: Ipv4Net,
    pub dns_ip: Ipv4Addr,
    pub dns_upstream: Option<Ipv4Addr>,
    pub table: String,
    pub prefix: String,
    pub egress_interface: Option<String>,
    /// Number of usable slots: indices `0..max_slots`.
    pub max_slots: u32,
    pub spare_slots: u32,
}

impl Layout {
    pub fn new(
        cfg: &NetworkConfig,
        dns_upstream: Option<Ipv4Addr>,
        egress_interface: Option<String>,
    ) -> Result<Layout, NetworkError> {
        let subnet = cfg.subnet.trunc();
        if subnet.prefix_len() > 29 {
            return Err(NetworkError::Config(format!(
                "subnet {subnet} is too small: it needs room for at least one /30 slot plus the DNS /30"
            )));
        }
        let prefix = &cfg.name_prefix;
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_LEN
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(NetworkError::Config(format!(
                "name prefix {prefix:?} must be 1..={MAX_PREFIX_LEN} characters of [a-z0-9]"
            )));
        }
        let table = &cfg.table_name;
        if table.is_empty()
            || table.len() > 64
            || !table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(NetworkError::Config(format!(
                "nft table name {table:?} must be 1..=64 characters of [A-Za-z0-9_-]"
            )));
        }
        if let Some(ifname) = &egress_interface
            && (ifname.is_empty()
                || ifname.len() > 15
                || !ifname
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            return Err(NetworkError::Config(format!(
                "bad egress interface name {ifname:?}"
            )));
        }
        if let Some(up) = dns_upstream
            && subnet.contains(&up)
        {
            return Err(NetworkError::Config(format!(
                "DNS upstream {up} lies inside the sandbox subnet {subnet}"
            )));
        }
        let size = 1u64 << (32 - subnet.prefix_len());
        // The last /30 holds the DNS address, so it is never handed out.
        let by_subnet = (size / 4 - 1).min(u64::from(MAX_INDEX_BY_NAME) + 1) as u32;
        let dns_ip = Ipv4Addr::from(u32::from(subnet.broadcast()) - 1);
        Ok(Layout {
            subnet,
            dns_ip,
            dns_upstream,
            table: table.clone(),
            prefix: prefix.clone(),
            egress_interface,
            max_slots: by_subnet,
            spare_slots: cfg.spare_slots,
        })
    }

    pub fn check_index(&self, index: u32) -> Result<(), NetworkError> {
        if index >= self.max_slots {
            return Err(NetworkError::OutOfRange {
                index,
                max: self.max_slots,
            });
        }
        Ok(())
    }

    fn base(&self, index: u32) -> u32 {
        u32::from(self.subnet.network()) + 4 * index
    }

    pub fn host_ip(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base(index) + 1)
    }

    pub fn sandbox_ip(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base(index) + 2)
    }

    pub fn netns_name(&self, index: u32) -> String {
        format!("{}-s{index:0w$}", self.prefix, w = INDEX_DIGITS)
    }

    pub fn host_veth(&self, index: u32) -> String {
        format!("{}-h{index:0w$}", self.prefix, w = INDEX_DIGITS)
    }

    pub fn chain(&self, index: u32) -> String {
        format!("sbx-{index:0w$}", w = INDEX_DIGITS)
    }

    /// Wildcard matching every host-side veth of this manager (nft `iifname` syntax).
    pub fn veth_glob(&self) -> String {
        format!("{}-h*", self.prefix)
    }

    /// Parses a netns name of this layout back into its index.
    pub fn parse_netns(&self, name: &str) -> Option<u32> {
        parse_indexed(name, &self.prefix, 's')
    }

    /// Parses a host veth name of this layout back into its index.
    pub fn parse_host_veth(&self, name: &str) -> Option<u32> {
        parse_indexed(name, &self.prefix, 'h')
    }

    pub fn slot(&self, index: u32) -> Slot {
        let netns_name = self.netns_name(index);
        Slot {
            index,
            netns_path: Path::new(NETNS_DIR).join(&netns_name),
            netns_name,
            host_ip: self.host_ip(index),
            sandbox_ip: self.sandbox_ip(index),
            prefix_len: 30,
            gateway: self.host_ip(index),
            mac: mac(0x6e, index),
        }
    }

    pub fn host_mac(&self, index: u32) -> String {
        mac(0x68, index)
    }
}

/// Locally administered unicast MAC `02:6b:<kind>:<index as 24 bits>`; 0x6b = 'k'.
fn mac(kind: u8, index: u32) -> String {
    let [_, a, b, c] = index.to_be_bytes();
    format!("02:6b:{kind:02x}:{a:02x}:{b:02x}:{c:02x}")
}

fn parse_indexed(name: &str, prefix: &str, kind: char) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let digits = rest.strip_prefix(kind)?;
    if digits.len() != INDEX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// First IPv4 `nameserver` of a resolv.conf text.
pub(crate) fn first_ipv4_nameserver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf.lines().find_map(|line| {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<Ipv4Addr>().ok())
            .flatten()
    })
}

/// Interface of the IPv4 default route according to a /proc/net/route text.
pub(crate) fn default_route_interface(proc_net_route: &str) -> Option<String> {
    proc_net_route.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        (cols.len() >= 8 && cols[1] == "00000000" && cols[7] == "00000000")
            .then(|| cols[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(&NetworkConfig::default(), None, None).unwrap()
    }

    #[test]
    fn addressing_is_one_slash30_per_slot() {
        let l = layout();
        assert_eq!(l.max_slots, 16383);
        assert_eq!(l.dns_ip, Ipv4Addr::new(10, 11, 255, 254));
        let s = l.slot(0);
        assert_eq!(s.host_ip, Ipv4Addr::new(10, 11, 0, 1));
        assert_eq!(s.sandbox_ip, Ipv4Addr::new(10, 11, 0, 2));
        assert_eq!(s.gateway, s.host_ip);
        let s = l.slot(16382);
        assert_eq!(s.host_ip, Ipv4Addr::new(10, 11, 255, 249));
        assert_eq!(s.sandbox_ip, Ipv4Addr::new(10, 11, 255, 250));
        assert!(l.check_index(16382).is_ok());
        assert!(l.check_index(16383).is_err());
    }

    #[test]
    fn names_are_fixed_length_and_parse_back() {
        let l = layout();
        let s = l.slot(42);
        assert_eq!(s.netns_name, "kiln-s00042");
        assert_eq!(s.netns_path, PathBuf::from("/var/run/netns/kiln-s00042"));
        assert_eq!(l.host_veth(42), "kiln-h00042");
        assert_eq!(l.chain(42), "sbx-00042");
        assert_eq!(l.parse_netns("kiln-s00042"), Some(42));
        assert_eq!(l.parse_host_veth("kiln-h16382"), Some(16382));
        assert_eq!(l.parse_netns("kiln-s0042"), None);
        assert_eq!(l.parse_netns("kiln-h00042"), None);
        assert_eq!(l.parse_netns("kilnx-s00042"), None);
        assert_eq!(l.parse_host_veth("kiln-h0004a"), None);
        assert!(l.host_veth(99_999).len() <= 15);
    }

    #[test]
    fn macs_are_stable_and_distinct() {
        let l = layout();
        assert_eq!(l.slot(1).mac, "02:6b:6e:00:00:01");
        assert_eq!(l.slot(0x1234).mac, "02:6b:6e:00:12:34");
        assert_eq!(l.host_mac(1), "02:6b:68:00:00:01");
        assert_ne!(l.slot(1).mac, l.slot(2).mac);
    }

    #[test]
    fn config_validation() {
        let bad_prefix = NetworkConfig {
            name_prefix: "waytoolong".into(),
            ..Default::default()
        };
        assert!(Layout::new(&bad_prefix, None, None).is_err());
        let bad_subnet = NetworkConfig {
            subnet: "10.0.0.0/30".parse().unwrap(),
            ..Default::default()
        };
        assert!(Layout::new(&bad_subnet, None, None).is_err());
        let cfg = NetworkConfig::default();
        assert!(Layout::new(&cfg, Some(Ipv4Addr::new(10, 11, 0, 5)), None).is_err());
        assert!(Layout::new(&cfg, None, Some("eth0; drop".into())).is_err());
        let small = NetworkConfig {
            subnet: "10.0.0.0/28".parse().unwrap(),
            ..Default::default()
        };
        let l = Layout::new(&small, None, None).unwrap();
        assert_eq!(l.max_slots, 3);
        assert_eq!(l.dns_ip, Ipv4Addr::new(10, 0, 0, 14));
    }

    #[test]
    fn resolv_conf_parsing() {
        let text = "# comment\nsearch x\nnameserver fd00::1\nnameserver 127.0.0.53 # local\nnameserver 1.1.1.1\n";
        assert_eq!(
            first_ipv4_nameserver(text),
            Some(Ipv4Addr::new(127, 0, 0, 53))
        );
        assert_eq!(first_ipv4_nameserver("options ndots:1\n"), None);
    }

    #[test]
    fn default_route_parsing() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    eth1\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(text).as_deref(), Some("eth1"));
        assert_eq!(default_route_interface("Iface\n"), None);
    }

    #[test]
    fn policy_defaults() {
        let p = EgressPolicy::default();
        assert!(p.internet);
        let p: EgressPolicy = serde_json::from_str(r#"{"deny_out":["1.2.3.0/24"]}"#).unwrap();
        assert!(p.internet);
        assert_eq!(p.deny_out.len(), 1);
    }
}
