//! How the state is shown: Prometheus text, the JSON API's types, text tables.

pub mod api;
pub mod inspect;
pub mod prometheus;
