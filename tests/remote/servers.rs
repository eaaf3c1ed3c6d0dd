//! The servers the remote-base tests run on 127.0.0.1: `moto_server` (S3)
//! with a user, its access key and a bucket, and `range_server.py` (HTTP
//! with Range) over a directory. Each is stopped when its handle drops.

#![allow(dead_code)] // each test uses its own part of it

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HERE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/remote");

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
fn wait_listening(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited ({st}) before it listened on port {port}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on port {port} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server process, killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Kills the server and waits for it: its port refuses connections
    /// afterwards.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options of the HTTP range server.
#[derive(Default, Clone)]
pub struct RangeOpts {
    /// Seconds every GET waits before it answers.
    pub delay: Option<f64>,
    /// A file that gets one line per GET.
    pub log: Option<PathBuf>,
    /// The first so many GETs are answered with this HTTP status.
    pub fail: Option<(u32, u16)>,
    /// GETs answered as usual before `fail` begins.
    pub pass: u32,
}

/// Starts `range_server.py` serving `dir` on `port`.
pub fn range_server(dir: &Path, port: u16, opts: &RangeOpts) -> Server {
    let mut cmd = Command::new("python3");
    cmd.arg(format!("{HERE}/range_server.py"))
        .arg(dir)
        .arg(port.to_string());
    if let Some(d) = opts.delay {
        cmd.args(["--delay", &d.to_string()]);
    }
    if let Some(l) = &opts.log {
        cmd.arg("--log").arg(l);
    }
    if let Some((n, status)) = opts.fail {
        cmd.args(["--fail", &n.to_string(), &status.to_string()]);
        cmd.args(["--pass", &opts.pass.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the range server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "range server did not start");
    wait_listening(port, "the range server", &mut child);
    Server { child, port }
}

/// The byte ranges (`a..b+1`) of the GETs in a range server's log
/// (`RangeOpts::log`), in the order they came.
pub fn logged_ranges(log: &Path) -> Vec<std::ops::Range<u64>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let r = l.split("bytes=").nth(1)?.split_whitespace().next()?;
            let (a, b) = r.split_once('-')?;
            Some(a.parse().ok()?..b.parse::<u64>().ok()? + 1)
        })
        .collect()
}

/// A running `moto_server` with an IAM user's key and one bucket. It checks
/// credentials: requests signed with another key are refused.
pub struct Moto {
    pub server: Server,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
    pub bucket: String,
}

impl Moto {
    /// The bucket as an `object_store` store, with the user's key: for
    /// putting and looking at objects.
    pub fn store(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_region("us-east-1")
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .build()
            .unwrap()
    }
}

/// Starts `moto_server` on a free port and makes `bucket`. Fails (never
/// skips) when `moto_server` is not installed.
pub fn moto(bucket: &str) -> Moto {
    let found = Command::new("moto_server")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(found, Ok(s) if s.success()) {
        panic!(
            "moto_server is missing or broken: ci/setup.sh installs it (pip install 'moto[server]')"
        );
    }
    let port = free_port();
    let mut child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // Its first three requests (moto_setup.py's user, policy and key)
        // need no credentials; every later one is checked.
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    wait_listening(port, "moto_server", &mut child);
    let server = Server { child, port };
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = Command::new("python3")
        .arg(format!("{HERE}/moto_setup.py"))
        .args([&endpoint, bucket])
        .output()
        .expect("python3 runs moto_setup.py");
    assert!(
        out.status.success(),
        "moto_setup.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut words = text.split_whitespace();
    let key_id = words.next().expect("key id").to_string();
    let secret = words.next().expect("secret").to_string();
    Moto {
        server,
        endpoint,
        key_id,
        secret,
        bucket: bucket.to_string(),
    }
}
