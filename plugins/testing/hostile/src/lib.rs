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
//! | `wasi`        | `on-request` tries what WASI offers: reads a file, the           |
//! |               | environment, connects a TCP socket, reads both clocks and random |
//! |               | bytes, prints to stdout and stderr; answers 200 with what each   |
//! |               | attempt got, one line each (`file: error ...`)                   |
//! | `stderr-trap` | `on-request` writes two lines to stderr, then traps              |
//! | `init-fail`   | `init` returns `Err("hostile plugin refuses to start")`          |
//! | `init-trap`   | `init` writes a line to stderr, then traps                       |
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
    Wasi,
    StderrTrap,
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
            "wasi" => Mode::Wasi,
            "stderr-trap" => Mode::StderrTrap,
            "init-fail" => return Err("hostile plugin refuses to start".into()),
            "init-trap" => {
                eprintln!("hostile: init cannot go on");
                trap()
            }
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
            Mode::Wasi => LocalResponse::new(200).text(try_wasi()).into(),
            Mode::StderrTrap => {
                eprintln!("hostile: about to trap");
                eprintln!("hostile: the reason is a test");
                trap()
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

/// Tries each thing WASI could give a plugin and says what it got, one line each.
fn try_wasi() -> String {
    use std::io::Read;
    let mut out = String::new();
    let file = match std::fs::File::open("/etc/passwd") {
        Ok(mut f) => {
            let mut s = String::new();
            match f.read_to_string(&mut s) {
                Ok(_) => format!("data {:?}", s.lines().next().unwrap_or("")),
                Err(e) => format!("error {e}"),
            }
        }
        Err(e) => format!("error {e}"),
    };
    out.push_str(&format!("file: {file}\n"));
    let dir = match std::fs::read_dir(".") {
        Ok(d) => format!("data {} entries", d.count()),
        Err(e) => format!("error {e}"),
    };
    out.push_str(&format!("dir: {dir}\n"));
    out.push_str(&format!(
        "env: {} variables, {} arguments\n",
        std::env::vars().count(),
        std::env::args().count()
    ));
    let tcp = match std::net::TcpStream::connect("127.0.0.1:80") {
        Ok(_) => "data connected".to_string(),
        Err(e) => format!("error {e}"),
    };
    out.push_str(&format!("tcp: {tcp}\n"));
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    out.push_str(&format!(
        "wall clock: {}\n",
        if wall > 1_600_000_000 { "ok" } else { "wrong" }
    ));
    let t0 = std::time::Instant::now();
    out.push_str(&format!(
        "monotonic clock: {}\n",
        if t0.elapsed().as_secs() < 5 {
            "ok"
        } else {
            "wrong"
        }
    ));
    let mut map = std::collections::HashMap::<u8, u8>::new();
    map.insert(1, 1);
    out.push_str("random: ok\n");
    println!("hostile: hello on stdout");
    eprintln!("hostile: hello on stderr");
    out
}

/// The wasm `unreachable` instruction (elsewhere, for native unit builds, an abort).
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

export_plugin!(Hostile);
