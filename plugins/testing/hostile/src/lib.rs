//! `hostile`: a test fixture that misbehaves on purpose, so the gateway's test suite can prove
//! that a plugin cannot hurt the process (fuel/epoch limits, memory limits, trap handling,
//! header and body limits, init failures).
//!
//! Config: the whole config string (trimmed) is the mode, exactly one of:
//!
//! | mode          | behaviour                                                        |
//! |---------------|------------------------------------------------------------------|
//! | `loop`        | `on-request` spins forever                                       |
//! | `grow`        | `on-request` allocates 1 MiB blocks without bound, never frees   |
//! | `trap`        | `on-request` executes the wasm `unreachable` instruction         |
//! | `panic`       | `on-request` panics (a trap too, since panics abort)             |
//! | `huge-header` | `on-request` sets `x-hostile` to a 1 MiB value, then continues   |
//! | `huge-body`   | `on-response` calls `set-body` with 64 MiB                       |
//! | `wait`        | `on-request` asks model `recs` to rank items 1–3 (parked in a    |
//! |               | host call for as long as the model's batch takes), continues     |
//! | `init-fail`   | `init` returns `Err("hostile plugin refuses to start")`          |
//! | `ok`          | behaves: continues (telling the upstream the size of the request |
//! |               | body it was shown, in `x-body-bytes`), leaves responses alone    |
//!
//! Any other mode makes `init` fail.

use gateway_plugin_sdk::{log, prelude::*};
use std::hint::black_box;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Loop,
    Grow,
    Trap,
    Panic,
    HugeHeader,
    HugeBody,
    Wait,
    Ok,
}

/// The fixture; `hoard` keeps what `grow` allocates alive.
pub struct Hostile {
    mode: Mode,
    hoard: Vec<Vec<u8>>,
}

const MIB: usize = 1024 * 1024;

impl Plugin for Hostile {
    fn init(config: &str) -> Result<Self, String> {
        let mode = match config.trim() {
            "loop" => Mode::Loop,
            "grow" => Mode::Grow,
            "trap" => Mode::Trap,
            "panic" => Mode::Panic,
            "huge-header" => Mode::HugeHeader,
            "huge-body" => Mode::HugeBody,
            "ok" => Mode::Ok,
            "wait" => Mode::Wait,
            "init-fail" => return Err("hostile plugin refuses to start".into()),
            other => return Err(format!("hostile: unknown mode {other:?}")),
        };
        Ok(Hostile {
            mode,
            hoard: Vec::new(),
        })
    }

    fn on_request(&mut self, req: &Request) -> Action {
        match self.mode {
            Mode::Loop => {
                let mut n: u64 = 0;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            Mode::Grow => loop {
                // Touch every page so the memory is really used, then keep it forever.
                self.hoard.push(black_box(vec![0xA5; MIB]));
            },
            Mode::Trap => trap(),
            Mode::Panic => panic!("hostile plugin panics on purpose"),
            Mode::HugeHeader => {
                if let Err(e) = req.set_header("x-hostile", &"a".repeat(MIB)) {
                    log::info(&format!("huge header refused: {e}"));
                }
                Action::Continue
            }
            Mode::Ok => {
                if let Some(body) = req.body() {
                    let _ = req.set_header("x-body-bytes", &body.len().to_string());
                }
                Action::Continue
            }
            Mode::Wait => {
                if let Err(e) = gateway_plugin_sdk::ranking::rank("recs", 1, &[1, 2, 3]) {
                    log::info(&format!("rank refused: {e}"));
                }
                Action::Continue
            }
            Mode::HugeBody => Action::Continue,
        }
    }

    fn on_response(&mut self, resp: &Response) {
        if self.mode == Mode::HugeBody {
            if let Err(e) = resp.set_body(&vec![b'x'; 64 * MIB]) {
                log::info(&format!("huge body refused: {e}"));
            }
        }
    }
}

/// The wasm `unreachable` instruction (elsewhere, for native unit builds, an abort).
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

export_plugin!(Hostile);
