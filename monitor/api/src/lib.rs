//! leakscope's HTTP API as every consumer sees it: the daemon serialises these types, and
//! the tests, `cargo xtask` and leakscope's own clients read them back. No client parses
//! metric text or JSON by hand.
//!
//! - [`types`]: the JSON bodies of `/api/v1/*`;
//! - [`openmetrics`]: the `/metrics` text as samples;
//! - [`client`]: a blocking HTTP/1.1 client for a daemon on loopback.

pub mod client;
pub mod openmetrics;
pub mod types;
