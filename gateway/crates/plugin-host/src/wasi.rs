//! WASI for plugins, capability-less: what components built by the standard toolchains
//! (componentize-py, componentize-js, Rust's `wasm32-wasip2` std) import, linked so that they
//! load with their tools' defaults, while a plugin still reaches nothing outside the gateway.
//!
//! Per interface (this list is the one in `plugins/README.md`):
//!
//! - `wasi:filesystem`: no preopened directory, so there is no path to open: every open fails
//!   with a WASI error (Python's `open` raises, Rust's `File::open` returns `Err`).
//! - `wasi:sockets`: TCP, UDP and name lookup are denied (`access-denied`); no address is
//!   reachable.
//! - `wasi:http/outgoing-handler`: every request fails with `HTTP-request-denied` (JS `fetch`
//!   rejects); `wasi:http/types` works, so building a request is allowed, sending it is not.
//! - `wasi:cli/environment`: no variables, no arguments, no initial directory.
//! - `wasi:cli/stdin`: closed (reads end at once).
//! - `wasi:cli/stdout`, `wasi:cli/stderr`: captured line by line into the gateway's log under
//!   the plugin's name (target `plugin`, field `stream`; stdout at info, stderr at warn),
//!   lines cut at [`MAX_LINE`] bytes, at most [`OUTPUT_PER_CALL`] bytes per call (the rest is
//!   dropped, once noted); the end of stderr is also kept for the failure it explains.
//! - `wasi:cli/exit`: ends the call as a trap, like any other.
//! - `wasi:clocks`: the host's monotonic and wall clocks (a sleep or a poll waits, counted by
//!   the call's wall-clock `deadline_ms`).
//! - `wasi:random`: random bytes (secure and insecure), from the host.
//! - `wasi:io`: the streams and polls the interfaces above hand out.
//!
//! Nothing else is linked: a component importing anything else is refused at load.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::component::Linker;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::host::StoreState;

/// Longest line of guest output logged; the rest of a longer line is dropped.
pub(crate) const MAX_LINE: usize = 4096;
/// Guest output (stdout and stderr together) logged per call (and for `init`).
pub(crate) const OUTPUT_PER_CALL: usize = 16 * 1024;
/// How much of the end of a call's stderr is kept to explain its failure.
const STDERR_TAIL: usize = 2048;

/// Links WASI (capability-less, see the module documentation) into `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)?;
    Ok(())
}

/// The WASI state of one instance: no preopens, environment, arguments or network; stdout
/// and stderr go to `output`.
pub(crate) fn context(output: &Arc<GuestOutput>) -> WasiCtx {
    let mut b = WasiCtxBuilder::new();
    b.stdout(GuestStream {
        output: output.clone(),
        stream: Stream::Stdout,
    })
    .stderr(GuestStream {
        output: output.clone(),
        stream: Stream::Stderr,
    })
    .allow_tcp(false)
    .allow_udp(false)
    .allow_ip_name_lookup(false);
    b.build()
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            hooks: &mut self.http_hooks,
            table: &mut self.table,
            ctx: &mut self.http,
        }
    }
}

/// A fresh `wasi:http` state.
pub(crate) fn http_context() -> WasiHttpCtx {
    WasiHttpCtx::new()
}

/// `wasi:http` hooks that refuse every outgoing request.
pub(crate) struct NoOutgoingHttp;

impl WasiHttpHooks for NoOutgoingHttp {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
                )>,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn label(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// An instance's stdout and stderr: partial lines, the call's budget, the end of its stderr.
pub(crate) struct GuestOutput {
    plugin: String,
    version: String,
    state: Mutex<OutputState>,
    /// The state is not fresh: something was written since the last reset. A call that
    /// writes nothing, nearly every call, then costs no lock.
    written: AtomicBool,
}

#[derive(Default)]
struct OutputState {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Bytes this call may still log.
    left: usize,
    /// Output was dropped in this call (noted once).
    dropped: bool,
    /// The end of this call's stderr.
    tail: Vec<u8>,
}

impl GuestOutput {
    /// Output of an instance of `plugin` at `version`.
    pub fn new(plugin: &str, version: &str) -> Arc<GuestOutput> {
        Arc::new(GuestOutput {
            plugin: plugin.to_string(),
            version: version.to_string(),
            state: Mutex::new(OutputState {
                left: OUTPUT_PER_CALL,
                ..Default::default()
            }),
            written: AtomicBool::new(false),
        })
    }

    /// Starts a call: a new budget and no stderr yet.
    pub fn start_call(&self) {
        if !self.written.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.state.lock().expect("guest output lock");
        s.left = OUTPUT_PER_CALL;
        s.dropped = false;
        s.tail.clear();
        // Partial lines left by `init` are still to be logged.
        self.written.store(
            !(s.stdout.is_empty() && s.stderr.is_empty()),
            Ordering::Release,
        );
    }

    /// Ends a call: logs what is left of partial lines and returns the end of the call's
    /// stderr (empty when it wrote none).
    pub fn finish_call(&self) -> String {
        if !self.written.load(Ordering::Acquire) {
            return String::new();
        }
        let mut s = self.state.lock().expect("guest output lock");
        for stream in [Stream::Stdout, Stream::Stderr] {
            let rest = std::mem::take(s.buffer(stream));
            if !rest.is_empty() {
                self.emit(&mut s, stream, &rest);
            }
        }
        let tail = std::mem::take(&mut s.tail);
        s.left = OUTPUT_PER_CALL;
        s.dropped = false;
        self.written.store(false, Ordering::Release);
        String::from_utf8_lossy(&tail).trim_end().to_string()
    }

    fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut s = self.state.lock().expect("guest output lock");
        self.written.store(true, Ordering::Release);
        if stream == Stream::Stderr {
            s.tail.extend_from_slice(bytes);
            if s.tail.len() > STDERR_TAIL {
                let cut = s.tail.len() - STDERR_TAIL;
                s.tail.drain(..cut);
            }
        }
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(s.buffer(stream));
            line.extend_from_slice(&rest[..nl]);
            self.emit(&mut s, stream, &line);
            rest = &rest[nl + 1..];
        }
        let buf = s.buffer(stream);
        // A line longer than MAX_LINE keeps its start only.
        let room = (MAX_LINE + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&rest[..rest.len().min(room)]);
    }

    /// Logs one line, within the call's budget.
    fn emit(&self, s: &mut OutputState, stream: Stream, line: &[u8]) {
        let line = &line[..line.len().min(MAX_LINE)];
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        if line.len() + 1 > s.left {
            if !s.dropped {
                s.dropped = true;
                tracing::warn!(target: "plugin", plugin = %self.plugin, version = %self.version,
                    "plugin output over {OUTPUT_PER_CALL} bytes in one call; the rest of it is not logged");
            }
            return;
        }
        s.left -= line.len() + 1;
        let (plugin, version, stream) = (&self.plugin, &self.version, stream.label());
        if stream == "stderr" {
            tracing::warn!(target: "plugin", plugin, version, stream, "{line}");
        } else {
            tracing::info!(target: "plugin", plugin, version, stream, "{line}");
        }
    }
}

impl OutputState {
    fn buffer(&mut self, stream: Stream) -> &mut Vec<u8> {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }
}

/// stdout or stderr of one instance, as WASI sees it: always ready, never blocks.
#[derive(Clone)]
struct GuestStream {
    output: Arc<GuestOutput>,
    stream: Stream,
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.output.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.output.write(self.stream, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_the_stderr_tail_and_cuts_long_lines() {
        let out = GuestOutput::new("p", "v");
        out.start_call();
        out.write(Stream::Stdout, b"one\ntw");
        out.write(Stream::Stderr, b"Traceback:\n  boom");
        out.write(Stream::Stdout, &vec![b'x'; 3 * MAX_LINE]);
        assert!(out.state.lock().unwrap().stdout.len() <= MAX_LINE + 1);
        assert_eq!(out.finish_call(), "Traceback:\n  boom");
        assert!(out.state.lock().unwrap().stdout.is_empty());
        out.start_call();
        out.write(Stream::Stderr, &vec![b'e'; 3 * STDERR_TAIL]);
        assert_eq!(out.finish_call().len(), STDERR_TAIL);
    }

    #[test]
    fn output_past_the_call_budget_is_dropped() {
        let out = GuestOutput::new("p", "v");
        out.start_call();
        for _ in 0..(OUTPUT_PER_CALL / 100 + 10) {
            out.write(Stream::Stdout, &[b'y'; 99]);
            out.write(Stream::Stdout, b"\n");
        }
        let s = out.state.lock().unwrap();
        assert!(s.dropped && s.left < 100);
    }
}
