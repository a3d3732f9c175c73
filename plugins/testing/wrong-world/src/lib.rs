//! `wrong-world`: a test fixture. A valid WebAssembly component, but for the world
//! `other:thing/thing@0.1.0` (see `wit/thing.wit` in this crate: it exports `run: func() -> u32`
//! and imports nothing of the gateway's), so the gateway must refuse to load it as a plugin.
//!
//! Config: none (it has no `init`).

wit_bindgen::generate!({
    path: "wit",
    world: "thing",
});

struct Thing;

impl Guest for Thing {
    fn run() -> u32 {
        42
    }
}

export!(Thing);
