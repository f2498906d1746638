//! Per-sandbox network namespaces, veth pairs, NAT and egress policy.
