//! The overhead section's fast upstream: nginx answering a fixed chat completion, or the mock
//! provider when nginx is missing.

use super::util::tool_version;
use super::UPSTREAM_ANSWER;
use market_router_testbed::{self as common, wait_ready_while, MockProvider, Proc, TempDir};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The fast upstream of the overhead runs.
pub enum Upstream {
    /// The process is held to keep it running; killed on drop.
    Nginx {
        _proc: Proc,
        port: u16,
    },
    Mock(MockProvider),
}

impl Upstream {
    pub fn port(&self) -> u16 {
        match self {
            Upstream::Nginx { port, .. } => *port,
            Upstream::Mock(m) => m.port(),
        }
    }

    pub(crate) fn describe(&self, nginx: Option<&Path>) -> String {
        match self {
            Upstream::Nginx { .. } => format!(
                "{} (`return 200` fixed chat completion, 1 process, access log off)",
                nginx
                    .map(|n| tool_version(n, "-v"))
                    .unwrap_or_default()
                    .replace("nginx version: ", "")
            ),
            Upstream::Mock(_) => "mock_provider --quiet (nginx not available)".into(),
        }
    }
}

/// nginx as a single foreground process (no master/worker split, so killing our child ends
/// all of it) answering every request with [`UPSTREAM_ANSWER`].
pub fn start_nginx(bin: &Path) -> Result<Upstream, String> {
    let mut last_err = String::new();
    for _ in 0..3 {
        let port = common::free_port();
        if port == 0 {
            return Err("no free port for nginx".into());
        }
        let dir = TempDir::new("nginx")?;
        let d = dir.path().display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 4m;
    client_body_buffer_size 128k;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{UPSTREAM_ANSWER}';
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).map_err(|e| format!("cannot write nginx.conf: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let mut proc = Proc::spawn_in("nginx", &mut cmd, dir)?;
        let url = format!("http://127.0.0.1:{port}/health");
        match wait_ready_while(&url, Duration::from_secs(10), || proc.check_running()) {
            Ok(()) => return Ok(Upstream::Nginx { _proc: proc, port }),
            Err(e) => {
                let errlog = fs::read_to_string(proc.dir().join("error.log")).unwrap_or_default();
                last_err = format!("{e}; nginx error.log: {}", errlog.trim());
            }
        }
    }
    Err(format!("nginx did not start: {last_err}"))
}
