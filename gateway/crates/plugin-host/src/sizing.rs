//! Sizing: what one instance of a component takes from the engine's pooling allocator, the
//! pool the engine is built with (from `[plugin_runtime]`), and the check at load that a
//! plugin fits it, with a message that names the setting to change.
//!
//! A Rust plugin (wasm32-wasip2) is 3 core instances (the module and wit-component's shims),
//! one memory and two tables; a componentize-py 0.25 plugin is 14 core instances and starts
//! with 12.6 MiB of memory; a componentize-js 0.23 one is 4 core instances and 9.1 MiB. The
//! pool has room per instance for a mix of those.

use wasmtime::component::Component;
use wasmtime::PoolingAllocationConfig;

use crate::config::{PluginRuntimeSettings, PluginSpec};

/// Core instances one plugin instance may use.
pub const MAX_CORE_INSTANCES_PER_PLUGIN: u32 = 128;
/// Linear memories one plugin instance may define.
pub const MAX_MEMORIES_PER_PLUGIN: u32 = 8;
/// Tables one plugin instance may define.
pub const MAX_TABLES_PER_PLUGIN: u32 = 128;
/// Elements one table may hold (the limiter refuses growth past this too).
pub const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Core instances in the pool per `max_instances`: a mix of small (Rust: 1) and large
/// (Python: ~38) plugins.
const CORE_INSTANCES_PER_SLOT: u32 = 16;
/// Memories in the pool per `max_instances`.
const MEMORIES_PER_SLOT: u32 = 2;
/// Tables in the pool per `max_instances`.
const TABLES_PER_SLOT: u32 = 16;
/// Largest linear memory slot; each plugin's own cap (`memory_limit_bytes`) is enforced by
/// its limiter, and validation keeps that cap under this.
pub const MEMORY_SLOT_BYTES: u64 = 4 << 30;

/// The pool every plugin instance is allocated from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// Component instances at once (`max_instances`).
    pub component_instances: u32,
    /// Core instances at once.
    pub core_instances: u32,
    /// Linear memories at once.
    pub memories: u32,
    /// Tables at once.
    pub tables: u32,
}

impl Pool {
    /// The pool for `settings`.
    pub fn for_settings(settings: &PluginRuntimeSettings) -> Pool {
        let n = settings.max_instances;
        Pool {
            component_instances: n,
            core_instances: n.saturating_mul(CORE_INSTANCES_PER_SLOT),
            memories: n.saturating_mul(MEMORIES_PER_SLOT),
            tables: n.saturating_mul(TABLES_PER_SLOT),
        }
    }

    /// The wasmtime configuration of this pool.
    pub fn config(&self) -> PoolingAllocationConfig {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(self.component_instances)
            .total_core_instances(self.core_instances)
            .total_memories(self.memories)
            .total_tables(self.tables)
            .total_stacks(self.component_instances)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_PLUGIN)
            .max_memories_per_component(MAX_MEMORIES_PER_PLUGIN)
            .max_tables_per_component(MAX_TABLES_PER_PLUGIN)
            // Interpreters' modules define several tables and memories each.
            .max_memories_per_module(MAX_MEMORIES_PER_PLUGIN)
            .max_tables_per_module(MAX_TABLES_PER_PLUGIN)
            .table_elements(MAX_TABLE_ELEMENTS)
            // Slots are address space; each plugin's own cap is enforced by its limiter.
            .max_memory_size(MEMORY_SLOT_BYTES as usize);
        pool
    }
}

/// What one instance of a component takes from the pool, and the memory it starts with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Core module instances made when the component is instantiated.
    pub core_instances: u32,
    /// Linear memories defined.
    pub memories: u32,
    /// Tables defined.
    pub tables: u32,
    /// The largest initial size of one of its memories, bytes.
    pub initial_memory: u64,
    /// The largest initial size of one of its tables, elements.
    pub initial_table_elements: u64,
}

impl Footprint {
    /// Reads the footprint of `component`, compiled from `bytes`.
    pub fn of(component: &Component, bytes: &[u8]) -> Footprint {
        let resources = component.resources_required();
        Footprint {
            core_instances: core_instances(bytes),
            memories: resources.as_ref().map_or(0, |r| r.num_memories),
            tables: resources.as_ref().map_or(0, |r| r.num_tables),
            initial_memory: resources
                .as_ref()
                .and_then(|r| r.max_initial_memory_size)
                .map_or(0, |pages| pages.saturating_mul(64 * 1024)),
            initial_table_elements: resources
                .as_ref()
                .and_then(|r| r.max_initial_table_size)
                .unwrap_or(0),
        }
    }

    /// Checks that `spec`'s instances of a component of this footprint fit `pool` and its
    /// limits; the error says what does not fit and which setting to change.
    pub fn check(&self, spec: &PluginSpec, pool: &Pool) -> Result<(), String> {
        let per_plugin = [
            (
                "core instances",
                self.core_instances,
                MAX_CORE_INSTANCES_PER_PLUGIN,
            ),
            ("memories", self.memories, MAX_MEMORIES_PER_PLUGIN),
            ("tables", self.tables, MAX_TABLES_PER_PLUGIN),
        ];
        for (what, needs, max) in per_plugin {
            if needs > max {
                return Err(format!(
                    "one instance needs {needs} {what}; a plugin may have at most {max}"
                ));
            }
        }
        if self.initial_table_elements > MAX_TABLE_ELEMENTS as u64 {
            return Err(format!(
                "a table starts with {} elements; a plugin's tables may hold at most {MAX_TABLE_ELEMENTS}",
                self.initial_table_elements
            ));
        }
        if self.initial_memory > spec.memory_limit as u64 {
            return Err(format!(
                "its memory starts at {} (the component's own initial size), over its \
                 memory_limit_bytes of {}: set memory_limit_bytes to at least {} (the \
                 memory it reaches in use is higher; `gateway plugin check` reports it)",
                mib(self.initial_memory),
                mib(spec.memory_limit as u64),
                self.initial_memory
            ));
        }
        let n = spec.instances.max(1);
        let total = [
            (
                "instances",
                1,
                pool.component_instances,
                "plugin_runtime.max_instances",
            ),
            (
                "core instances",
                self.core_instances,
                pool.core_instances,
                "plugin_runtime.max_instances (the pool has 16 core instances per instance)",
            ),
            (
                "memories",
                self.memories,
                pool.memories,
                "plugin_runtime.max_instances (the pool has 2 memories per instance)",
            ),
            (
                "tables",
                self.tables,
                pool.tables,
                "plugin_runtime.max_instances (the pool has 16 tables per instance)",
            ),
        ];
        for (what, each, available, setting) in total {
            let needs = each.saturating_mul(n);
            if needs > available {
                return Err(format!(
                    "its {n} ready instances need {needs} {what} ({each} each) and the \
                     engine's pool has {available}: lower `instances` or raise {setting}"
                ));
            }
        }
        Ok(())
    }
}

/// Core module instances a component makes when instantiated: its `instantiate` core
/// instance declarations, nested components included (each counted once).
pub fn core_instances(bytes: &[u8]) -> u32 {
    let mut n = 0u32;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let Ok(wasmparser::Payload::InstanceSection(section)) = payload {
            for instance in section.into_iter().flatten() {
                if matches!(instance, wasmparser::Instance::Instantiate { .. }) {
                    n = n.saturating_add(1);
                }
            }
        }
    }
    n
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
