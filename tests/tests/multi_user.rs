//! Another local user against an agent with the default configuration (no secret configured):
//! the other user's agent, a real `nixl-test-peer` process running under a uid this test creates
//! with `useradd`, gets no metadata, no access to memory (READ or WRITE, over any backend), and
//! cannot notify or push metadata, whether it runs with its own defaults or asks for an open
//! connection. A second agent of the test's own user, also with no configuration, gets all of
//! it: the default is safe on a shared host and still needs no configuration.
//!
//! Needs root (to create the user); skips visibly otherwise.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nixl_core::*;
use nixl_tests::{hex, Peer};

const PEER: &str = env!("CARGO_BIN_EXE_nixl-test-peer");
const T: Duration = Duration::from_secs(30);
const SIZE: usize = 1 << 20;

/// A user made for this test, deleted (with its home) on drop.
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl User {
    fn create() -> Result<User, String> {
        let name = format!("nixl-t{}", std::process::id());
        let _ = Command::new("userdel").args(["-r", &name]).output();
        let out = Command::new("useradd")
            .args(["-m", "-s", "/bin/false", &name])
            .output()
            .map_err(|e| format!("useradd: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "useradd: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let id = |flag: &str| -> Result<u32, String> {
            let o = Command::new("id")
                .args([flag, &name])
                .output()
                .map_err(|e| e.to_string())?;
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .map_err(|e| format!("id {flag} {name}: {e}"))
        };
        let home = Command::new("getent")
            .args(["passwd", &name])
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .split(':')
                    .nth(5)
                    .map(PathBuf::from)
            })
            .ok_or("no home directory")?;
        Ok(User {
            uid: id("-u")?,
            gid: id("-g")?,
            name,
            home,
        })
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-r", &self.name]).output();
    }
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: a second local user cannot be created".into());
    }
    if Command::new("useradd").arg("--help").output().is_err() {
        return Some("no useradd".into());
    }
    None
}

/// The peer binary where the other user can run it (the build directory may not be reachable
/// for it), in a directory removed on drop.
struct Exe(PathBuf);

impl Exe {
    fn new() -> Exe {
        let dir = std::env::temp_dir().join(format!("nixl-mu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = dir.join("nixl-test-peer");
        std::fs::copy(PEER, &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        Exe(exe)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.parent().unwrap().join(name)
    }
}

impl Drop for Exe {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

fn other_user_peer(exe: &Exe, user: &User, name: &str, config: Option<&str>) -> Peer {
    let mut cmd = Command::new(&exe.0);
    cmd.env_clear()
        .env("HOME", &user.home)
        // Its own socket directory, so that its shm backend runs (and is refused on its own).
        .env("XDG_RUNTIME_DIR", &user.home)
        .env("PATH", "/usr/bin:/bin")
        .env("RUST_BACKTRACE", "1")
        .current_dir("/")
        .uid(user.uid)
        .gid(user.gid);
    if let Some(text) = config {
        let path = exe.path(&format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        cmd.args(["--config", path.to_str().unwrap()]);
    }
    Peer::spawn(cmd, name, SIZE)
}

fn tcp_addr(md: &AgentMetadata) -> String {
    // The agent listens on its host's first address; its metadata says which (the listener
    // address is also what a peer would find in etcd). Decode the tcp connection info: version,
    // count, then family, address and port.
    let info = &md
        .backends
        .iter()
        .find(|b| b.name == BackendName::Tcp)
        .expect("a tcp backend")
        .conn_info;
    let (ip, port): (std::net::IpAddr, u16) = match info[2] {
        4 => (
            <[u8; 4]>::try_from(&info[3..7]).unwrap().into(),
            u16::from_le_bytes([info[7], info[8]]),
        ),
        _ => (
            <[u8; 16]>::try_from(&info[3..19]).unwrap().into(),
            u16::from_le_bytes([info[19], info[20]]),
        ),
    };
    std::net::SocketAddr::new(ip, port).to_string()
}

#[test]
fn another_local_user_gets_no_metadata_no_memory_and_no_notifications() {
    nixl_testkit::require!(skip_reason());
    let user = match User::create() {
        Ok(u) => u,
        Err(e) => {
            nixl_testkit::skip(e, false, &[]);
            return;
        }
    };
    let exe = Exe::new();

    // The agent under attack: the default configuration, this test's user (root).
    let victim = Agent::builder("victim")
        .backends(nixl_transports::default_backends())
        .build()
        .unwrap();
    let mut mem = vec![0u8; SIZE];
    nixl_tests::fill(&mut mem, 99);
    let original = mem.clone();
    let list = DescList::from_descs(MemKind::Dram, vec![Desc::from_mut_slice(&mut mem)]).unwrap();
    // SAFETY: `mem` outlives the registration, and is read only once the peers are done.
    let reg = unsafe { victim.register(&list) }.unwrap();
    let md = victim.metadata();
    let addr = tcp_addr(&md);
    let md_hex = hex(&victim.metadata_bytes());

    // The default secret is this user's, in a file nobody else can read.
    let secret = PathBuf::from("/root/.config/nixl/secret");
    if let Ok(m) = std::fs::metadata(&secret) {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.mode() & 0o077, 0, "the secret file is readable by others");
        assert_eq!(m.uid(), 0);
    }

    let cases: [(&str, Option<String>); 3] = [
        ("intruder", None),
        ("open-intruder", Some("[auth]\nallow_open = true\n".into())),
        (
            "thief",
            Some(format!(
                "[auth]\nsecret_file = \"{}\"\n",
                secret.to_string_lossy()
            )),
        ),
    ];
    for (name, config) in &cases {
        let mut p = other_user_peer(&exe, &user, name, config.as_deref());
        let r = p.cmd_within(&format!("fetch {addr}"), T);
        eprintln!("{name}: fetch: {r}");
        assert!(r.starts_with("err "), "{name}: fetch: {r}");
        if *name != "thief" {
            assert!(r.starts_with("err denied"), "{name}: fetch: {r}");
        }
        // With the metadata from elsewhere (etcd, say), still nothing.
        assert_eq!(p.cmd_within(&format!("load {md_hex}"), T), "ok victim");
        for op in ["read", "write"] {
            let r = p.cmd_within(&format!("xfer victim {op} 1 -"), T);
            eprintln!("{name}: {op}: {r}");
            assert!(r.starts_with("err "), "{name}: {op}: {r}");
        }
        // Nothing of the victim's memory reached the intruder's buffer.
        assert_eq!(p.cmd_within("check 99", T), "bad 0", "{name}");
        let r = p.cmd_within(&format!("send victim {}", hex(b"from a stranger")), T);
        eprintln!("{name}: send: {r}");
        assert!(r.starts_with("err "), "{name}: send: {r}");
        let r = p.cmd_within(&format!("push {addr}"), T);
        assert!(r.starts_with("err "), "{name}: push: {r}");
        eprintln!("{name}: refused as it should be");
    }
    assert!(victim.wait_notifs(Duration::from_millis(300)).is_empty());
    assert!(victim.peers().is_empty(), "{:?}", victim.peers());
    assert!(mem == original, "another user's WRITE landed");

    // The same user, no configuration either: everything works.
    let mut friend = Peer::start(PEER, "friend", SIZE, false);
    let r = friend.cmd_within(&format!("fetch {addr}"), T);
    assert_eq!(r, "ok victim");
    assert_eq!(friend.cmd_within("fill 7", T), "ok");
    let r = friend.cmd_within(&format!("xfer victim write 1 {}", hex(b"hi")), T);
    assert!(r.starts_with("ok "), "friend: write: {r}");
    let n = victim.wait_notifs(Duration::from_secs(5));
    assert_eq!(n.len(), 1);
    assert_eq!(
        (n[0].from.as_str(), n[0].msg.as_slice()),
        ("friend", &b"hi"[..])
    );
    drop(friend);
    drop(reg);
    assert!(mem != original, "the same user's WRITE did not land");
}
