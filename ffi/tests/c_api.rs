//! The C ABI from C: compiles the programs of `tests/c/` against the library cargo just built
//! and the committed header `include/nixl.h`, and runs them.
//!
//! - `peer.c`: two processes (target and initiator) moving bytes with `shm` and with `tcp`,
//!   with notifications, metadata exchanged through files.
//! - `misuse.c`: NULL pointers, bad names and configs, garbage metadata, out-of-bounds
//!   descriptors, unknown/unavailable backends, too-small buffers, bad handles; exact status
//!   codes and a non-empty `nixl_last_error()` after each error.
//! - `threads.c`: several threads using one agent, one request, one notification queue.
//! - `files.c`: files through `uring` and `posix` (registered by path and by fd), O_DIRECT
//!   alignment, short reads, read-only registrations.
//! - `ckpt.c`: checkpoints (`nixl_ckpt_save`, `nixl_ckpt_restore`): full and incremental round
//!   trips, and the status and last error of each way to get them wrong.
//! - `weights.c`: weight streaming (`nixl_weights_*`): this harness writes a two-file
//!   safetensors model (the `safetensors` crate) whose tensors hold the C tests' pattern and
//!   serves it from an agent of its own (as `nixl-weights serve` does); the program lists the
//!   tensors, pulls each into malloc'd memory it registered (also from four threads at once),
//!   checks every byte, and checks each way to get a pull wrong.
//! - `kv.c`: KV-cache handoff (`nixl_kv_*`): layouts validated, encoded and decoded, the
//!   descriptors of a block mapping, then a pull handoff between a prefill and a decode agent of
//!   one process over tcp (decode rank 1 of 2 in another order), every byte of the decode cache
//!   checked, a declined offer, and the ABI's refusals.
//!
//! Each runs once plainly and once under valgrind with smaller sizes, where an invalid access or
//! a definite leak fails the test (valgrind exits 99). A C program exits 0 when it passed, 1 with
//! the reason on stderr when it failed, and 77 when the backend it tests cannot run on this host
//! (a visible skip through `nixl_testkit::require!`, or a failure under `NIXL_REQUIRE_C_TESTS=1` or
//! `NIXL_REQUIRE_ALL=1`).
//!
//! Linking: `peer` links the static library `libnixl.a` (with `-lpthread -ldl -lm`), `misuse`,
//! `threads` and `files` link `libnixl.so` (with an rpath to its directory), so that both artifacts C
//! users get are exercised: the static one for missing native libraries, the shared one for its
//! exported symbols.
//!
//! Without a C compiler or valgrind the tests skip with `nixl_testkit::require!` (`SKIPPED
//! <test>: <reason>` on the real stderr, so it shows even when the output is captured) and pass,
//! unless `NIXL_REQUIRE_C_TESTS=1` or `NIXL_REQUIRE_ALL=1` (CI), which make them fail instead. `CC` overrides the compiler (`cc`). Each run gets a fresh directory
//! under the temp dir (the shm backend's socket_dir and the metadata files), removed when the run
//! passes and kept (its path printed) when it fails.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a test program exits with when the backend it tests cannot run on this host.
const EXIT_SKIP: i32 = 77;
/// What valgrind exits with when it found errors (`--error-exitcode`).
const EXIT_VALGRIND: i32 = 99;

/// The C programs' own wait timeout (seconds) and the kill timeout around them.
const PLAIN_C_TIMEOUT_S: u32 = 20;
const PLAIN_KILL: Duration = Duration::from_secs(45);
const VALGRIND_C_TIMEOUT_S: u32 = 60;
const VALGRIND_KILL: Duration = Duration::from_secs(100);

const VALGRIND_ARGS: &[&str] = &[
    "--error-exitcode=99",
    "--leak-check=full",
    "--errors-for-leak-kinds=definite",
    "--show-leak-kinds=definite",
    "--num-callers=40",
    "--fair-sched=yes",
    "-q",
];

/// Writes a line to the process's real stderr: not captured by the test harness.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The variable that makes a C test that cannot run fail instead of skipping (besides
/// `NIXL_REQUIRE_ALL`; see `nixl_testkit::require!`).
const REQUIRE_C: &str = "NIXL_REQUIRE_C_TESTS";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding `libnixl.a` and `libnixl.so` of this build: the test executable lives in
/// `target/<profile>/deps/`, the libraries in `target/<profile>/` (and in `deps/`). The newest
/// pair wins.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for dir in exe.ancestors().skip(1).take(3) {
        let (a, so) = (dir.join("libnixl.a"), dir.join("libnixl.so"));
        if let (Ok(ma), Ok(_)) = (fs::metadata(&a), fs::metadata(&so)) {
            let t = ma.modified().expect("mtime");
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, dir.to_path_buf()));
            }
        }
    }
    match best {
        Some((_, d)) => d,
        None => panic!(
            "libnixl.a and libnixl.so not found beside {} (is crate-type [\"cdylib\", \"staticlib\", \
             \"rlib\"] set for nixl-ffi?)",
            exe.display()
        ),
    }
}

/// A fresh, empty directory for one run.
fn fresh_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "nixl-c-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        tag
    ));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create the run directory");
    d
}

/// Where the programs are compiled: `<target>/tmp/c_api/<pid>/`; the directories of earlier
/// test processes that are gone are removed.
fn build_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_api");
    if let Ok(entries) = fs::read_dir(&root) {
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name.to_str().and_then(|n| n.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let d = root.join(std::process::id().to_string());
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create the build directory");
    d
}

fn cc() -> Vec<String> {
    let cc = std::env::var("CC").unwrap_or_default();
    let words: Vec<String> = cc.split_whitespace().map(str::to_owned).collect();
    if words.is_empty() {
        vec!["cc".into()]
    } else {
        words
    }
}

/// The compiled programs, built once per test process.
#[derive(Debug)]
struct Programs {
    peer: PathBuf,
    misuse: PathBuf,
    threads: PathBuf,
    files: PathBuf,
    ckpt: PathBuf,
    weights: PathBuf,
    kv: PathBuf,
}

/// Compiles the programs (in parallel), or says why not: `Err(Skip)` when there is no compiler.
fn programs() -> Result<&'static Programs, String> {
    static P: OnceLock<Result<Programs, String>> = OnceLock::new();
    P.get_or_init(build_programs).as_ref().map_err(Clone::clone)
}

const SKIP_PREFIX: &str = "skip: ";

fn build_programs() -> Result<Programs, String> {
    let cc = cc();
    match Command::new(&cc[0])
        .args(&cc[1..])
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!(
                "{SKIP_PREFIX}C compiler `{}` does not run: {}",
                cc.join(" "),
                String::from_utf8_lossy(&o.stderr)
            ))
        }
        Err(e) => {
            return Err(format!(
                "{SKIP_PREFIX}no C compiler `{}`: {e}",
                cc.join(" ")
            ))
        }
    }
    let header = manifest_dir().join("include/nixl.h");
    assert!(
        header.exists(),
        "{} is missing (generated by cbindgen and committed)",
        header.display()
    );
    let lib = lib_dir();
    let src = manifest_dir().join("tests/c");
    let out = build_dir();
    let common = |c: &mut Command, name: &str| {
        c.args(&cc[1..])
            .args(["-std=c11", "-Wall", "-Wextra", "-Wpedantic", "-Werror"])
            .args(["-O1", "-g", "-pthread"])
            .arg("-I")
            .arg(header.parent().unwrap())
            .arg("-I")
            .arg(&src)
            .arg(src.join(format!("{name}.c")))
            .arg("-o")
            .arg(out.join(name));
    };
    let mut jobs: Vec<(&str, Command)> = Vec::new();
    // peer: the static library.
    let mut c = Command::new(&cc[0]);
    common(&mut c, "peer");
    c.arg(lib.join("libnixl.a"))
        .args(["-lpthread", "-ldl", "-lm"]);
    jobs.push(("peer", c));
    // misuse, threads: the shared library, found through an rpath.
    for name in ["misuse", "threads", "files", "ckpt", "weights", "kv"] {
        let mut c = Command::new(&cc[0]);
        common(&mut c, name);
        c.arg("-L")
            .arg(&lib)
            .arg("-lnixl")
            // DT_RPATH, not DT_RUNPATH: cargo puts `target/<profile>` on LD_LIBRARY_PATH, and a
            // RUNPATH would lose to it, loading an older libnixl.so left there by `cargo build`.
            .arg("-Wl,--disable-new-dtags")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
        jobs.push((name, c));
    }
    let started: Vec<_> = jobs
        .into_iter()
        .map(|(name, mut c)| {
            let cmdline = format!("{c:?}");
            (
                name,
                cmdline,
                c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn(),
            )
        })
        .collect();
    let mut errors = String::new();
    for (name, cmdline, child) in started {
        match child.and_then(|c| c.wait_with_output()) {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                errors += &format!(
                    "compiling {name} failed ({}):\n{cmdline}\n{}{}\n",
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            }
            Err(e) => errors += &format!("compiling {name}: {e}\n{cmdline}\n"),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Programs {
        peer: out.join("peer"),
        misuse: out.join("misuse"),
        threads: out.join("threads"),
        files: out.join("files"),
        ckpt: out.join("ckpt"),
        weights: out.join("weights"),
        kv: out.join("kv"),
    })
}

/// Why the C programs cannot be built here (no compiler), for `require!`; `None` once they are
/// built. Compile errors fail the test.
fn no_programs() -> Option<String> {
    match programs() {
        Ok(_) => None,
        Err(e) if e.starts_with(SKIP_PREFIX) => Some(e[SKIP_PREFIX.len()..].to_owned()),
        Err(e) => panic!("{e}"),
    }
}

/// Why a run under valgrind cannot happen here, for `require!` (`None` for a plain run).
fn no_valgrind(valgrind: bool) -> Option<String> {
    if !valgrind {
        return None;
    }
    match Command::new("valgrind").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(_) => Some("valgrind does not run".into()),
        Err(e) => Some(format!("valgrind is not installed ({e})")),
    }
}

/// One process of a run.
#[derive(Debug)]
struct Proc {
    name: String,
    log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
    killed: bool,
}

impl Proc {
    fn spawn(name: &str, dir: &Path, valgrind: bool, program: &Path, args: &[&str]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = File::create(&log).expect("create the log");
        let mut c = if valgrind {
            let mut c = Command::new("valgrind");
            c.args(VALGRIND_ARGS)
                .arg(format!(
                    "--suppressions={}",
                    manifest_dir().join("tests/c/valgrind.supp").display()
                ))
                .arg(program);
            c
        } else {
            Command::new(program)
        };
        c.args(args)
            .current_dir(dir)
            .env_remove("NIXL_SECRET")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup the log"))
            .stderr(f);
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Proc {
            name: name.to_owned(),
            log,
            child,
            status: None,
            killed: false,
        }
    }

    fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    fn describe(&self) -> String {
        let how = match (self.status, self.killed) {
            (_, true) => "killed (timeout, or its peer failed)".to_owned(),
            (Some(s), _) => match s.code() {
                Some(0) => "passed".into(),
                Some(EXIT_SKIP) => "skipped".into(),
                Some(EXIT_VALGRIND) => "valgrind found errors (exit 99)".into(),
                _ => format!("failed: {s}"),
            },
            (None, _) => "still running".into(),
        };
        let out = fs::read_to_string(&self.log).unwrap_or_default();
        format!("---- {} {how} ----\n{out}", self.name)
    }
}

/// Waits for every process, and kills those still running at `kill_after`, or soon after
/// another one failed (its peer would wait for nothing) or skipped (its peer skips too, or
/// would wait for nothing).
fn wait_all(procs: &mut [Proc], kill_after: Duration) {
    let mut deadline = Instant::now() + kill_after;
    loop {
        let mut running = 0;
        for p in procs.iter_mut().filter(|p| p.status.is_none()) {
            match p.child.try_wait().expect("try_wait") {
                Some(s) => {
                    p.status = Some(s);
                    // Grace for the others: to fail too and say why, or to skip too.
                    let grace = match p.code() {
                        Some(0) => None,
                        Some(EXIT_SKIP) => Some(Duration::from_secs(10)),
                        _ => Some(Duration::from_millis(500)),
                    };
                    if let Some(g) = grace {
                        deadline = deadline.min(Instant::now() + g);
                    }
                }
                None => running += 1,
            }
        }
        if running == 0 {
            return;
        }
        if Instant::now() > deadline {
            for p in procs.iter_mut().filter(|p| p.status.is_none()) {
                if let Ok(Some(s)) = p.child.try_wait() {
                    p.status = Some(s);
                    continue;
                }
                let _ = p.child.kill();
                p.status = p.child.wait().ok();
                p.killed = true;
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `procs` to the end: passes, skips (all skipped), or panics with their output.
fn finish(what: &str, dir: &Path, mut procs: Vec<Proc>, kill_after: Duration, started: Instant) {
    wait_all(&mut procs, kill_after);
    let took = started.elapsed();
    let all_ok = procs.iter().all(|p| p.code() == Some(0) && !p.killed);
    let skipped = procs
        .iter()
        .any(|p| p.code() == Some(EXIT_SKIP) && !p.killed);
    let report = procs
        .iter()
        .map(Proc::describe)
        .collect::<Vec<_>>()
        .join("");
    if all_ok {
        say(&format!(
            "c_api: {what}: passed in {:.1} s",
            took.as_secs_f64()
        ));
        let _ = fs::remove_dir_all(dir);
        return;
    }
    if skipped
        && procs
            .iter()
            .all(|p| matches!(p.code(), Some(0) | Some(EXIT_SKIP)))
    {
        // A backend this host cannot run (the library said so, with the reason). shm and tcp
        // run on every Linux host CI uses, so under NIXL_REQUIRE_C_TESTS=1 this fails too.
        let _ = fs::remove_dir_all(dir);
        nixl_testkit::require!(Some(format!("{what}: {}", report.trim_end())), REQUIRE_C);
    }
    panic!(
        "{what} failed after {:.1} s (files kept in {}):\n{report}",
        took.as_secs_f64(),
        dir.display()
    );
}

/// The C program's own timeout (seconds, as its argument) and the kill timeout around it.
fn limits(valgrind: bool) -> (String, Duration) {
    let (tmo, kill) = if valgrind {
        (VALGRIND_C_TIMEOUT_S, VALGRIND_KILL)
    } else {
        (PLAIN_C_TIMEOUT_S, PLAIN_KILL)
    };
    (tmo.to_string(), kill)
}

fn two_process(backend: &str, valgrind: bool) {
    nixl_testkit::require!(no_programs(), REQUIRE_C);
    nixl_testkit::require!(no_valgrind(valgrind), REQUIRE_C);
    let progs = programs().expect("built: checked above");
    let mode = if valgrind { "valgrind" } else { "plain" };
    let dir = fresh_dir(&format!("peer-{backend}-{mode}"));
    let size = if valgrind { "small" } else { "full" };
    let (tmo, kill) = limits(valgrind);
    let d = dir.to_str().expect("UTF-8 temp dir");
    let started = Instant::now();
    let procs = ["target", "initiator"]
        .iter()
        .map(|role| {
            Proc::spawn(
                role,
                &dir,
                valgrind,
                &progs.peer,
                &[role, d, backend, size, &tmo],
            )
        })
        .collect();
    finish(
        &format!("peer {backend} ({mode})"),
        &dir,
        procs,
        kill,
        started,
    );
}

#[test]
fn two_processes_shm() {
    two_process("shm", false);
}

#[test]
fn two_processes_tcp() {
    two_process("tcp", false);
}

#[test]
fn two_processes_shm_under_valgrind() {
    two_process("shm", true);
}

#[test]
fn two_processes_tcp_under_valgrind() {
    two_process("tcp", true);
}

/// One program, plainly or under valgrind.
fn single(name: &str, program: fn(&Programs) -> &Path, args: &[&str], valgrind: bool) {
    nixl_testkit::require!(no_programs(), REQUIRE_C);
    nixl_testkit::require!(no_valgrind(valgrind), REQUIRE_C);
    let progs = programs().expect("built: checked above");
    let mode = if valgrind { "valgrind" } else { "plain" };
    let dir = fresh_dir(&format!("{name}-{mode}"));
    let d = dir.to_str().expect("UTF-8 temp dir").to_owned();
    let (tmo, kill) = limits(valgrind);
    // "{dir}" and "{tmo}" in args stand for the run directory and the C timeout.
    let args: Vec<&str> = args
        .iter()
        .map(|a| match *a {
            "{dir}" => d.as_str(),
            "{tmo}" => tmo.as_str(),
            a => a,
        })
        .collect();
    let started = Instant::now();
    let p = Proc::spawn(name, &dir, valgrind, program(progs), &args);
    finish(&format!("{name} ({mode})"), &dir, vec![p], kill, started);
}

#[test]
fn misuse() {
    single("misuse", |p| &p.misuse, &["{dir}", "full", "{tmo}"], false);
}

#[test]
fn misuse_under_valgrind() {
    single("misuse", |p| &p.misuse, &["{dir}", "small", "{tmo}"], true);
}

#[test]
fn threads_share_an_agent() {
    single("threads", |p| &p.threads, &["200", "{tmo}"], false);
}

#[test]
fn threads_under_valgrind() {
    single("threads", |p| &p.threads, &["20", "{tmo}"], true);
}

#[test]
fn files_through_uring_and_posix() {
    single("files", |p| &p.files, &["{dir}", "8", "{tmo}"], false);
}

#[test]
fn files_under_valgrind() {
    single("files", |p| &p.files, &["{dir}", "1", "{tmo}"], true);
}

#[test]
fn checkpoints_through_the_c_abi() {
    single("ckpt", |p| &p.ckpt, &["{dir}", "3000", "{tmo}"], false);
}

/// `kv.c`: a KV pull and a push handoff between two agents of one process over tcp (`nixl_kv_*`), every
/// byte checked, and the ABI's refusals.
#[test]
fn kv_handoff_through_the_c_abi() {
    single("kv", |p| &p.kv, &["{tmo}"], false);
}

#[test]
fn kv_handoff_under_valgrind() {
    single("kv", |p| &p.kv, &["{tmo}"], true);
}

/// `ckpt.c` part 5: artifact directories under `s3://` (moto) through the C ABI, restored by
/// `nixl_ckpt_restore_artifact` (a private agent from `AWS_*`) and `..._with` (the caller's).
#[test]
fn checkpoint_artifacts_under_s3_through_the_c_abi() {
    use nixl_testkit::moto::Moto;
    nixl_testkit::require!(Moto::missing(), "NIXL_REQUIRE_OBJECT_TESTS");
    let m = Moto::start(&[]);
    m.make_bucket("c-ckpt");
    let endpoint = m.endpoint();
    single(
        "ckpt",
        |p| &p.ckpt,
        &["{dir}", "1", "{tmo}", &endpoint, "c-ckpt"],
        false,
    );
}

#[test]
fn checkpoints_under_valgrind() {
    single("ckpt", |p| &p.ckpt, &["{dir}", "200", "{tmo}"], true);
}

/// The C tests' byte pattern (`pat` in `tests/c/nixl_test.h`).
fn pat(seed: u32, i: u64) -> u8 {
    let mut h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(seed).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    h as u8
}

/// The model `weights.c` expects (its `TENSORS` table, in the same order): name, dtype, shape,
/// file. Tensor `k` holds pattern `k + 1`.
const WEIGHTS_MODEL: &[(&str, safetensors::Dtype, &[usize], usize)] = &[
    ("embed.weight", safetensors::Dtype::F32, &[33, 17], 0),
    ("layers.0.attn.q", safetensors::Dtype::BF16, &[64, 48], 0),
    ("layers.0.norm", safetensors::Dtype::F16, &[48], 0),
    ("layers.1.mlp.up", safetensors::Dtype::I8, &[7, 3, 4099], 1),
    ("lm_head.scale", safetensors::Dtype::F64, &[], 1),
    ("lm_head.weight", safetensors::Dtype::U8, &[100_003], 1),
];

/// The shared secret of the harness's source and the C program's agent.
const WEIGHTS_SECRET: &str = "c-api-weights-secret";

/// Writes [`WEIGHTS_MODEL`] to `dir` as two safetensors files, loads it into a source agent of
/// this process (4 KiB chunks, so tensors span chunks) and returns it with its tcp address.
fn serve_weights(
    dir: &Path,
    tag: &str,
) -> (
    std::sync::Arc<nixl_core::Agent>,
    nixl_weight_streamer::Source,
    String,
) {
    let model = dir.join("model");
    fs::create_dir_all(&model).expect("model dir");
    for file in 0..2 {
        let data: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = WEIGHTS_MODEL
            .iter()
            .enumerate()
            .filter(|(_, t)| t.3 == file)
            .map(|(k, &(name, dtype, shape, _))| {
                let n = shape.iter().product::<usize>() * dtype.bitsize() / 8;
                let bytes = (0..n as u64).map(|i| pat(k as u32 + 1, i)).collect();
                (name.to_owned(), bytes, dtype, shape.to_vec())
            })
            .collect();
        let views = data.iter().map(|(name, bytes, dtype, shape)| {
            let v = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .expect("tensor view");
            (name.clone(), v)
        });
        safetensors::tensor::serialize_to_file(
            views,
            None,
            &model.join(format!("model-0000{}-of-00002.safetensors", file + 1)),
        )
        .expect("write the model");
    }
    let cfg = nixl_transports::config::Config::from_toml(&format!(
        "backends = [\"tcp\"]\n[tcp]\nlisten = \"127.0.0.1:0\"\nio_timeout_ms = 60000\n\
         connect_timeout_ms = 60000\n[auth]\nsecret = \"{WEIGHTS_SECRET}\"\n"
    ))
    .expect("source config");
    let agent = std::sync::Arc::new(
        cfg.agent_builder(format!("weights-src-{tag}"))
            .backends(cfg.backends().expect("backends"))
            .build()
            .expect("source agent"),
    );
    let opts = nixl_weight_streamer::SourceOptions {
        name: Some("tiny".into()),
        chunk_size: 4096,
        ..Default::default()
    };
    let src = nixl_weight_streamer::Source::load(&agent, &model, &opts).expect("load the model");
    let addr = nixl_transports::tcp::listen_addrs_in(&agent.metadata())
        .first()
        .expect("the source listens")
        .to_string();
    (agent, src, addr)
}

fn weights_run(valgrind: bool) {
    let mode = if valgrind { "valgrind" } else { "plain" };
    let dir = fresh_dir(&format!("weights-model-{mode}"));
    let (agent, src, addr) = serve_weights(&dir, mode);
    single(
        "weights",
        |p| &p.weights,
        &[&addr, WEIGHTS_SECRET, "{tmo}"],
        valgrind,
    );
    src.withdraw().expect("withdraw the model");
    agent.shutdown();
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn weights_pulled_through_the_c_abi() {
    weights_run(false);
}

#[test]
fn weights_under_valgrind() {
    weights_run(true);
}
