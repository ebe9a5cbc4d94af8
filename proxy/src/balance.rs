//! Load balancers over a live endpoint set (being written).
