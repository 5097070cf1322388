//! `nixl-serve up`: a whole deployment on this host. Writes the model (to a temporary
//! directory unless `--model` is given), starts the workers and the frontend as child
//! processes of this one (each dies with it: `PR_SET_PDEATHSIG`), waits until each says it is
//! ready, prints the URL (`--json`: the URL, the model and every process), and stops them all
//! on SIGTERM or SIGINT, or when the frontend exits.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::model::{ModelConfig, Weights, MODEL_NAME};

/// Arguments of `nixl-serve up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Prefill workers (disaggregated).
    #[arg(long, default_value_t = 1)]
    pub prefill: u32,
    /// Decode workers (disaggregated).
    #[arg(long, default_value_t = 1)]
    pub decode: u32,
    /// Tensor-parallel size of each prefill worker.
    #[arg(long, default_value_t = 1)]
    pub prefill_tp: u32,
    /// Tensor-parallel size of each decode worker.
    #[arg(long, default_value_t = 1)]
    pub decode_tp: u32,
    /// Aggregated workers instead of prefill and decode.
    #[arg(long)]
    pub aggregated: bool,
    /// Aggregated workers (with --aggregated).
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Tensor-parallel size of each aggregated worker.
    #[arg(long, default_value_t = 1)]
    pub tp: u32,
    /// Frontend address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// Model directory (default: the reference model written to a temporary directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print one JSON line (url, model, processes) instead of the URL.
    #[arg(long)]
    pub json: bool,
    /// Transport backend of the workers' agents (shm or tcp).
    #[arg(long, default_value = "shm")]
    pub backend: String,
    /// KV blocks per worker.
    #[arg(long, default_value_t = 512)]
    pub blocks: u32,
    /// Pause after each decode step of every worker, milliseconds (simulates a larger model).
    #[arg(long, default_value_t = 0)]
    pub step_delay_ms: u64,
    /// Worker choice of the frontend: kv, kv:WEIGHT, round-robin, random.
    #[arg(long, default_value = "kv")]
    pub router: String,
}

struct Proc {
    child: Child,
    role: String,
    url: String,
    name: String,
    tp: u32,
}

fn signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGTERM);
        s
    }
}

/// Starts `nixl-serve ARGS` as a child that dies with this process, and waits for its ready
/// line (its URL).
fn start(args: &[String], what: &str) -> Result<(Child, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(Stdio::piped()).stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls (prctl, getppid, sigprocmask, _exit) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Reads the ready line, then drains the rest so the child never blocks on stdout.
        let mut tx = Some(tx);
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if let Some(url) = l.strip_prefix("NIXL-SERVE-READY ") {
                if let Some(t) = tx.take() {
                    let _ = t.send(url.trim().to_owned());
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => Ok((child, url)),
        Err(_) => {
            let _ = child.kill();
            let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(format!("{what} did not become ready ({st})"))
        }
    }
}

fn stop(procs: &mut [Proc]) {
    for p in procs.iter() {
        // SAFETY: signalling our own child by its pid (not reaped yet, so not reused).
        unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let end = Instant::now() + Duration::from_secs(3);
    for p in procs.iter_mut() {
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= end => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Runs `nixl-serve up` until SIGTERM/SIGINT.
pub fn up(a: UpArgs) -> Result<(), String> {
    let set = signals();
    // SAFETY: blocks the two signals in this (the only) thread so sigtimedwait takes them;
    // children unblock them before exec.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let (model, temp) = match a.model.clone() {
        Some(m) => (m, None),
        None => {
            let d = std::env::temp_dir().join(format!("nixl-serve-model-{}", std::process::id()));
            Weights::generate(ModelConfig::default()).save(&d)?;
            (d.clone(), Some(d))
        }
    };
    let mut procs: Vec<Proc> = Vec::new();
    let r = run(&a, &model, &set, &mut procs);
    stop(&mut procs);
    if let Some(t) = temp {
        let _ = std::fs::remove_dir_all(t);
    }
    r
}

fn run(
    a: &UpArgs,
    model: &std::path::Path,
    set: &libc::sigset_t,
    procs: &mut Vec<Proc>,
) -> Result<(), String> {
    let mut plan: Vec<(&str, u32)> = Vec::new();
    if a.aggregated {
        plan.extend((0..a.workers).map(|_| ("aggregated", a.tp)));
    } else {
        plan.extend((0..a.prefill).map(|_| ("prefill", a.prefill_tp)));
        plan.extend((0..a.decode).map(|_| ("decode", a.decode_tp)));
    }
    let pid = std::process::id();
    for (i, (role, tp)) in plan.iter().enumerate() {
        let name = format!("{role}{i}-{pid}");
        let args: Vec<String> = [
            "worker",
            "--role",
            role,
            "--tp",
            &tp.to_string(),
            "--model",
            &model.display().to_string(),
            "--name",
            &name,
            "--backend",
            &a.backend,
            "--blocks",
            &a.blocks.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--step-delay-ms",
            &a.step_delay_ms.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, url) = start(&args, &format!("{role} worker {name}"))?;
        procs.push(Proc {
            child,
            role: role.to_string(),
            url,
            name,
            tp: *tp,
        });
    }
    let mut args: Vec<String> = vec!["frontend".into(), "--listen".into(), a.listen.clone()];
    args.push("--router".into());
    args.push(a.router.clone());
    for p in procs.iter() {
        args.push(format!("--{}", p.role));
        args.push(p.url.clone());
    }
    let (child, url) = start(&args, "frontend")?;
    procs.push(Proc {
        child,
        role: "frontend".into(),
        url: url.clone(),
        name: "frontend".into(),
        tp: 0,
    });
    if a.json {
        let ps: Vec<_> = procs
            .iter()
            .map(|p| json!({"role": p.role, "url": p.url, "pid": p.child.id(), "name": p.name, "tp": p.tp}))
            .collect();
        println!(
            "{}",
            json!({"url": url, "model": MODEL_NAME, "processes": ps})
        );
    } else {
        println!("nixl-serve up: {url}/v1 (model {MODEL_NAME}); SIGINT or SIGTERM stops it");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: `set` is an initialised signal set; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
        if sig == libc::SIGINT || sig == libc::SIGTERM {
            return Ok(());
        }
        let fe = procs.last_mut().expect("the frontend");
        if let Ok(Some(st)) = fe.child.try_wait() {
            return Err(format!("the frontend exited ({st})"));
        }
    }
}
