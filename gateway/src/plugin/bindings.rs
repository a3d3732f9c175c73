//! Rust bindings for the plugin world in the repository's `wit/` directory.

wasmtime::component::bindgen!({
    path: "../wit",
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
