//! `noop`: a plugin that does nothing. `on-request` returns `continue` and `on-response` leaves
//! the response alone, so benchmarks can measure what the plugin machinery itself costs.
//!
//! Config: none (any string is accepted and ignored).

use gateway_plugin_sdk::prelude::*;

/// The plugin; it has no state.
pub struct Noop;

impl Plugin for Noop {
    fn init(_config: &str) -> Result<Self, String> {
        Ok(Noop)
    }
}

export_plugin!(Noop);
