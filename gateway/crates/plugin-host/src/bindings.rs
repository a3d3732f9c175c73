//! Rust bindings for the plugin world in the repository's `wit/` directory, reached through
//! this crate's own `wit` link so that `cargo package` includes the contract.

wasmtime::component::bindgen!({
    path: "wit",
    world: "plugin",
    imports: {
        // Ranking waits for a model batch, so it is the one import that suspends the plugin.
        "storefront:gateway/ranking.rank": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    with: {
        "storefront:gateway/http.request": super::host::RequestState,
        "storefront:gateway/http.response": super::host::ResponseState,
    },
});
