//! Transparent capture with iptables (being written).
