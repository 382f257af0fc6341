//! `scripts/ensure-rabbitmq.sh`, the broker step of `make demo`, `make test`
//! and CI, on paths this machine cannot take for real: RabbitMQ missing, to be
//! installed from the system's packages, and no package manager at all.
//!
//! The script runs against a free port with a PATH of stubs: `apt-get` records
//! its arguments and "installs" a `rabbitmq-server` that, started with
//! `-detached`, listens on that port. The machine's own broker is never touched.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Stubs {
    dir: tempfile::TempDir,
    port: u16,
}

impl Stubs {
    /// A bin directory with the few tools the script needs, and an sbin directory.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::create_dir(dir.path().join("sbin")).unwrap();
        for tool in ["seq", "sleep", "env", "python3", "cat", "chmod"] {
            let target = which(tool);
            std::os::unix::fs::symlink(target, dir.path().join("bin").join(tool)).unwrap();
        }
        // As root, whoever runs the tests: no sudo.
        let stubs = Self {
            dir,
            port: TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        };
        stubs.script("bin/id", "echo 0");
        stubs
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn script(&self, rel: &str, body: &str) {
        let path = self.path(rel);
        let bash = which("bash");
        std::fs::write(&path, format!("#!{}\n{body}\n", bash.display())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// `apt-get` that logs its arguments and installs a fake server into sbin.
    fn apt_get(&self) {
        let log = self.path("apt.log");
        let sbin = self.path("sbin");
        let pid = self.path("server.pid");
        let server = format!(
            r#"[ "$1" = -detached ] || exit 2
python3 -c 'import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port})); s.listen(8); time.sleep(120)' &
echo $! > {pid}"#,
            port = self.port,
            pid = pid.display(),
        );
        self.script(
            "bin/apt-get",
            &format!(
                r#"echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {log}
if [ "$1" = install ]; then
cat > {sbin}/rabbitmq-server <<'SERVER'
#!{bash}
{server}
SERVER
chmod +x {sbin}/rabbitmq-server
fi"#,
                log = log.display(),
                sbin = sbin.display(),
                bash = which("bash").display(),
            ),
        );
    }

    fn run(&self) -> Output {
        self.run_with(&[])
    }

    /// Runs the script with only the stubs on PATH and `env` on top of the defaults.
    fn run_with(&self, env: &[(&str, &str)]) -> Output {
        Command::new(which("bash"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ensure-rabbitmq.sh"))
            .env_clear()
            .env("PATH", self.path("bin"))
            .env("HERALD_BROKER_PORT", self.port.to_string())
            .env("HERALD_RABBITMQ_SBIN", self.path("sbin"))
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }
}

impl Drop for Stubs {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.path("server.pid")) {
            let _ = Command::new(which("kill")).arg(pid.trim()).status();
        }
    }
}

fn which(tool: &str) -> PathBuf {
    ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .or_else(|| {
            let out = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .ok()?;
            let path = String::from_utf8(out.stdout).ok()?;
            Some(PathBuf::from(path.trim())).filter(|p| p.exists())
        })
        .unwrap_or_else(|| panic!("{tool} is on this machine"))
}

#[test]
fn a_missing_broker_is_installed_with_apt_and_started() {
    let stubs = Stubs::new();
    stubs.apt_get();
    let out = stubs.run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("RabbitMQ is not installed; installing it from the system's packages"),
        "{stderr}"
    );
    assert!(stderr.contains("starting "), "{stderr}");
    assert!(
        stderr.contains(&format!("RabbitMQ answers on 127.0.0.1:{}", stubs.port)),
        "{stderr}"
    );
    let apt = std::fs::read_to_string(stubs.path("apt.log")).unwrap();
    assert_eq!(
        apt.lines().collect::<Vec<_>>(),
        [
            "DEBIAN_FRONTEND=noninteractive update -qq",
            "DEBIAN_FRONTEND=noninteractive install -y -qq rabbitmq-server"
        ]
    );

    // Run again: the broker now answers, so nothing is installed or started.
    let again = stubs.run();
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(stubs.path("apt.log")).unwrap(), apt);
    assert!(!String::from_utf8_lossy(&again.stderr).contains("starting"));
}

#[test]
fn without_a_broker_or_a_package_manager_it_says_what_to_do() {
    let stubs = Stubs::new();
    let out = stubs.run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no apt-get, dnf or brew here: install RabbitMQ >= 3.10 yourself"),
        "{stderr}"
    );
}

#[test]
fn a_remote_broker_that_does_not_answer_is_not_installed_here() {
    let stubs = Stubs::new();
    stubs.apt_get();
    // Not 127.0.0.1 or localhost: a broker elsewhere, which this script must not install here.
    let out = stubs.run_with(&[("HERALD_BROKER_HOST", "127.0.0.2")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("it is not this machine"), "{stderr}");
    assert!(!stubs.path("apt.log").exists());
}
